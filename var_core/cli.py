"""Command line: ``python -m var_core {restore,sample,info,roundtrip,train} ...``.

* ``restore IMAGE... -o DIR --weights DIR``: one-step VARestorer super-resolution (x4 by default;
  without ``--weights``/``--model`` the small demo model of :mod:`var_core.demo` is used);
  ``--iterative`` restores with the iterative Infinity teacher instead (next-scale sampling).
  ``--model`` may also be a VARSR or RestoreVAR file (detected from its keys), restored through
  the same tiles with its VQVAE (``--vae``).
* ``sample --prompt TEXT -o DIR --weights DIR``: Infinity text to image (next-scale sampling);
  ``sample --model var_d16.pth --vae vae_ch160v4096z32.pth --class N``: class-conditional VAR.
* ``info FILE...``: detect each checkpoint's family and print the architecture read from it.
* ``roundtrip IMAGE... --vae FILE -o DIR``: encode images into pyramid tokens with an Infinity BSQ
  VAE and decode them again (shows what the token pyramid preserves).
* ``train {vae,teacher,distill,export,preview} ...``: training (:mod:`.training.cli`).
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
from . import family_restore, pyramid, restore, sampler
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
            "swinir": "general_swinir_v1", "t5": "flan-t5-xl", "var": "var_d16"}
# The VQVAE each VAR-family transformer decodes with (its official file stem, looked up in --weights).
OFFICIAL_VQVAE = {Family.VARSR: "VQVAE", Family.RESTOREVAR: "vae_restorevar", Family.VAR: "vae_ch160v4096z32"}
# Defaults that depend on the model family (argparse default None = "the family's").
FAMILY_SCALE = {Family.INFINITY: 4.0, Family.VARSR: 4.0, Family.RESTOREVAR: 1.0}
VARSR_DEFAULTS = family_restore.VARSROptions()
VAR_DEFAULTS = {"cfg": 4.0, "top_k": 900, "top_p": 0.95}  # the official VAR demo


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


def _autocast(device: torch.device, dtype: str, *, auto_bf16: bool = True):
    """bf16 autocast for ``--dtype bf16``, and for ``auto`` on CUDA GPUs that support it when
    ``auto_bf16`` (the Infinity models; VAR, VARSR and RestoreVAR run in fp32 unless asked)."""
    use_bf16 = dtype == "bf16" or (dtype == "auto" and auto_bf16 and device.type == "cuda"
                                   and torch.cuda.is_bf16_supported())
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


def _load_teacher(path: Path, device: torch.device, sd=None):
    """Load the teacher (from ``sd`` when the file was read already); a VARestorer file works too:
    its LoRA adapters are stripped (its base is Infinity-2B)."""
    from .lora import strip_lora

    model = load(path if sd is None else sd, expect=Family.INFINITY).model
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


def _or(value, default):
    return default if value is None else value


def _sampler_options(args) -> sampler.SamplerOptions:
    d = sampler.SamplerOptions()
    return sampler.SamplerOptions(cfg=_or(args.cfg, d.cfg), tau=args.tau, top_k=_or(args.top_k, d.top_k),
                                  top_p=_or(args.top_p, d.top_p), next_scale=args.next_scale, seed=args.seed)


def _model_family(path: Path):
    """``(family, state dict)`` of a transformer file (read once, then built from the state dict)."""
    family, sd = inspect(path)
    if family == Family.VAR:
        raise VARError(
            f"{path.name} is the {DESCRIPTIONS[family]}: it generates images of a class and does not restore. "
            "`restore` takes VARestorer, VARSR or RestoreVAR; generate with "
            "`sample --model FILE --vae VQVAE_FILE --class N`"
        )
    if family not in family_restore.RESTORE_FAMILIES:
        raise VARError(f"{path.name} is the {DESCRIPTIONS[family]}, not a restoration transformer; pass the "
                       "VARestorer, VARSR or RestoreVAR weights as --model")
    return family, sd


def _family_restorer(args, family: str, sd, model_path: Path, folder: Path | None, device: torch.device):
    """A ``restore(x, progress)`` for VARSR / RestoreVAR with its VQVAE (``--vae`` or the official
    file in ``--weights``), and the restore options."""
    name = "VARSR" if family == Family.VARSR else "RestoreVAR"
    vae_path = _find(folder, OFFICIAL_VQVAE[family], args.vae, required=True, what=f"{name} VQVAE")
    for flag, used in (("--prompt", bool(args.prompt.strip())), ("--swinir", bool(args.swinir))):
        if used:
            raise VARError(f"{flag} is for VARestorer / Infinity; {model_path.name} is {name}")
    whole_fix, tile_adain = family_restore.resolve_color_fix(family, args.color_fix)
    options = restore.RestoreOptions(scale=_or(args.scale, FAMILY_SCALE[family]), tile=args.tile, overlap=args.overlap,
                                     seed=args.seed, color_fix=whole_fix)
    model = load(sd).model.to(device)
    vqvae = load(vae_path, expect=Family.VAR_VQVAE).model.to(device)
    family_restore.check_restorer(family, vqvae)
    if family == Family.VARSR:
        varsr = family_restore.VARSROptions(cfg=_or(args.cfg, VARSR_DEFAULTS.cfg), steps=args.refiner_steps,
                                            top_k=_or(args.top_k, VARSR_DEFAULTS.top_k),
                                            top_p=_or(args.top_p, VARSR_DEFAULTS.top_p), tile_adain=tile_adain)

        def run(x, progress):
            return family_restore.varsr_restore_image(model, vqvae, x, options=options, varsr=varsr,
                                                      progress=progress, device=device)
    else:
        def run(x, progress):
            return family_restore.restorevar_restore_image(model, vqvae, x, options=options,
                                                           refine=False if args.no_refine else None,
                                                           progress=progress, device=device)
    log.info("%s: %s with %s, scale %g, %d px tiles", model_path.name, DESCRIPTIONS[family], vae_path.name,
             options.scale, options.tile)
    return run, options


def _use_demo_model(args) -> None:
    """With no weights given (no ``--weights``, ``--model`` or ``--vae``), restore with the demo
    model shipped in :mod:`var_core.demo` and say so. Fills in the tile and overlap defaults (and the
    demo's colour fix for ``auto``)."""
    tile, overlap = 512, 64
    if not (args.weights or args.model or args.vae):
        from . import demo

        missing = demo.missing_files()
        if missing:
            raise VARError(f"no weights given and the demo model is missing from this install ({missing[0]}); "
                           "pass --weights DIR with the official varestorer.pth and infinity_vae_d32reg.pth")
        log.warning("No weights given (--weights/--model): restoring with the small DEMO model shipped with the "
                    "pack (%s; trained on a CPU on 7 photos, see MODEL_CARD.md there). For real restorations "
                    "download the official varestorer.pth and infinity_vae_d32reg.pth and pass --weights DIR.",
                    demo.DEMO_DIR)
        args.model, args.vae = str(demo.STUDENT), str(demo.VAE)
        tile, overlap = demo.TILE, demo.OVERLAP
        if args.color_fix == "auto":
            args.color_fix = demo.COLOR_FIX
    args.tile = tile if args.tile is None else args.tile
    args.overlap = overlap if args.overlap is None else args.overlap


def cmd_restore(args) -> int:
    from tqdm import tqdm

    _use_demo_model(args)
    folder = _weights_folder(args)
    paths = _images(args.inputs)
    device = torch.device(args.device)
    if args.iterative:
        model_path = _teacher_path(folder, args.model)
        family, sd = Family.INFINITY, None
    else:
        model_path = _find(folder, OFFICIAL["model"], args.model, required=True, what="VARestorer model")
        family, sd = _model_family(model_path)
    if family == Family.INFINITY:
        run, options = _infinity_restorer(args, sd, model_path, folder, device)
    else:
        run, options = _family_restorer(args, family, sd, model_path, folder, device)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    iterative = family == Family.INFINITY and args.iterative
    for path in paths:
        rgb, alpha = image_io.split_alpha(image_io.load_image_file(path))
        h, w = rgb.shape[1:3]
        H, W = restore.output_size(h, w, options.scale)
        steps = restore.count_steps(h, w, options, iterative=iterative)
        with tqdm(total=steps, desc=path.name, unit="scale" if iterative else "tile",
                  disable=args.quiet) as bar, torch.inference_mode(), \
                _autocast(device, args.dtype, auto_bf16=family == Family.INFINITY):
            y = run(image_io.to_model(rgb), lambda done, total: bar.update(done - bar.n))
        result = image_io.merge_alpha(image_io.from_model(y.float().cpu()), alpha)
        target = out / (path.stem + ".png")
        save_image(result, target)
        log.info("%s (%dx%d) -> %s (%dx%d)", path, w, h, target, W, H)
    return 0


def _infinity_restorer(args, sd, model_path: Path, folder: Path | None, device: torch.device):
    """A ``restore(x, progress)`` for the VARestorer student (or the iterative teacher), and its options."""
    whole_fix, _ = family_restore.resolve_color_fix(Family.INFINITY, args.color_fix)
    options = restore.RestoreOptions(scale=_or(args.scale, FAMILY_SCALE[Family.INFINITY]), tile=args.tile,
                                     overlap=args.overlap, sampling=args.sampling, seed=args.seed, color_fix=whole_fix,
                                     tile_batch=args.tile_batch, compile=args.compile)
    sampler_options = _sampler_options(args) if args.iterative else None
    vae_path = _find(folder, OFFICIAL["vae"], args.vae, required=True, what="Infinity VAE")
    swinir_path = None if args.no_swinir else _find(folder, OFFICIAL["swinir"], args.swinir, required=False, what="SwinIR")
    t5_path = _t5_path(folder, args, args.prompt)
    if args.iterative:
        model = _load_teacher(model_path, device)
    else:
        model = load(sd).model
        if args.merge_lora:
            from .lora import merge_lora

            merge_lora(model)
        model.to(device)
    vae = load(vae_path, expect=Family.INFINITY_BSQ_VAE).model.to(device)
    swinir = load(swinir_path, expect=Family.SWINIR).model.to(device) if swinir_path else None
    if swinir_path is None:
        log.info("no SwinIR pre-cleaner (%s not found); restoring without it", OFFICIAL["swinir"])
    (text,) = _encode_prompts(t5_path, [args.prompt], device)

    def run(x, progress):
        kwargs = dict(text=text, swinir=swinir, options=options, progress=progress)
        if args.iterative:
            return restore.iterative_restore_image(model, vae, x, sampler_options=sampler_options, **kwargs)
        return restore.restore_image(model, vae, x, **kwargs)

    return run, options


def cmd_sample(args) -> int:
    from tqdm import tqdm

    from .schedules import scale_schedule, schedule_pixels

    folder = _weights_folder(args)
    if args.batch < 1:
        raise VARError(f"--batch must be at least 1, got {args.batch}")
    sd = None
    if args.model or args.class_index is not None:
        model_path = _find(folder, OFFICIAL["var"], args.model, required=True,
                           what="VAR model" if args.model is None else "model")
        family, sd = inspect(model_path)
        if family == Family.VAR:
            return _sample_class(args, folder, model_path, sd)
        if args.class_index is not None:
            raise VARError(f"--class is for the class-conditional VAR (var_d16.pth ...); {model_path.name} is the "
                           f"{DESCRIPTIONS[family]}")
        if family != Family.INFINITY:
            raise VARError(f"{model_path.name} is the {DESCRIPTIONS[family]}; `sample` generates with the Infinity "
                           "transformer (text to image) or the class-conditional VAR (--class N)")
    else:
        model_path = _teacher_path(folder, args.model)
    options = _sampler_options(args)
    schedule = scale_schedule(args.aspect, args.pn)
    device = torch.device(args.device)
    vae_path = _find(folder, OFFICIAL["vae"], args.vae, required=True, what="Infinity VAE")
    t5_path = _t5_path(folder, args, args.prompt, args.negative_prompt)
    model = _load_teacher(model_path, device, sd)
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


def _sample_class(args, folder: Path | None, model_path: Path, sd) -> int:
    """``sample`` with the class-conditional VAR: ``--class N`` (negative: unconditional), its VQVAE."""
    from tqdm import tqdm

    if args.class_index is None:
        raise VARError(f"{model_path.name} is the class-conditional VAR: give the class to draw with --class N "
                       "(an ImageNet index 0..999 for the released models; -1 = unconditional)")
    if args.prompt.strip() or args.negative_prompt.strip():
        raise VARError(f"{model_path.name} is the class-conditional VAR: it takes --class, not a prompt")
    vae_path = _find(folder, OFFICIAL_VQVAE[Family.VAR], args.vae, required=True, what="VAR VQVAE")
    device = torch.device(args.device)
    model = load(sd).model.to(device)
    vqvae = load(vae_path, expect=Family.VAR_VQVAE).model.to(device)
    cfg, top_k, top_p = (_or(args.cfg, VAR_DEFAULTS["cfg"]), _or(args.top_k, VAR_DEFAULTS["top_k"]),
                         _or(args.top_p, VAR_DEFAULTS["top_p"]))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=args.batch, desc="sample", unit="image", disable=args.quiet) as bar, torch.inference_mode(), \
            _autocast(device, args.dtype, auto_bf16=False):
        images = family_restore.generate_class_images(
            model, vqvae, args.class_index, batch=args.batch, seed=args.seed, cfg=cfg, top_k=top_k, top_p=top_p,
            more_smooth=args.more_smooth, progress=lambda done, total: bar.update(done - bar.n))
    images = image_io.from_model(images.float().cpu())
    H, W = images.shape[1:3]
    for i in range(args.batch):
        target = out / f"sample_{args.seed + i}.png"
        save_image(images[i : i + 1], target)
        log.info("%s (%dx%d, class %d, cfg %g, seed %d)", target, W, H, args.class_index, cfg, args.seed + i)
    return 0


