"""Model folders of the pack: ``models/var/`` holds every VAR checkpoint (VAE, transformer, SwinIR).

Registering it is the one side effect the pack has at import time.
"""

from __future__ import annotations

import os

import folder_paths

FOLDER = "var"
EXTENSIONS = {".safetensors", ".pth", ".ckpt", ".pt", ".bin"}
OFFICIAL_VAE = "infinity_vae_d32reg.pth"


def register() -> None:
    """Add ``models/var`` (with our extensions) to ``folder_paths``, merging an existing entry.

    An ``extra_model_paths.yaml`` (or another pack) may already have registered ``var``: its folders
    are kept, ours is added as the default, and the extension sets are merged (ComfyUI gives a
    yaml-registered folder an empty set, so the result is our explicit set).
    """
    default = os.path.join(folder_paths.models_dir, FOLDER)
    existing = folder_paths.folder_names_and_paths.get(FOLDER)
    if existing is None:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], set(EXTENSIONS))
        return
    paths, exts = existing
    paths = list(paths)
    if default not in paths:
        paths.insert(0, default)
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(exts) | EXTENSIONS)


def filenames() -> list[str]:
    """Files under ``models/var`` (and any extra ``var`` folders), as the combo lists them."""
    return folder_paths.get_filename_list(FOLDER)


def full_path(name: str) -> str:
    """Absolute path of a file picked in a combo; raises ``FileNotFoundError`` with a clear message."""
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        raise FileNotFoundError(
            f"model file {name!r} not found in models/{FOLDER}/ (looked in: "
            + ", ".join(folder_paths.get_folder_paths(FOLDER))
            + "). Put the file there and refresh the node list."
        )
    return path
