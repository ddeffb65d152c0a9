"""Model folders of the pack and the official files that go in them.

* ``models/var/`` (registered here, extra ``var`` folders of ``extra_model_paths.yaml`` kept): every
  VAR checkpoint (VAEs, transformers; SwinIR too, for installs that put it there).
* ``models/upscale_models/`` (ComfyUI's own): SwinIR, where ComfyUI users already keep it. The
  SwinIR loader lists both folders merged (a name in both once, ``models/var/`` wins).
* ``models/text_encoders/`` (ComfyUI's own): T5 text encoders as transformers folders
  (``config.json``, tokenizer, weights).

:data:`OFFICIAL_FILES` is the table of the upstream files (download location from the upstream
READMEs, folder); a file a loader cannot find is reported with that information. Registering
``var`` is the one side effect the pack has at import time.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import folder_paths

from .. import var_core
from ..var_core.demo import DEMO_DIR

FOLDER = "var"
UPSCALE_MODELS = "upscale_models"
TEXT_ENCODERS = "text_encoders"
EXTENSIONS = {".safetensors", ".pth", ".ckpt", ".pt", ".bin"}
OFFICIAL_VAE = "infinity_vae_d32reg.pth"
OFFICIAL_STUDENT = ("varestorer.pth", "varestorer.safetensors")
OFFICIAL_SWINIR = ("general_swinir_v1.ckpt", "general_swinir_v1.safetensors")
# VQVAEs of VAR, VARSR and RestoreVAR; the transformers of every family (VARestorer first).
OFFICIAL_VQVAE = ("vae_ch160v4096z32.pth", "VQVAE.pth", "vae_restorevar.ckpt")
OFFICIAL_MODELS = (*OFFICIAL_STUDENT, "VARSR.pth", "restorevar.pth", "var_d16.pth")
OFFICIAL_VAR = ("var_d16.pth", "var_d20.pth", "var_d24.pth", "var_d30.pth")
OFFICIAL_T5 = "flan-t5-xl"


@dataclass(frozen=True, kw_only=True)
class OfficialFile:
    """An upstream file: ``name`` as released, what it is, where to download it, the ComfyUI model
    folder it goes in, and its parameter count where the upstream README states one."""

    name: str
    what: str
    url: str
    folder: str
    params: str = ""


_VARESTORER_HF = "https://huggingface.co/EvanEternal/VARestorer/tree/main/weights"
_VAR_HF = "https://huggingface.co/FoundationVision/var/resolve/main/"
_VARSR_HF = "https://huggingface.co/qyp2000/VARSR"
_RESTOREVAR_CKPTS = ("the checkpoint archive linked under Downloads in the README of "
                     "https://github.com/sudraj2002/RestoreVAR (its ckpts/ folder)")

OFFICIAL_FILES: tuple[OfficialFile, ...] = (
    OfficialFile(name="varestorer.pth", what="VARestorer one-step student, Infinity-2B with LoRA adapters",
                 url=_VARESTORER_HF + " (or the Google Drive link of the VARestorer README)", folder=FOLDER),
    OfficialFile(name=OFFICIAL_VAE, what="Infinity BSQ VAE with 32-bit tokens, of VARestorer and Infinity",
                 url="https://huggingface.co/FoundationVision/Infinity/blob/main/infinity_vae_d32reg.pth",
                 folder=FOLDER),
    OfficialFile(name="infinity_2b_reg.pth", what="Infinity-2B, the iterative teacher",
                 url="https://huggingface.co/FoundationVision/Infinity", folder=FOLDER, params="2B"),
    OfficialFile(name="general_swinir_v1.ckpt", what="DiffBIR's SwinIR pre-cleaner of VARestorer",
                 url="https://huggingface.co/lxq007/DiffBIR/blob/main/general_swinir_v1.ckpt", folder=UPSCALE_MODELS),
    OfficialFile(name=OFFICIAL_T5, what="T5 text encoder folder: config.json, tokenizer files, weights",
                 url="https://huggingface.co/google/flan-t5-xl", folder=TEXT_ENCODERS),
    OfficialFile(name="vae_ch160v4096z32.pth", what="VQVAE of the class-conditional VAR", url=_VAR_HF
                 + "vae_ch160v4096z32.pth", folder=FOLDER),
    *(OfficialFile(name=f"var_d{depth}.pth", what=f"class-conditional VAR-d{depth} (ImageNet 256)",
                   url=f"{_VAR_HF}var_d{depth}.pth", folder=FOLDER, params=params)
      for depth, params in ((16, "310M"), (20, "600M"), (24, "1.0B"), (30, "2.0B"))),
    OfficialFile(name="VARSR.pth", what="VARSR x4 super-resolution transformer", url=_VARSR_HF, folder=FOLDER),
    OfficialFile(name="VQVAE.pth", what="VQVAE of VARSR", url=_VARSR_HF, folder=FOLDER),
    OfficialFile(name="restorevar.pth", what="RestoreVAR all-in-one restoration transformer", url=_RESTOREVAR_CKPTS,
                 folder=FOLDER),
    OfficialFile(name="vae_restorevar.ckpt", what="VQVAE of RestoreVAR, its decoder fine-tuned for the refiner",
                 url=_RESTOREVAR_CKPTS, folder=FOLDER),
)
OFFICIAL = {f.name: f for f in OFFICIAL_FILES}


def register() -> None:
    """Add ``models/var`` (with our extensions) to ``folder_paths``, merging an existing entry.

    An ``extra_model_paths.yaml`` (or another pack) may already have registered ``var``: its folders
    are kept, ours is added as the default, and the extension sets are merged (ComfyUI gives a
    yaml-registered folder an empty set, so the result is our explicit set). The folder of the demo
    model shipped with the pack comes last, so its two files are in the lists on a fresh install.
    """
    default = os.path.join(folder_paths.models_dir, FOLDER)
    paths, exts = folder_paths.folder_names_and_paths.get(FOLDER, ([], set()))
    paths = list(paths)
    if default not in paths:
        paths.insert(0, default)
    # The demo model shipped with the pack (var_core/demo), listed after the user's folders.
    if str(DEMO_DIR) not in paths:
        paths.append(str(DEMO_DIR))
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(exts) | EXTENSIONS)


def filenames() -> list[str]:
    """Files under ``models/var`` (and any extra ``var`` folders), as the combo lists them."""
    return folder_paths.get_filename_list(FOLDER)


def swinir_filenames() -> list[str]:
    """The SwinIR combo: files of ``models/var`` and ``models/upscale_models`` merged, sorted, each name once."""
    return sorted(set(filenames()) | set(folder_paths.get_filename_list(UPSCALE_MODELS)))


def _folder_label(folder: str) -> str:
    return f"models/{folder}/"


def where_to_get(names) -> str:
    """``name (what): download from URL, put it in ComfyUI/models/FOLDER/`` for each official name."""
    parts = []
    for name in names:
        f = OFFICIAL.get(name)
        if f is not None:
            parts.append(f"{f.name} ({f.what}): download it from {f.url} and put it in "
                         f"ComfyUI/{_folder_label(f.folder)}")
    return "; ".join(parts)


def missing_message(name: str | None, official, folder_names: tuple[str, ...]) -> str:
    """What a loader says when ``name`` is in none of ``folder_names``: where it looked, the official
    file(s) it expects (``name`` itself when that is an official file), where to get them and where
    they go."""
    labels = " or ".join(_folder_label(f) for f in folder_names)
    looked = ", ".join(p for f in folder_names for p in folder_paths.get_folder_paths(f))
    head = (f"model file {name!r} not found in {labels}" if name
            else f"no model file selected (is {labels} empty?)")
    expected = [name] if name in OFFICIAL else ([official] if isinstance(official, str) else list(official))
    hint = where_to_get(expected)
    if hint:
        hint = ("The official file is " if sum(n in OFFICIAL for n in expected) == 1 else "The official files: ") + hint
    return (f"{head} (looked in: {looked}). " + (f"{hint}. " if hint else "")
            + "Folders added by extra_model_paths.yaml are searched too; refresh the node list (R) after adding "
            "a file.")


def check_name(name: str, folder_names: tuple[str, ...]) -> None:
    """Refuse a model name that is not a relative path inside the model folders: an absolute path, a
    drive, a ``..`` component or a NUL byte (a prompt sent to the API can hold any string; ComfyUI
    does not check V3 combo values). Sub-folders (``sub/file.pth``, as the combo lists them) are fine;
    links a user put inside a model folder are followed, as ComfyUI does."""
    parts = re.split(r"[\\/]", name)
    if "\0" in name or os.path.isabs(name) or name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) \
            or ".." in parts:
        labels = " or ".join(_folder_label(f) for f in folder_names)
        raise var_core.CheckpointError(
            f"model name {name!r} is refused: it points outside {labels}, and only files inside ComfyUI's model "
            f"folders are loaded. Put the file in {labels} and pick it in the list."
        )


def full_path(name: str, official=(), folder_names: tuple[str, ...] = (FOLDER,)) -> str:
    """Absolute path of a file picked in a combo, from the first of ``folder_names`` that has it;
    raises ``CheckpointError`` naming the ``official`` file(s), where to get them and their folder,
    or refusing a name outside the folders (:func:`check_name`)."""
    if name:
        check_name(name, folder_names)
        for folder in folder_names:
            path = folder_paths.get_full_path(folder, name)
            if path is not None:
                return path
    raise var_core.CheckpointError(missing_message(name, official, folder_names))


def swinir_path(name: str) -> str:
    """Absolute path of a SwinIR file: ``models/var`` first, then ``models/upscale_models``."""
    return full_path(name, OFFICIAL_SWINIR, (FOLDER, UPSCALE_MODELS))


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
    if not name or name in (".", "..") or os.path.basename(name) != name or "/" in name or "\\" in name:
        raise var_core.CheckpointError(
            f"text encoder {name!r} is not a folder name in {_folder_label(TEXT_ENCODERS)}. The official one is "
            + where_to_get([OFFICIAL_T5]) + " (the whole folder)."
        )
    for root in roots:
        path = os.path.join(root, name)
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
    raise var_core.CheckpointError(
        f"text encoder folder {name!r} not found in {_folder_label(TEXT_ENCODERS)} (looked in: " + ", ".join(roots)
        + "). The official one is " + where_to_get([OFFICIAL_T5]) + " (the whole folder: config.json, tokenizer "
        "files, weights). Folders added by extra_model_paths.yaml are searched too; refresh the node list (R)."
    )
