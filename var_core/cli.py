"""Command line: ``python -m var_core {restore,sample,info,roundtrip} ...``.

* ``restore IMAGE... -o DIR --weights DIR``: one-step VARestorer super-resolution (x4 by default);
  ``--iterative`` restores with the iterative Infinity teacher instead (next-scale sampling).
* ``sample --prompt TEXT -o DIR --weights DIR``: Infinity text to image (next-scale sampling).
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
from . import pyramid, restore, sampler
from .detect import DESCRIPTIONS, Family
from .errors import VARError
from .loading import inspect, load
from .schedules import PIXEL_BUDGETS

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
OFFICIAL = {"model": "varestorer", "teacher": "infinity_2b_reg", "vae": "infinity_vae_d32reg",
            "swinir": "general_swinir_v1", "t5": "flan-t5-xl"}


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


def _weights_folder(args) -> Path | None:
    folder = Path(args.weights) if args.weights else None
    if folder is not None and not folder.is_dir():
        raise VARError(f"--weights {folder}: not a folder")
    return folder


def _teacher_path(folder: Path | None, explicit: str | None) -> Path:
    """The iterative Infinity teacher: ``--model`` or ``infinity_2b_reg`` in ``--weights``."""
    path = _find(folder, OFFICIAL["teacher"], explicit, required=False, what="Infinity model")
    if path is None:
        where = f"in {folder}" if folder else "(no --weights folder given)"
        raise VARError(f"Infinity model not found {where}: expected {OFFICIAL['teacher']}.pth or .safetensors; "
                       "pass --weights DIR or --model FILE (a varestorer.pth works too: its LoRA is stripped)")
    return path


def _load_teacher(path: Path, device: torch.device):
    """Load the teacher; a VARestorer file works too: its LoRA adapters are stripped (its base is Infinity-2B)."""
    from .lora import strip_lora

    model = load(path, expect=Family.INFINITY).model
    if model.lora_state == "adapters":
        log.info("%s has LoRA adapters (the VARestorer student): stripped, sampling with the Infinity base", path)
        strip_lora(model)
    return model.to(device)


def _t5_path(folder: Path | None, args, *prompts: str) -> Path | None:
    """The T5 folder when a prompt is not empty (checked before any model is loaded)."""
    if not any(p.strip() for p in prompts):
        return None
    return _find(folder, OFFICIAL["t5"], args.t5, required=True, what="T5 text encoder folder")


def _encode_prompts(t5_path: Path | None, prompts: list[str], device: torch.device) -> list:
    """T5 features of each prompt on ``device``, or None for an empty prompt (no T5 needed)."""
    from . import text as text_lib

    encoder = text_lib.T5TextEncoder.from_folder(t5_path) if t5_path is not None else None
    out = []
    for prompt in prompts:
        if not prompt.strip():
            out.append(None)
            continue
        text = encoder.encode([prompt], device=device)
        out.append(text_lib.TextCondition(text.kv_compact.to(device), text.lens))
    return out


def _sampler_options(args) -> sampler.SamplerOptions:
    return sampler.SamplerOptions(cfg=args.cfg, tau=args.tau, top_k=args.top_k, top_p=args.top_p,
                                  next_scale=args.next_scale, seed=args.seed)


def cmd_restore(args) -> int:
    from tqdm import tqdm

    folder = _weights_folder(args)
    paths = _images(args.inputs)
    device = torch.device(args.device)
    options = restore.RestoreOptions(scale=args.scale, tile=args.tile, overlap=args.overlap, sampling=args.sampling,
                                     seed=args.seed, color_fix=args.color_fix)
    sampler_options = _sampler_options(args) if args.iterative else None
    if args.iterative:
        model_path = _teacher_path(folder, args.model)
    else:
        model_path = _find(folder, OFFICIAL["model"], args.model, required=True, what="VARestorer model")
    vae_path = _find(folder, OFFICIAL["vae"], args.vae, required=True, what="Infinity VAE")
    swinir_path = None if args.no_swinir else _find(folder, OFFICIAL["swinir"], args.swinir, required=False, what="SwinIR")
    t5_path = _t5_path(folder, args, args.prompt)
    if args.iterative:
        model = _load_teacher(model_path, device)
    else:
        model = load(model_path, expect=Family.INFINITY).model
        if args.merge_lora:
            from .lora import merge_lora

            merge_lora(model)
        model.to(device)
    vae = load(vae_path, expect=Family.INFINITY_BSQ_VAE).model.to(device)
    swinir = load(swinir_path, expect=Family.SWINIR).model.to(device) if swinir_path else None
    if swinir_path is None:
        log.info("no SwinIR pre-cleaner (%s not found); restoring without it", OFFICIAL["swinir"])
    (text,) = _encode_prompts(t5_path, [args.prompt], device)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for path in paths:
        rgb, alpha = image_io.split_alpha(image_io.load_image_file(path))
        h, w = rgb.shape[1:3]
        H, W = restore.output_size(h, w, options.scale)
        steps = restore.count_steps(h, w, options, iterative=args.iterative)
        with tqdm(total=steps, desc=path.name, unit="scale" if args.iterative else "tile",
                  disable=args.quiet) as bar, torch.inference_mode(), _autocast(device, args.dtype):
            x = image_io.to_model(rgb)
            kwargs = dict(text=text, swinir=swinir, options=options, progress=lambda done, total: bar.update(done - bar.n))
            if args.iterative:
                y = restore.iterative_restore_image(model, vae, x, sampler_options=sampler_options, **kwargs)
            else:
                y = restore.restore_image(model, vae, x, **kwargs)
        result = image_io.merge_alpha(image_io.from_model(y.float().cpu()), alpha)
        target = out / (path.stem + ".png")
        save_image(result, target)
        log.info("%s (%dx%d) -> %s (%dx%d)", path, w, h, target, W, H)
    return 0


def cmd_sample(args) -> int:
    from tqdm import tqdm

    from .schedules import scale_schedule, schedule_pixels

    folder = _weights_folder(args)
    if args.batch < 1:
        raise VARError(f"--batch must be at least 1, got {args.batch}")
    options = _sampler_options(args)
    schedule = scale_schedule(args.aspect, args.pn)
    device = torch.device(args.device)
    model_path = _teacher_path(folder, args.model)
    vae_path = _find(folder, OFFICIAL["vae"], args.vae, required=True, what="Infinity VAE")
    t5_path = _t5_path(folder, args, args.prompt, args.negative_prompt)
    model = _load_teacher(model_path, device)
    vae = load(vae_path, expect=Family.INFINITY_BSQ_VAE).model.to(device)
    text, negative = _encode_prompts(t5_path, [args.prompt, args.negative_prompt], device)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    n = len(schedule)
    with tqdm(total=n * args.batch, desc="sample", unit="scale", disable=args.quiet) as bar, \
            torch.inference_mode(), _autocast(device, args.dtype):
        result = sampler.generate(model, vae, text, schedule, options, batch=args.batch, negative_text=negative,
                                  callback=lambda i, p: bar.update(i * n + p.index + 1 - bar.n), device=device)
    images = image_io.from_model(result.image.float().cpu())
    H, W = schedule_pixels(schedule)
    for i in range(args.batch):
        target = out / f"sample_{args.seed + i}.png"
        save_image(images[i : i + 1], target)
        log.info("%s (%dx%d, %d scales, seed %d)", target, W, H, n, args.seed + i)
    return 0


def _add_sampler_args(p, *, what: str) -> None:
    defaults = sampler.SamplerOptions()
    p.add_argument("--cfg", type=float, default=defaults.cfg, help=f"{what}classifier-free guidance (1 = off; default 3)")
    p.add_argument("--tau", type=float, default=defaults.tau, help=f"{what}sampling temperature (default 1)")
    p.add_argument("--top-k", type=int, default=defaults.top_k,
                   help=f"{what}top-k of each bit's two outcomes (1 = greedy; default 900 = off)")
    p.add_argument("--top-p", type=float, default=defaults.top_p, help=f"{what}top-p (0 = off; default 0.97)")
    p.add_argument("--next-scale", choices=("area", "trilinear"), default=defaults.next_scale,
                   help=f"{what}how the summed codes are resized into the next scale's input (default area)")


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
    p.add_argument("--iterative", action="store_true",
                   help="restore with the iterative Infinity teacher (infinity_2b_reg.pth in --weights, or --model; "
                        "a varestorer file has its LoRA stripped) instead of the one-step student; --sampling and "
                        "--no-merge-lora do not apply")
    _add_sampler_args(p, what="--iterative: ")
    p.set_defaults(func=cmd_restore)
    p = sub.add_parser("sample", help="Infinity text to image (iterative next-scale sampling)")
    p.add_argument("--prompt", default="", help="text prompt (needs flan-t5-xl); empty = unconditional")
    p.add_argument("--negative-prompt", default="", help="negative prompt (needs flan-t5-xl); empty = the model's own")
    p.add_argument("-o", "--output", required=True, help="output folder (PNG files sample_SEED.png)")
    p.add_argument("--weights", help="folder with infinity_2b_reg.pth, infinity_vae_d32reg.pth and flan-t5-xl/")
    p.add_argument("--seed", type=int, default=0, help="seed; image i of the batch uses seed + i")
    _add_sampler_args(p, what="")
    p.add_argument("--aspect", type=float, default=1.0,
                   help="height / width; the nearest Infinity template is used (default 1.0)")
    p.add_argument("--pn", choices=tuple(PIXEL_BUDGETS), default="1M",
                   help="pixel budget (1M: about 1024x1024; default 1M)")
    p.add_argument("--batch", type=int, default=1, help="number of images (default 1)")
    p.add_argument("--model", help="Infinity weights file (overrides --weights)")
    p.add_argument("--vae", help="Infinity VAE weights file (overrides --weights)")
    p.add_argument("--t5", help="flan-t5-xl folder (overrides --weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="compute precision (auto: bf16 on CUDA GPUs that support it, else fp32)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sample)
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