def _add_sampler_args(p, *, what: str, family_defaults: str = "") -> None:
    """--cfg, --tau, --top-k, --top-p, --next-scale. --cfg/--top-k/--top-p default to None: the
    model family's own defaults (Infinity's below; ``family_defaults`` names the others')."""
    defaults = sampler.SamplerOptions()
    p.add_argument("--cfg", type=float, default=None,
                   help=f"{what}classifier-free guidance (1 = off; default {defaults.cfg:g}{family_defaults and '; '}"
                        f"{family_defaults})")
    p.add_argument("--tau", type=float, default=defaults.tau, help=f"{what}sampling temperature (default 1)")
    p.add_argument("--top-k", type=int, default=None,
                   help=f"{what}top-k (1 = greedy; Infinity: of each bit's two outcomes, default {defaults.top_k} = off)")
    p.add_argument("--top-p", type=float, default=None, help=f"{what}top-p (0 = off; Infinity default {defaults.top_p})")
    p.add_argument("--next-scale", choices=("area", "trilinear"), default=defaults.next_scale,
                   help=f"{what}how the summed codes are resized into the next scale's input (default area)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m var_core", description="VAR image restoration models")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("restore", help="restore images: VARestorer one-step (default), VARSR or RestoreVAR (--model)")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("-o", "--output", required=True, help="output folder (PNG files named after the inputs)")
    p.add_argument("--weights", help="folder with varestorer.pth, infinity_vae_d32reg.pth, "
                                     "general_swinir_v1.ckpt and flan-t5-xl/")
    p.add_argument("--scale", type=float, default=None,
                   help="upscale factor, 0 < s <= 8 (default 4; RestoreVAR: 1, it restores at the input size)")
    p.add_argument("--prompt", default="", help="text prompt (needs flan-t5-xl); empty = unconditional")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (image i of a folder uses the same seed)")
    p.add_argument("--sampling", choices=restore.SAMPLING_MODES, default="gumbel",
                   help="gumbel: the official sampling; argmax: deterministic")
    p.add_argument("--tile", type=int, default=None,
                   help="tile size in output pixels (default 512; the demo model: 128)")
    p.add_argument("--overlap", type=int, default=None,
                   help="tile overlap in output pixels (default 64; the demo model: 32)")
    p.add_argument("--tile-batch", type=int, default=0,
                   help="VARestorer: tiles per transformer pass (0: 4 on CUDA, 1 on the CPU; same result)")
    p.add_argument("--compile", action="store_true",
                   help="VARestorer: run the transformer through torch.compile (first run compiles; falls back "
                        "if compiling fails)")
    p.add_argument("--color-fix", choices=family_restore.COLOR_FIX_CHOICES, default="auto",
                   help="colour correction of the whole image; auto = the model's official one (VARSR: AdaIN per "
                        "tile; VARestorer, RestoreVAR: none; the demo model: wavelet)")
    p.add_argument("--model", help="restoration transformer file (overrides --weights): VARestorer (varestorer.pth), "
                                   "VARSR (VARSR.pth) or RestoreVAR (restorevar.pth), detected from its keys")
    p.add_argument("--vae", help="the model's VAE (overrides --weights): the Infinity VAE for VARestorer, the VQVAE "
                                 "for VARSR (VQVAE.pth) or RestoreVAR (vae_restorevar.ckpt)")
    p.add_argument("--swinir", help="SwinIR weights file (overrides --weights)")
    p.add_argument("--no-swinir", action="store_true", help="skip the SwinIR pre-cleaner")
    p.add_argument("--t5", help="flan-t5-xl folder (overrides --weights)")
    p.add_argument("--no-merge-lora", dest="merge_lora", action="store_false",
                   help="keep the LoRA adapters separate (slower; merged by default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="compute precision (auto: bf16 on CUDA GPUs that support it for VARestorer/Infinity, "
                        "fp32 for VARSR and RestoreVAR and on the CPU)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--refiner-steps", type=int, default=VARSR_DEFAULTS.steps,
                   help=f"VARSR: diffusion refiner steps (default {VARSR_DEFAULTS.steps})")
    p.add_argument("--no-refine", action="store_true", help="RestoreVAR: skip the latent refiner")
    p.add_argument("--iterative", action="store_true",
                   help="restore with the iterative Infinity teacher (infinity_2b_reg.pth in --weights, or --model; "
                        "a varestorer file has its LoRA stripped) instead of the one-step student; --sampling and "
                        "--no-merge-lora do not apply")
    _add_sampler_args(p, what="--iterative and VARSR: ",
                      family_defaults=f"VARSR: cfg {VARSR_DEFAULTS.cfg:g}, top-k {VARSR_DEFAULTS.top_k}, "
                                      f"top-p {VARSR_DEFAULTS.top_p}")
    p.set_defaults(func=cmd_restore)
    p = sub.add_parser("sample", help="Infinity text to image, or class-conditional VAR (--class N)")
    p.add_argument("--prompt", default="", help="text prompt (needs flan-t5-xl); empty = unconditional")
    p.add_argument("--negative-prompt", default="", help="negative prompt (needs flan-t5-xl); empty = the model's own")
    p.add_argument("-o", "--output", required=True, help="output folder (PNG files sample_SEED.png)")
    p.add_argument("--weights", help="folder with infinity_2b_reg.pth, infinity_vae_d32reg.pth and flan-t5-xl/")
    p.add_argument("--seed", type=int, default=0, help="seed; image i of the batch uses seed + i")
    _add_sampler_args(p, what="", family_defaults="VAR: cfg {cfg:g}, top-k {top_k}, top-p {top_p}".format(**VAR_DEFAULTS))
    p.add_argument("--class", dest="class_index", type=int, default=None,
                   help="class index for the class-conditional VAR (--model var_d16.pth; -1 = unconditional); "
                        "with it --model defaults to var_d16 in --weights and --vae to vae_ch160v4096z32")
    p.add_argument("--more-smooth", action="store_true", help="VAR: the official Gumbel-softmax smoothing option")
    p.add_argument("--aspect", type=float, default=1.0,
                   help="height / width; the nearest Infinity template is used (default 1.0)")
    p.add_argument("--pn", choices=tuple(PIXEL_BUDGETS), default="1M",
                   help="pixel budget (1M: about 1024x1024; default 1M)")
    p.add_argument("--batch", type=int, default=1, help="number of images (default 1)")
    p.add_argument("--model", help="Infinity weights file, or a class-conditional VAR (var_d16.pth; detected from "
                                   "its keys) (overrides --weights)")
    p.add_argument("--vae", help="Infinity VAE weights file, or the VAR VQVAE (vae_ch160v4096z32.pth) "
                                 "(overrides --weights)")
    p.add_argument("--t5", help="flan-t5-xl folder (overrides --weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="compute precision (auto: bf16 on CUDA GPUs that support it for Infinity, fp32 for VAR "
                        "and on the CPU)")
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
    from .training.cli import add_parser as add_train_parser

    add_train_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    except VARError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
