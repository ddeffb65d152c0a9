"""``python -m var_core train {vae,teacher,distill,export,evaluate,photos,preview} ...``: the training command line.

The stages run in this order: ``vae`` (the BSQ tokenizer), ``teacher`` (the iterative Infinity
transformer on the VAE's tokens), ``distill`` (the one-step VARestorer student, LoRA on the
teacher), ``export`` (the student in the official ``varestorer.pth`` layout), ``evaluate`` (PSNR,
SSIM and time of the student, its teacher and bicubic on held-out images). ``preview`` writes
sample pairs of the degradation pipeline; ``photos`` writes scikit-image's bundled photographs.
Every training stage runs under ``torchrun`` too (``torchrun --nproc_per_node N -m var_core train
...``: PyTorch DDP, gloo on the CPU, nccl on CUDA).
The stage modules are imported only when their command runs.
"""

from __future__ import annotations

import argparse
import importlib

from . import preview
from .degrade import DegradationConfig

EPILOG = """\
a small model, end to end (scikit-image's photos; see `train preview` for the LQ images):
  python -m var_core train photos  -o photos/
  python -m var_core train vae     --data photos/ -o runs/vae
  python -m var_core train teacher --data photos/ --vae runs/vae/vae.safetensors -o runs/teacher
  python -m var_core train distill --data photos/ --vae runs/vae/vae.safetensors \\
                                   --teacher runs/teacher/teacher.safetensors -o runs/student
  python -m var_core train export runs/student/student.safetensors -o models/varestorer_demo
  python -m var_core restore LQ.png -o out/ --model models/varestorer_demo.safetensors \\
                             --vae runs/vae/vae.safetensors --tile 256
Distributed: torchrun --nproc_per_node 2 -m var_core train distill ...
Each run folder gets the model file, state.pth (resume with --resume), loss_log.jsonl (one JSON
line per step: step, loss terms, lr, time) and args.json."""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after each help text, except for required and unset options."""

    def _get_help_string(self, action):
        if action.required or action.default is None or action.default is False or action.default == "":
            return action.help
        return super()._get_help_string(action)


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _stage(name: str):
    def run(args) -> int:
        return importlib.import_module(f"{__package__}.{name}").run(args)

    return run


def _add_common(p: argparse.ArgumentParser, *, steps: int, batch: int, lr: float, size: int = 256) -> None:
    g = p.add_argument_group("data and output")
    g.add_argument("--data", required=True, help="folder of training images (searched recursively; random crops, "
                                                 "flips; a small folder is repeated with fresh crops)")
    g.add_argument("-o", "--out", dest="out_dir", required=True,
                   help="run folder: model file, state.pth, loss_log.jsonl, args.json")
    g.add_argument("--size", type=int, default=size,
                   help="square crop size in pixels, a multiple of 16 on an Infinity schedule; "
                        "restore with --tile of the same size")
    g.add_argument("--channel-shuffle", action="store_true",
                   help="shuffle the RGB channels of each crop (colour augmentation for a few photos)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=steps, help="optimiser steps in all")
    g.add_argument("--batch-size", type=int, default=batch, help="crops per process and micro-batch")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    g.add_argument("--lr", type=float, default=lr,
                   help="AdamW learning rate after the warm-up; cosine decay to 10%% at the end")
    g.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 = off")
    g.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 autocast on CUDA GPUs that support it, fp32 on the CPU")
    g.add_argument("--seed", type=int, default=0, help="seed of the initialisation, crops and sampling")
    g = p.add_argument_group("run")
    g.add_argument("--save-every", type=int, default=200,
                   help="steps between checkpoints (model file + state.pth; always at the end)")
    g.add_argument("--resume", action="store_true", help="continue from state.pth in the run folder (same settings)")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    g.add_argument("--device", default="", help="torch device (default: the local rank's GPU if any, else cpu)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _range(g, flag: str, default: tuple, kind, what: str) -> None:
    g.add_argument(flag, nargs=2, type=kind, metavar=("MIN", "MAX"), default=list(default),
                   help=what)


def degradation_config(args) -> DegradationConfig:
    """The :class:`DegradationConfig` of the ``train distill`` flags."""
    return DegradationConfig(blur_sigma=tuple(args.blur_sigma), downsample=tuple(args.downsample),
                             noise_sigma=tuple(args.noise), jpeg_quality=tuple(args.jpeg))


def _add_vae(sub) -> None:
    p = sub.add_parser("vae", help="train the BSQ multi-scale VAE (tokenizer)", description=(
        "Train Infinity's BSQ multi-scale VAE on crops of --data: L1 + MSE reconstruction and the BSQ commitment "
        "loss, straight-through over the residual pyramid of the crop's scale schedule. Writes vae.safetensors "
        "(official keys; `var_core.load` reads it as the Infinity BSQ VAE)."),
        formatter_class=_Formatter)
    g = p.add_argument_group("architecture")
    g.add_argument("--base-ch", type=int, default=48,
                   help="channels of the first level; base-ch x ch-mult must be multiples of 32 or 24, and 48 or more "
                        "keeps 2+ channels per GroupNorm group (1 per group loses flat colours)")
    g.add_argument("--ch-mult", type=_ints, default=[1, 1, 1, 1, 1],
                   help="channel multiplier of each of the 5 levels (official: 1,2,4,4,4)")
    g.add_argument("--codebook-dim", type=int, default=32, help="bits per token (official d32: 32)")
    g.add_argument("--num-res-blocks", type=int, default=1, help="residual blocks per level (official: 2)")
    g.add_argument("--mid-attention", action="store_true", help="spatial self-attention in the middle block")
    g = p.add_argument_group("loss")
    g.add_argument("--l1-weight", type=float, default=1.0, help="weight of the L1 reconstruction loss")
    g.add_argument("--mse-weight", type=float, default=1.0, help="weight of the MSE reconstruction loss")
    g.add_argument("--commit-weight", type=float, default=0.25, help="weight of the BSQ commitment loss")
    _add_common(p, steps=2000, batch=4, lr=1e-3)
    p.set_defaults(func=_stage("vae"))


def _add_teacher(sub) -> None:
    p = sub.add_parser("teacher", help="train the iterative Infinity transformer on the VAE's tokens", description=(
        "Train the Infinity transformer by next-scale prediction: bitwise cross-entropy, teacher-forced on the bits "
        "of HQ crops (trilinear next-scale inputs, block-causal mask), unconditional text. Writes teacher.safetensors "
        "(official keys; `var_core.load` reads it as the Infinity transformer; `restore --iterative --model` "
        "restores with it)."), formatter_class=_Formatter)
    p.add_argument("--vae", required=True, help="the BSQ VAE (`train vae` output or an official file)")
    g = p.add_argument_group("architecture")
    g.add_argument("--depth", type=int, default=6, help="transformer blocks")
    g.add_argument("--width", type=int, default=192, help="embedding width")
    g.add_argument("--heads", type=int, default=4, help="attention heads (width / heads: a multiple of 4)")
    g.add_argument("--mlp-ratio", type=float, default=4.0, help="MLP hidden width / width")
    g.add_argument("--text-channels", type=int, default=64,
                   help="text feature channels (prompts would need T5's 2048; training is unconditional)")
    g.add_argument("--text-maxlen", type=int, default=8, help="rows of the unconditional text embedding")
    p.add_argument("--scale-weighting", choices=("tokens", "scales"), default="tokens",
                   help="tokens: every token the same weight; scales: every scale the same weight")
    _add_common(p, steps=2000, batch=4, lr=1e-3)
    p.set_defaults(func=_stage("teacher"))


def _add_distill(sub) -> None:
    d = DegradationConfig()
    p = sub.add_parser("distill", help="distil the one-step VARestorer student (LoRA) from the teacher", description=(
        "VARestorer distillation: the student (teacher + peft LoRA) restores the LQ pyramid in one pass with full "
        "attention; losses: KL to the frozen teacher's per-scale bit distributions (teacher-forced, block-causal) "
        "and MSE of the decoded image to the HQ crop through a straight-through bit estimator. Only the LoRA "
        "adapters train. Writes student.safetensors (official varestorer.pth layout with LoRA keys). The direction "
        "and weighting of the KL are explained in var_core/training/distill.py."),
        formatter_class=_Formatter)
    p.add_argument("--vae", required=True, help="the BSQ VAE the teacher was trained with")
    p.add_argument("--teacher", required=True, help="the Infinity transformer (`train teacher` output)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-rank", type=int, default=32, help="rank of the adapters (32 in the paper)")
    g.add_argument("--lora-targets", type=_names, default=["sa.mat_qkv", "sa.proj", "ca.mat_q", "ca.mat_kv", "ca.proj"],
                   help="comma-separated ends of the block linear layers to adapt (all of the self- and "
                        "cross-attention)")
    g = p.add_argument_group("loss")
    g.add_argument("--kl", choices=("reverse", "forward"), default="reverse",
                   help="reverse: KL(student || teacher), mode-seeking (DMD-style); forward: KL(teacher || student)")
    g.add_argument("--teacher-context", choices=("hq", "lq", "student"), default="hq",
                   help="bits the teacher is teacher-forced with: the HQ image's, the LQ image's (the iterative "
                        "restorer's distribution), or the student's own (on-policy; unstable from a cold start)")
    g.add_argument("--kl-weight", type=float, default=1.0, help="weight of the KL loss (0 = off)")
    g.add_argument("--kl-weighting", choices=("tokens", "scales"), default="tokens",
                   help="tokens: every token the same weight; scales: every scale the same weight")
    g.add_argument("--mse-weight", type=float, default=1.0, help="weight of the decoded-image MSE to the HQ crop")
    g.add_argument("--grad-weight", type=float, default=0.0,
                   help="weight of a multi-scale image-gradient L1 loss (LPIPS-free perceptual proxy)")
    g.add_argument("--st-sampling", choices=("gumbel", "argmax"), default="gumbel",
                   help="how the straight-through bits are drawn (gumbel: the official sampling)")
    g.add_argument("--tau", type=float, default=0.5, help="Gumbel temperature of the straight-through soft bits")
    g = p.add_argument_group("degradation of the LQ input (official DiffBIR / VARestorer ranges by default)")
    _range(g, "--blur-sigma", d.blur_sigma, float, "Gaussian blur sigma in pixels")
    _range(g, "--downsample", d.downsample, float, "downsampling factor")
    _range(g, "--noise", d.noise_sigma, float, "Gaussian noise sigma on the 0-255 scale")
    _range(g, "--jpeg", d.jpeg_quality, int, "JPEG quality")
    _add_common(p, steps=1000, batch=4, lr=5e-4)
    p.set_defaults(func=_stage("distill"))


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a trained student as varestorer.pth-layout .pth and .safetensors",
                       description=(
        "Write the student in the official varestorer.pth layout (flat state dict: base weights plus "
        "lora_down/lora_up keys) as OUTPUT.pth (a plain dict of tensors) and OUTPUT.safetensors. Both are loaded "
        "back through var_core.load and checked against the source."),
                       formatter_class=_Formatter)
    p.add_argument("student", help="the student (`train distill` output: student.safetensors)")
    p.add_argument("-o", "--output", required=True, help="output path without suffix (.pth / .safetensors are added)")
    p.add_argument("--merge-lora", action="store_true",
                   help="fold the LoRA adapters into the base weights (a plain transformer file, smaller)")
    p.set_defaults(func=_stage("export"))


def _photos(args) -> int:
    from .data import skimage_photo_folder

    folder = skimage_photo_folder(args.output)
    print(f"{len(list(folder.glob('*.png')))} photographs in {folder}")
    return 0


def _add_photos(sub) -> None:
    p = sub.add_parser("photos", help="write scikit-image's bundled colour photographs (the demo model's data)",
                       description="Write the colour photographs that scikit-image bundles (no download; the "
                                   "`train` extra) as PNG files into a folder, for --data.",
                       formatter_class=_Formatter)
    p.add_argument("-o", "--output", required=True, help="folder to write the PNG files into")
    p.set_defaults(func=_photos)


def _add_evaluate(sub) -> None:
    from .evaluate import DEGRADATIONS

    p = sub.add_parser("evaluate", help="PSNR/SSIM and time of a student, its teacher and bicubic on held-out images",
                       description=(
        "Centre-crop each image, make it low-quality (x SCALE down; bicubic only or degraded), restore it with "
        "bicubic upsampling, the iterative teacher and the one-step student, and print PSNR, SSIM and seconds "
        "(needs scikit-image: the `train` extra)."), formatter_class=_Formatter)
    p.add_argument("--images", required=True, help="folder of held-out high-quality images (never the training ones)")
    p.add_argument("--vae", required=True, help="the BSQ VAE")
    p.add_argument("--student", required=True, help="the student (exported, LoRA unmerged or merged)")
    p.add_argument("--teacher", default="", help="the iterative teacher (default: the student with its LoRA stripped)")
    p.add_argument("--crop", type=int, default=256, help="centre crop of each image (the HQ target), pixels")
    p.add_argument("--scale", type=int, default=4, help="downsampling factor of the LQ input")
    p.add_argument("--degradations", nargs="+", choices=DEGRADATIONS, default=list(DEGRADATIONS),
                   help="LQ inputs to evaluate")
    p.add_argument("--blur-sigma", type=float, default=1.0, help="degraded: Gaussian blur sigma, HQ pixels")
    p.add_argument("--noise", type=float, default=5.0, help="degraded: Gaussian noise sigma, 0-255 scale")
    p.add_argument("--jpeg", type=int, default=75, help="degraded: JPEG quality")
    p.add_argument("--tile", type=int, default=128, help="restore tile, output pixels (the training crop size)")
    p.add_argument("--overlap", type=int, default=32, help="tile overlap, output pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise and of the Gumbel draw")
    p.add_argument("--json", default="", help="also write the table to this JSON file")
    p.set_defaults(func=_stage("evaluate"))


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``train`` and its stages to the ``python -m var_core`` subcommands."""
    p = subparsers.add_parser(
        "train", help="train the VAE, the teacher and the one-step student; export the student",
        description="Training of VARestorer's one-step student and, from scratch, of the BSQ VAE and the iterative "
                    "Infinity teacher it needs. Run the stages in order; `python -m var_core train STAGE --help` "
                    "lists each stage's options.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True, metavar="STAGE")
    _add_vae(sub)
    _add_teacher(sub)
    _add_distill(sub)
    _add_export(sub)
    _add_evaluate(sub)
    _add_photos(sub)
    preview.add_parser(sub)
    return p
