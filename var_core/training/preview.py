"""``python -m var_core train preview``: write sample HQ | LQ pairs of the training degradation.

Each output ``pair_NNN.png`` shows a random high-quality crop (left) beside its degraded copy
(right), exactly as :class:`.data.PairDataset` gives them to the trainer. With more pairs than
images, the images repeat with the next epoch's crops and degradations.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image

from ..errors import ParameterError
from .data import PairDataset


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``preview`` subcommand to ``subparsers`` (its default ``func`` is :func:`run`)."""
    p = subparsers.add_parser("preview", help="write sample HQ | LQ training pairs of the degradation pipeline")
    p.add_argument("--data", required=True, help="folder of training images (searched recursively)")
    p.add_argument("-o", "--output", required=True, help="output folder (pair_000.png, ...)")
    p.add_argument("--count", type=int, default=8, help="number of pairs (default 8)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--size", type=int, default=256, help="crop size in pixels (default 256)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Write ``args.count`` side-by-side pairs into ``args.output``; returns the exit status 0."""
    if args.count < 1:
        raise ParameterError(f"--count {args.count} must be at least 1")
    dataset = PairDataset(args.data, size=args.size, seed=args.seed)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(args.count):
        dataset.set_epoch(i // len(dataset))
        item = dataset[i % len(dataset)]
        pair_3HW = torch.cat([item["hq"], item["lq"]], dim=-1)
        arr_HW3 = rearrange(((pair_3HW + 1) * 127.5).round().clamp(0, 255).to(torch.uint8), "C H W -> H W C")
        path = out / f"pair_{i:03d}.png"
        Image.fromarray(np.ascontiguousarray(arr_HW3.numpy())).save(path)
        print(f"{path}  (HQ | LQ of {item['path']})")
    return 0
