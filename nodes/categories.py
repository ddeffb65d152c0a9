"""Node-menu categories of the pack: everything under ``image/restoration/VAR``, next to ComfyUI's
own image nodes, one sub-menu per kind of node."""

ROOT = "image/restoration/VAR"
LOADERS = f"{ROOT}/loaders"
RESTORE = f"{ROOT}/restore"
PYRAMID = f"{ROOT}/pyramid"
SAMPLING = f"{ROOT}/sampling"
TEXT = f"{ROOT}/text"
