"""inc-ipamp: automatic mixed precision for LLMs by integer programming on measured group gains.

Importing the package registers the INC strategy ``ip_empirical_time`` when INC is installed.
"""

__version__ = "0.2.0"
