"""Command line: ``python -m var_core {info,roundtrip} ...``.

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
from . import pyramid
from .detect import DESCRIPTIONS, Family
from .errors import VARError
from .loading import inspect, load

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m var_core", description="VAR image restoration models")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
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
