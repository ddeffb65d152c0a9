"""Command line: ``python -m var_core {restore,info,roundtrip} ...``.

* ``restore IMAGE... -o DIR --weights DIR``: one-step VARestorer super-resolution (x4 by default).
* ``info FILE...``: detect each checkpoint's family and print the architecture read from it.
* ``roundtrip IMAGE... --vae FILE -o DIR``: encode images into pyramid tokens with an Infinity BSQ
  VAE and decode them again (shows what the token pyramid preserves).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from . import image as image_io
from . import pyramid, restore
from .detect import DESCRIPTIONS, Family
from .errors import VARError
from .loading import inspect, load
from .tiling import count_tiles

log = logging.getLogger("var_core")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def _images(inputs: list[str]) -> list[Path]:
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            paths.append(p)
        else:
            raise VARError(f"{item}: no such file or folder")
    if not paths:
        raise VARError(f"no images found in {inputs}")
    return paths


def save_image(image_BHWC: torch.Tensor, path: Path) -> None:
    from PIL import Image

    arr = (image_BHWC[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).save(path)


def cmd_info(args) -> int:
    status = 0
    for path in args.files:
        try:
            family, sd = inspect(path)
        except VARError as e:
            print(f"{path}: error: {e}")
            status = 2
            continue
        n = sum(t.numel() for t in sd.values())
        print(f"{path}: {DESCRIPTIONS[family]} ({n / 1e6:.1f}M parameters)")
        try:
            config = load(sd).config
        except VARError as e:
            print(f"  {e}")
            continue
        for f in dataclasses.fields(config):
            print(f"  {f.name} = {getattr(config, f.name)}")
    return status


def cmd_roundtrip(args) -> int:
    vae = load(args.vae, expect=Family.INFINITY_BSQ_VAE).model.to(args.device)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for path in _images(args.inputs):
        rgb, alpha = image_io.split_alpha(image_io.load_image_file(path))
        with torch.no_grad():
            pyr = pyramid.encode_image(vae, image_io.to_model(rgb), alpha=alpha)
            x = pyramid.decode_pyramid(vae, pyr)
        result = image_io.merge_alpha(image_io.from_model(x.cpu()), alpha)
        target = out / (path.stem + "_roundtrip.png")
        save_image(result, target)
        scales = " ".join(f"{h}x{w}" for _, h, w in pyr.schedule)
        print(f"{path} -> {target} (scales {scales})")
    return 0


# Official file names looked up in --weights DIR (a .safetensors copy with the same stem works too).
OFFICIAL = {"model": "varestorer", "vae": "infinity_vae_d32reg", "swinir": "general_swinir_v1", "t5": "flan-t5-xl"}


def _find(folder: Path | None, stem: str, explicit: str | None, *, required: bool, what: str) -> Path | None:
    if explicit:
        p = Path(explicit)
        if not p.exists():
            raise VARError(f"{what}: {p} not found")
        return p
    if folder is not None:
        for suffix in (".safetensors", ".pth", ".ckpt", ""):
            p = folder / f"{stem}{suffix}"
            if p.exists():
                return p
    if required:
        where = f"in {folder}" if folder else "(no --weights folder given)"
        raise VARError(f"{what} not found {where}: expected {stem}.pth or {stem}.safetensors; "
                       f"pass --weights DIR or the file itself")
    return None


def _autocast(device: torch.device, dtype: str):
    use_bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if use_bf16 and device.type == "cpu" and dtype == "auto":
        use_bf16 = False
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def cmd_restore(args) -> int:
    from tqdm import tqdm

    from . import text as text_lib

    folder = Path(args.weights) if args.weights else None
    if folder is not None and not folder.is_dir():
        raise VARError(f"--weights {folder}: not a folder")
    paths = _images(args.inputs)
    model_path = _find(folder, OFFICIAL["model"], args.model, required=True, what="VARestorer model")
    vae_path = _find(folder, OFFICIAL["vae"], args.vae, required=True, what="Infinity VAE")
    swinir_path = None if args.no_swinir else _find(folder, OFFICIAL["swinir"], args.swinir, required=False, what="SwinIR")
    options = restore.RestoreOptions(scale=args.scale, tile=args.tile, overlap=args.overlap, sampling=args.sampling,
                                     seed=args.seed, color_fix=args.color_fix)
    device = torch.device(args.device)
    model = load(model_path, expect=Family.INFINITY).model
    if args.merge_lora:
        from .lora import merge_lora

        merge_lora(model)
    model.to(device)
    vae = load(vae_path, expect=Family.INFINITY_BSQ_VAE).model.to(device)
    swinir = load(swinir_path, expect=Family.SWINIR).model.to(device) if swinir_path else None
    if swinir_path is None:
        log.info("no SwinIR pre-cleaner (%s not found); restoring without it", OFFICIAL["swinir"])
    text = None
    if args.prompt.strip():
        t5_path = _find(folder, OFFICIAL["t5"], args.t5, required=True, what="T5 text encoder folder")
        text = text_lib.T5TextEncoder.from_folder(t5_path).encode([args.prompt], device=device)
        text = text_lib.TextCondition(text.kv_compact.to(device), text.lens)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for path in paths:
        rgb, alpha = image_io.split_alpha(image_io.load_image_file(path))
        h, w = rgb.shape[1:3]
        H, W = restore.output_size(h, w, options.scale)
        with tqdm(total=count_tiles(H, W, options.tile, options.overlap), desc=path.name, unit="tile",
                  disable=args.quiet) as bar, torch.inference_mode(), _autocast(device, args.dtype):
            y = restore.restore_image(model, vae, image_io.to_model(rgb), text=text, swinir=swinir, options=options,
                                      progress=lambda done, total: bar.update(done - bar.n))
        result = image_io.merge_alpha(image_io.from_model(y.float().cpu()), alpha)
        target = out / (path.stem + ".png")
        save_image(result, target)
        log.info("%s (%dx%d) -> %s (%dx%d)", path, w, h, target, W, H)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m var_core", description="VAR image restoration models")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("restore", help="one-step VARestorer super-resolution of images")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("-o", "--output", required=True, help="output folder (PNG files named after the inputs)")
    p.add_argument("--weights", help="folder with varestorer.pth, infinity_vae_d32reg.pth, "
                                     "general_swinir_v1.ckpt and flan-t5-xl/")
    p.add_argument("--scale", type=float, default=4.0, help="upscale factor, 0 < s <= 8 (default 4)")
    p.add_argument("--prompt", default="", help="text prompt (needs flan-t5-xl); empty = unconditional")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (image i of a folder uses the same seed)")
    p.add_argument("--sampling", choices=restore.SAMPLING_MODES, default="gumbel",
                   help="gumbel: the official sampling; argmax: deterministic")
    p.add_argument("--tile", type=int, default=512, help="tile size in output pixels (default 512)")
    p.add_argument("--overlap", type=int, default=64, help="tile overlap in output pixels (default 64)")
    p.add_argument("--color-fix", choices=("none", "wavelet", "adain"), default="none", help="colour correction")
    p.add_argument("--model", help="VARestorer weights file (overrides --weights)")
    p.add_argument("--vae", help="Infinity VAE weights file (overrides --weights)")
    p.add_argument("--swinir", help="SwinIR weights file (overrides --weights)")
    p.add_argument("--no-swinir", action="store_true", help="skip the SwinIR pre-cleaner")
    p.add_argument("--t5", help="flan-t5-xl folder (overrides --weights)")
    p.add_argument("--no-merge-lora", dest="merge_lora", action="store_false",
                   help="keep the LoRA adapters separate (slower; merged by default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="compute precision (auto: bf16 on CUDA GPUs that support it, else fp32)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_restore)
    p = sub.add_parser("info", help="detect checkpoint families and print their architecture")
    p.add_argument("files", nargs="+", help="weights files (.safetensors, .pth, .ckpt)")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("roundtrip", help="encode images into pyramid tokens and decode them again")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--vae", required=True, help="Infinity BSQ VAE weights (infinity_vae_d32reg.pth)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.set_defaults(func=cmd_roundtrip)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    except VARError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
