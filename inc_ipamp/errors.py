"""One exception type per kind of user mistake, so the CLI can print one clear sentence."""


class IpampError(Exception):
    """Base class: the message is meant for the user, printed without a traceback."""


class ModelLoadError(IpampError):
    pass


class UnsupportedModelError(IpampError):
    pass


class DataError(IpampError):
    pass


class SensitivityError(IpampError):
    pass


class InfeasibleBudgetError(IpampError):
    pass


class ArtifactError(IpampError):
    """A stage's input file is missing, corrupt or from an incompatible run."""


class DeviceUnavailableError(IpampError):
    pass


class FormatError(IpampError, ValueError):
    """An unknown or misplaced number format (a ValueError too, for library callers)."""
