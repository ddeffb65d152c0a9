"""``train distill``: VARestorer's one-step student, distilled from the iterative Infinity teacher.

Paper: VARestorer (ICLR 2026), which fine-tunes Infinity with LoRA (Hu et al., ICLR 2022) into a
restorer that predicts every scale of the token pyramid in one forward pass; its authors released
inference only, so the training here is built from the paper's description.

* **Teacher**: the transformer of ``--teacher``, frozen. It scores a pyramid of bits teacher-forced
  (``trilinear`` next-scale inputs, block-causal mask), giving for every scale ``i`` the bit
  distribution ``p_T(b_i | b_<i)``. Which bits it is forced with is ``--teacher-context``:
  ``hq`` (the HQ image's bits, as the paper's teacher scores the HQ tokens; the default), ``lq``
  (the LQ image's bits: the distribution that the iterative restorer samples from,
  :func:`var_core.sampler.iterative_restore`, whenever the schedule has at most 10 scales) or
  ``student`` (the student's own hard bits, on-policy).
* **Student**: the same weights plus fresh **peft** LoRA adapters (``--lora-rank``, default 32, on
  ``--lora-targets``, default every projection of the self- and cross-attention, as the paper;
  :mod:`var_core.lora` layout, scale 1), fed the LQ pyramid (:func:`var_core.student.student_inputs`,
  the 'long' input with the full last-scale latent) with full cross-scale attention; one pass
  gives ``p_S(b_i | LQ)`` for every scale. Only the adapters train.
* **KL** (``--kl``) between the per-bit distributions, averaged over the ``d`` bits of a token (the
  KL of the token, whose bits are independent, divided by ``d``: the scale of the teacher's
  per-bit cross-entropy, comparable with the image MSE) and over tokens with ``--kl-weighting``
  (``tokens``: every token the same weight, so the fine scales dominate; ``scales``: every scale
  the same total weight).
  ``reverse`` = ``KL(p_S || p_T)`` (mode-seeking; the default), the choice of distribution matching
  distillation (DMD, Yin et al., CVPR 2024): DMD follows the gradient of the reverse KL between the
  one-step generator's output distribution and the teacher's, which for diffusion models needs a
  second, learnt score network for the student's distribution. Here both distributions are
  explicit products of Bernoullis, so the KL is exact per token and needs no such network. With
  ``student`` context, the sum over scales of ``KL(p_S(b_i) || p_T(b_i | b_<i))`` on one sample
  ``b`` of the student is the chain-rule estimate of the reverse KL of the whole pyramid (the
  student's scales are independent given the LQ input), the gradient through the sampled context
  being dropped as DMD drops the generator's gradient through its own sample's score; but from a
  cold start (adapters at zero, the student's first pyramids far from the data) the teacher then
  scores off-distribution contexts, and in our small CPU runs the student drifted away from the
  HQ bits (bit accuracy 0.60 against 0.82 with ``hq`` or ``lq`` context, image MSE 2x higher),
  hence the ``hq`` default; ``student`` suits fine-tuning a student that is already close.
  ``forward`` = ``KL(p_T || p_S)`` (mode-covering; with ``hq`` context the cross-entropy to the
  teacher's soft labels) behaved like ``reverse`` there.
* **Image losses** on the decoded pyramid: the student's bits are drawn (``--st-sampling gumbel``,
  the official Gumbel-argmax at temperature ``--tau`` 0.5, or ``argmax``), and the straight-through
  estimator ``hard + soft - soft.detach()`` carries the gradient of the pixels through the codes
  and the frozen VAE decoder to the logits. ``mse_weight * MSE(decoded, HQ)``, plus
  ``grad_weight`` times a multi-scale image-gradient L1 loss (a cheap, LPIPS-free perceptual proxy;
  off by default).

The total is ``kl_weight * KL + mse_weight * MSE + grad_weight * grad``. The text is the
unconditional embedding of the model (no captions). Output ``student.safetensors``: the official
``varestorer.pth`` layout with the LoRA adapters (:func:`.export.official_state_dict`).

Shapes: ``B`` batch, ``L`` tokens of the schedule, ``d`` bits per token, ``V = 2d``.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import save_file
from torch import nn

from .. import bsq_quant, lora as lora_lib
from ..bsq_vae import BSQVAE
from ..checkpoint import StateDict
from ..detect import Family
from ..errors import ParameterError
from ..infinity_model import Infinity
from ..loading import load
from ..student import GUMBEL_EPS, split_scales, student_inputs
from . import common, export
from .teacher import bit_pairs, flat_bits, frozen_vae, scale_weights, teacher_forced_logits, unconditional_text

log = logging.getLogger(__name__)

MODEL_FILE = "student.safetensors"
KL_DIRECTIONS = ("reverse", "forward")
CONTEXTS = ("hq", "lq", "student")
ST_SAMPLING = ("gumbel", "argmax")
# Every linear layer of the blocks' self- and cross-attention (the official inject_trainable_lora targets).
DEFAULT_TARGETS = ("sa.mat_qkv", "sa.proj", "ca.mat_q", "ca.mat_kv", "ca.proj")


@dataclass(frozen=True, kw_only=True)
class DistillOptions:
    """Loss settings of :class:`DistillTask` (module docstring)."""

    kl: str = "reverse"
    context: str = "hq"
    kl_weight: float = 1.0
    kl_weighting: str = "tokens"
    mse_weight: float = 1.0
    grad_weight: float = 0.0
    st_sampling: str = "gumbel"
    tau: float = 0.5

    def __post_init__(self):
        for name, flag, allowed in (("kl", "--kl", KL_DIRECTIONS), ("context", "--teacher-context", CONTEXTS),
                                    ("st_sampling", "--st-sampling", ST_SAMPLING)):
            if getattr(self, name) not in allowed:
                raise ParameterError(f"{flag} must be one of {allowed}, got {getattr(self, name)!r}")
        scale_weights([(1, 1, 1)], self.kl_weighting)  # validates the name
        weights = (self.kl_weight, self.mse_weight, self.grad_weight)
        if min(weights) < 0 or max(weights) <= 0:
            raise ParameterError("the loss weights (--kl-weight, --mse-weight, --grad-weight) must be >= 0, "
                                 "and one of them positive")
        if not self.tau > 0:
            raise ParameterError(f"--tau must be positive, got {self.tau}")


def lora_target_names(model: Infinity, suffixes) -> list[str]:
    """Full names of the linear layers of the blocks whose names end with one of ``suffixes``."""
    block_names = model.config.block_names
    names = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(name.startswith(b + ".") for b in block_names)
             and any(name.endswith("." + s) for s in suffixes)]
    if not names:
        raise ParameterError(f"no linear layer of the blocks matches the LoRA targets {list(suffixes)}; use names like "
                             f"{', '.join(DEFAULT_TARGETS)}")
    return names


def add_lora(model: Infinity, *, rank: int, targets=DEFAULT_TARGETS) -> list[nn.Parameter]:
    """Fresh peft LoRA adapters of ``rank`` (down: Kaiming-uniform, up: zero, so the output is unchanged)
    on the ``targets``; freezes everything else and returns the adapter parameters. In place."""
    if rank < 1:
        raise ParameterError(f"--lora-rank must be at least 1, got {rank}")
    adapters = {}
    for name in lora_target_names(model, targets):
        layer = model.get_submodule(name)
        down = torch.empty(rank, layer.in_features)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        adapters[name] = (down, torch.zeros(layer.out_features, rank))
    lora_lib.apply_lora(model, adapters)
    model.requires_grad_(False)
    params = []
    for layer in lora_lib.lora_layers(model).values():
        for p in (layer.lora_A[lora_lib.ADAPTER].weight, layer.lora_B[lora_lib.ADAPTER].weight):
            p.requires_grad_(True)
            params.append(p)
    return params


def gradient_loss(x: torch.Tensor, y: torch.Tensor, levels: int = 3) -> torch.Tensor:
    """L1 distance of the horizontal and vertical differences of ``x`` and ``y`` ``(B, 3, H, W)``
    at ``levels`` resolutions (halved by average pooling)."""
    total = x.new_zeros(())
    for level in range(levels):
        if level:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        for dim in (-1, -2):
            total = total + (x.diff(dim=dim) - y.diff(dim=dim)).abs().mean()
    return total / levels


def straight_through_bits(pairs_BLd2: torch.Tensor, sampling: str, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hard, st)`` bits ``(B, L, d)``: the drawn 0/1 bits, and ``hard + soft - soft.detach()``."""
    if sampling == "gumbel":
        u = torch.rand_like(pairs_BLd2)
        soft = F.softmax((pairs_BLd2 - torch.log(-torch.log(u + GUMBEL_EPS) + GUMBEL_EPS)) / tau, dim=-1)[..., 1]
    else:
        soft = F.softmax(pairs_BLd2, dim=-1)[..., 1]
    hard = (soft > 0.5).to(soft.dtype)
    return hard, hard + soft - soft.detach()


