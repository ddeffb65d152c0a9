"""Error types of ``var_core``.

Every error a user can trigger (a wrong file, a bad image, a bad parameter) is raised as a
:class:`VARError` subclass whose message says what is wrong and how to fix it, so that the
ComfyUI nodes and the CLI can show it as it is instead of a deep torch traceback.
"""


class VARError(Exception):
    """Base class of the errors ``var_core`` raises on bad input."""


class CheckpointError(VARError):
    """A weights file cannot be read, or it is not the model it should be."""


class UnsupportedFamilyError(CheckpointError):
    """The checkpoint was recognised, but this version cannot build that model yet."""


class ImageInputError(VARError):
    """An input image has a shape, dtype, size or value range the models cannot use."""


class ParameterError(VARError):
    """A runtime parameter (scale schedule, tile size, ...) is out of range."""
