"""var_core: self-contained VAR image-restoration models (VARestorer, Infinity, VAR, VARSR, RestoreVAR).

No ComfyUI imports here; the ComfyUI nodes in ``nodes/`` wrap this package.
"""

from .detect import Family, detect_family
from .errors import CheckpointError, ImageInputError, ParameterError, UnsupportedFamilyError, VARError
from .loading import LoadedModel, inspect, load

__all__ = [
    "CheckpointError",
    "Family",
    "ImageInputError",
    "LoadedModel",
    "ParameterError",
    "UnsupportedFamilyError",
    "VARError",
    "detect_family",
    "inspect",
    "load",
]