def per_scale(x_BLd: torch.Tensor, schedule) -> list[torch.Tensor]:
    """Sequence ``(B, L, d)`` -> per-scale ``(B, h, w, d)``."""
    return [rearrange(x, "B (h w) d -> B h w d", h=h, w=w)
            for (_, h, w), x in zip(schedule, split_scales(x_BLd, schedule))]


class DistillTask(common.TrainTask):
    """One-step student (LoRA) vs frozen teacher on ``batch["lq"]`` / ``batch["hq"]`` pairs."""

    name = "distill"

    def __init__(self, student: Infinity, teacher: Infinity, vae: BSQVAE, schedule,
                 options: DistillOptions = DistillOptions()):
        super().__init__()
        self.student, self.teacher, self.vae = student, teacher.eval().requires_grad_(False), vae
        self.schedule = [tuple(s) for s in schedule]
        self.options = options
        self.register_buffer("weights_L", scale_weights(self.schedule, options.kl_weighting), persistent=False)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        o, schedule = self.options, self.schedule
        hq = batch["hq"]
        with torch.no_grad():
            hq_bits = self.vae.encode(hq, schedule).bits
            lq_bits = self.vae.encode(batch["lq"], schedule).bits
        x_BLd = student_inputs(lq_bits, schedule)
        logits = self.student.forward_logits(x_BLd, unconditional_text(self.student, hq.shape[0]), schedule)
        pairs_S = bit_pairs(logits)
        hard, st = straight_through_bits(pairs_S, o.st_sampling, o.tau)
        terms = {"acc": (hard == flat_bits(hq_bits)).float().mean()}
        if o.kl_weight:
            context = {"hq": hq_bits, "lq": lq_bits}.get(o.context)
            if context is None:
                context = [b.to(torch.uint8) for b in per_scale(hard.detach(), schedule)]
            with torch.no_grad():
                logp_T = F.log_softmax(bit_pairs(teacher_forced_logits(self.teacher, context, schedule)), dim=-1)
            logp_S = F.log_softmax(pairs_S, dim=-1)
            if o.kl == "reverse":
                kl_BLd = (logp_S.exp() * (logp_S - logp_T)).sum(-1)
            else:
                kl_BLd = (logp_T.exp() * (logp_T - logp_S)).sum(-1)
            terms["kl"] = (kl_BLd.mean(-1) * self.weights_L).sum(-1).mean()
        loss = o.kl_weight * terms.get("kl", 0.0)
        if o.mse_weight or o.grad_weight:
            codes = bsq_quant.summed_codes(per_scale(st, schedule), schedule)
            image = self.vae.decoder(codes.squeeze(2)).float()
            terms["mse"] = (image - hq).pow(2).mean()
            loss = loss + o.mse_weight * terms["mse"]
            if o.grad_weight:
                terms["grad"] = gradient_loss(image, hq)
                loss = loss + o.grad_weight * terms["grad"]
        terms["loss"] = loss
        return terms

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        return {k: p for k, p in self.student.named_parameters() if p.requires_grad}

    def trainable_state(self) -> StateDict:
        return {k: p.detach().cpu() for k, p in self.lora_parameters().items()}

    def load_trainable_state(self, sd: StateDict) -> None:
        params = self.lora_parameters()
        if set(sd) != set(params):
            raise ParameterError("the saved LoRA adapters do not match this run's --lora-rank / --lora-targets; "
                                 "resume with the settings of the first run")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(sd[k])

    def save_model(self, out_dir: Path) -> list[Path]:
        path = out_dir / MODEL_FILE
        save_file(export.official_state_dict(self.student), path)
        return [path]


