"""``train evaluate``: PSNR / SSIM and time of a trained VARestorer student against its teacher.

The held-out protocol of the demo model card (``var_core/demo/MODEL_CARD.md``): each image of a
folder is centre-cropped to ``crop x crop`` (the high-quality target), made low-quality at
``crop / scale`` by one of

* ``bicubic``: antialiased bicubic downsampling only;
* ``degraded``: an isotropic Gaussian blur (``--blur-sigma``), bicubic downsampling, Gaussian
  noise (``--noise``, 0-255 scale) and JPEG (``--jpeg``), the steps of :mod:`.degrade` with fixed
  values,

then upsampled back by each method and compared with the target. Methods: ``bicubic``
upsampling; ``vae`` (the VAE round trip of the target, the ceiling of every token model);
``teacher`` (iterative next-scale restoration, greedy, :func:`var_core.restore.iterative_restore_image`);
``student`` (one-step, :func:`var_core.restore.restore_image`, argmax and the default Gumbel draw,
and argmax with the wavelet colour fix, which takes the low frequencies from the resized input).
Metrics are scikit-image's ``peak_signal_noise_ratio`` and ``structural_similarity`` on RGB in
[0, 1] (SSIM averaged over the channels); times are the summed wall-clock seconds of each
restorer over the images, measured in the same process, so their ratio is the speed-up.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import restore
from ..detect import Family
from ..errors import ParameterError, VARError
from ..image import load_image_file
from ..loading import load
from ..lora import merge_lora, strip_lora
from ..pyramid import decode_pyramid, encode_image
from ..sampler import SamplerOptions
from .data import image_files
from .degrade import add_noise, blur, gaussian_kernel, jpeg

log = logging.getLogger(__name__)

DEGRADATIONS = ("bicubic", "degraded")


def _metrics():
    try:
        from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    except ImportError:
        raise VARError("`train evaluate` measures with scikit-image: pip install -e '.[train]'") from None
    return peak_signal_noise_ratio, structural_similarity


def centre_crop(path: Path, crop: int) -> torch.Tensor:
    """The centre ``crop x crop`` of an image as ``(1, 3, crop, crop)`` in [0, 1]."""
    x_13HW = load_image_file(path)[..., :3].permute(0, 3, 1, 2)
    h, w = x_13HW.shape[-2:]
    if min(h, w) < crop:
        raise ParameterError(f"{path.name} is {w}x{h}, smaller than --crop {crop}; pick a smaller crop")
    top, left = (h - crop) // 2, (w - crop) // 2
    return x_13HW[..., top:top + crop, left:left + crop].float()


def low_quality(hq_13HW: torch.Tensor, scale: int, kind: str, *, blur_sigma: float, noise: float,
                jpeg_quality: int, seed: int) -> torch.Tensor:
    """The LQ input ``(1, 3, H / scale, W / scale)`` in [0, 1] for degradation ``kind``."""
    x_3HW = hq_13HW[0]
    if kind == "degraded":
        x_3HW = blur(x_3HW, gaussian_kernel(21, blur_sigma, blur_sigma))
    h, w = x_3HW.shape[-2:]
    x_3hw = F.interpolate(x_3HW[None], size=(h // scale, w // scale), mode="bicubic", antialias=True,
                          align_corners=False)[0].clamp(0, 1)
    if kind == "degraded":
        x_3hw = jpeg(add_noise(x_3hw, noise, torch.Generator().manual_seed(seed)), jpeg_quality)
    return x_3hw[None]


def run(args) -> int:
    """``train evaluate`` (arguments: :mod:`.cli`)."""
    psnr_fn, ssim_fn = _metrics()
    if args.crop % args.scale:
        raise ParameterError(f"--crop {args.crop} must be a multiple of --scale {args.scale}")
    torch.manual_seed(args.seed)
    vae = load(args.vae, expect=Family.INFINITY_BSQ_VAE).model.eval()
    student = load(args.student, expect=Family.INFINITY).model.eval()
    teacher = load(args.teacher or args.student, expect=Family.INFINITY).model.eval()
    if teacher.lora_state == "adapters":
        strip_lora(teacher)
    if student.lora_state == "adapters":
        merge_lora(student)
    paths = image_files(args.images)
    base = dict(scale=args.scale, tile=args.tile, overlap=args.overlap, seed=args.seed)
    greedy = SamplerOptions(cfg=1.0, top_k=1, seed=args.seed)
    methods = {
        "bicubic": lambda lq: F.interpolate(lq, scale_factor=args.scale, mode="bicubic", align_corners=False),
        "teacher (iterative, greedy)": lambda lq: restore.iterative_restore_image(
            teacher, vae, lq, options=restore.RestoreOptions(sampling="argmax", **base), sampler_options=greedy),
        "student (one-step, argmax)": lambda lq: restore.restore_image(
            student, vae, lq, options=restore.RestoreOptions(sampling="argmax", **base)),
        "student (one-step, gumbel)": lambda lq: restore.restore_image(
            student, vae, lq, options=restore.RestoreOptions(sampling="gumbel", **base)),
        "student (argmax, wavelet fix)": lambda lq: restore.restore_image(
            student, vae, lq, options=restore.RestoreOptions(sampling="argmax", color_fix="wavelet", **base)),
    }
    rows = []
    ceiling = {}  # image index -> its VAE round trip (the same for every degradation)
    for kind in args.degradations:
        scores = {name: [] for name in ["vae round trip (ceiling)", *methods]}
        seconds = dict.fromkeys(methods, 0.0)
        for i, path in enumerate(paths):
            hq_13HW = centre_crop(path, args.crop)
            lq_13hw = low_quality(hq_13HW, args.scale, kind, blur_sigma=args.blur_sigma, noise=args.noise,
                                  jpeg_quality=args.jpeg, seed=args.seed + i)
            target = hq_13HW[0].permute(1, 2, 0).numpy()
            outputs = {}
            with torch.inference_mode():
                if i not in ceiling:
                    ceiling[i] = decode_pyramid(vae, encode_image(vae, hq_13HW * 2 - 1)) * 0.5 + 0.5
                outputs["vae round trip (ceiling)"] = ceiling[i]
                for name, fn in methods.items():  # every method maps [-1, 1] to [-1, 1]
                    start = time.perf_counter()
                    y = fn(lq_13hw * 2 - 1)
                    seconds[name] += time.perf_counter() - start
                    outputs[name] = y * 0.5 + 0.5
            for name, y in outputs.items():
                out = y[0].float().clamp(0, 1).permute(1, 2, 0).numpy()
                scores[name].append((psnr_fn(target, out, data_range=1.0),
                                     ssim_fn(target, out, data_range=1.0, channel_axis=-1)))
        for name, values in scores.items():
            psnr, ssim = np.mean(values, axis=0)
            rows.append({"degradation": kind, "method": name, "psnr": round(float(psnr), 2),
                         "ssim": round(float(ssim), 4),
                         "seconds": round(seconds[name], 2) if name in seconds else None})
    teacher_s = sum(r["seconds"] for r in rows if r["method"] == "teacher (iterative, greedy)")
    student_s = sum(r["seconds"] for r in rows if r["method"] == "student (one-step, argmax)")
    print(f"{len(paths)} images, centre {args.crop}x{args.crop}, x{args.scale}, tiles {args.tile}/{args.overlap}")
    print(f"{'degradation':12s} {'method':30s} {'PSNR dB':>8s} {'SSIM':>7s} {'seconds':>8s}")
    for r in rows:
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.2f}"
        print(f"{r['degradation']:12s} {r['method']:30s} {r['psnr']:8.2f} {r['ssim']:7.4f} {secs:>8s}")
    print(f"one-step vs iterative time ratio (teacher s / student s): {teacher_s / student_s:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "teacher_over_student": teacher_s / student_s,
                                               "images": len(paths), "crop": args.crop, "scale": args.scale},
                                              indent=1))
    return 0
