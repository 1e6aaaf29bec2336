# ruff: noqa: F821, B018  (bare names are how vulture reads a whitelist)
"""Names vulture reports as unused that an interface requires (checked in CI: vulture inc_ipamp vulture_whitelist.py).

Each is a parameter whose name is fixed by its caller, not dead code."""

mtime  # inc/strategy._frontier: part of the lru_cache key (a changed frontier file is reloaded)
config_list  # INC's TuneStrategy.to_config_mapping signature
types  # torch's __torch_function__ signature
exc  # __exit__ signature