def build_student(teacher_path: str, *, rank: int, targets) -> tuple[Infinity, Infinity]:
    """``(student, teacher)``: the plain transformer of ``teacher_path`` frozen, and a copy with
    fresh LoRA adapters."""
    teacher = load(teacher_path, expect=Family.INFINITY).model.float()
    if teacher.lora_state != "none":
        raise ParameterError(f"{teacher_path} already has LoRA adapters; give the plain teacher (`train teacher` "
                             "output), or export a merged student first to distil from it")
    student = copy.deepcopy(teacher)
    add_lora(student, rank=rank, targets=targets)
    return student, teacher.eval().requires_grad_(False)


def run(args) -> int:
    """``train distill`` (arguments: :mod:`.cli`)."""
    from .cli import degradation_config

    distill_options = DistillOptions(kl=args.kl, context=args.teacher_context, kl_weight=args.kl_weight,
                                     kl_weighting=args.kl_weighting, mse_weight=args.mse_weight,
                                     grad_weight=args.grad_weight, st_sampling=args.st_sampling, tau=args.tau)

    def build() -> DistillTask:
        vae = frozen_vae(args.vae)
        torch.manual_seed(args.seed)
        student, teacher = build_student(args.teacher, rank=args.lora_rank, targets=tuple(args.lora_targets))
        schedule = common.crop_schedule(args.size)
        task = DistillTask(student, teacher, vae, schedule, distill_options)
        n = sum(p.numel() for p in task.lora_parameters().values())
        log.info("student: %d LoRA adapters of rank %d (%.2fM trainable parameters), %d scales up to %dx%d",
                 len(lora_lib.lora_layers(student)), args.lora_rank, n / 1e6, len(schedule), *schedule[-1][1:])
        return task

    return common.run_stage(args, build, what="student", model_file=MODEL_FILE, degradation=degradation_config(args),
                            hint=" (export it with `train export`)")
