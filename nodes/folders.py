"""Model folders of the pack: ``models/var/`` holds every VAR checkpoint (VAE, transformer, SwinIR).

T5 text encoders are transformers folders (``config.json``, tokenizer, weights) under ComfyUI's own
``text_encoders`` model folder(s). Registering ``var`` is the one side effect the pack has at import time.
"""

from __future__ import annotations

import os

import folder_paths

FOLDER = "var"
EXTENSIONS = {".safetensors", ".pth", ".ckpt", ".pt", ".bin"}
OFFICIAL_VAE = "infinity_vae_d32reg.pth"
OFFICIAL_STUDENT = ("varestorer.pth", "varestorer.safetensors")
OFFICIAL_SWINIR = ("general_swinir_v1.ckpt", "general_swinir_v1.safetensors")
# VQVAEs of VAR, VARSR and RestoreVAR; the transformers of every family (VARestorer first).
OFFICIAL_VQVAE = ("vae_ch160v4096z32.pth", "VQVAE.pth", "vae_restorevar.ckpt")
OFFICIAL_MODELS = (*OFFICIAL_STUDENT, "VARSR.pth", "restorevar.pth", "var_d16.pth")
OFFICIAL_VAR = ("var_d16.pth", "var_d20.pth", "var_d24.pth", "var_d30.pth")
TEXT_ENCODERS = "text_encoders"
OFFICIAL_T5 = "flan-t5-xl"


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


def pick_default(names: list[str], candidates) -> str | None:
    """The first of ``candidates`` (a name or names) present in ``names``, else None."""
    for name in (candidates,) if isinstance(candidates, str) else candidates:
        if name in names:
            return name
    return None


def text_encoder_folders() -> list[str]:
    """Sub-folders of the ``text_encoders`` model folder(s) holding a ``config.json`` (transformers
    folders such as ``flan-t5-xl``), sorted; a name in two folders is listed once."""
    names = set()
    for root in folder_paths.get_folder_paths(TEXT_ENCODERS):
        if not os.path.isdir(root):
            continue
        for entry in os.scandir(root):
            if entry.is_dir() and os.path.isfile(os.path.join(entry.path, "config.json")):
                names.add(entry.name)
    return sorted(names)


def text_encoder_path(name: str) -> str:
    """Absolute path of a text encoder folder picked in a combo (the first ``text_encoders`` folder that has it)."""
    roots = folder_paths.get_folder_paths(TEXT_ENCODERS)
    if name in ("", ".", "..") or os.path.basename(name) != name or "/" in name or "\\" in name:
        raise FileNotFoundError(f"text encoder {name!r} is not a folder name in models/{TEXT_ENCODERS}/")
    for root in roots:
        path = os.path.join(root, name)
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
    raise FileNotFoundError(
        f"text encoder folder {name!r} not found in models/{TEXT_ENCODERS}/ (looked in: " + ", ".join(roots)
        + f"). Put the whole {OFFICIAL_T5} folder (config.json, tokenizer files, weights) there and refresh "
        "the node list."
    )
