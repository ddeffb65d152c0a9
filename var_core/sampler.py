"""Next-scale autoregressive sampling of Infinity, the iterative teacher of VARestorer.

Papers: Han et al., "Infinity: Scaling Bitwise AutoRegressive Modeling for High-Resolution Image
Synthesis" (CVPR 2025); VARestorer (ICLR 2026), which distils this iterative sampler into a
one-step student (:mod:`.student`) and compares with it. Upstream: ``Infinity.autoregressive_infer_cfg``
and ``sample_with_top_k_top_p_also_inplace_modifying_logits_`` of ``infinity/models/infinity.py``,
and the kv cache of ``infinity/models/basic.py``, in EternalEvan/VARestorer (commit e089b6e).

Scale ``i`` of the schedule is predicted from the tokens of scales ``0..i`` (scale 0 is ``sos``,
the pooled text); the keys/values of earlier scales come from a :class:`.kv_cache.KVCache`, so
each step runs only the new scale's tokens, at their RoPE positions in the whole sequence (the
same positions as teacher forcing with the block-causal mask; the official non-fused-norm block
path drops the scale index and would rotate every scale as if it started the sequence). Every
bit of every token has two logits; they are guided (classifier-free guidance, ``cfg * cond + (1 - cfg) * uncond``), divided
by the scale's temperature ``tau``, filtered (top-k, top-p) and sampled. The sampled codes are
summed on the last scale's grid (``trilinear``) and resized to the next scale (``area`` in
VARestorer's copy of the sampler, ``trilinear`` in FoundationVision/Infinity's) as its input.

:func:`generate` is text to image (one seeded sampling per image, decoded by the VAE);
:func:`iterative_restore` restores an LQ image sized to a schedule (the any-size, tiled version
is :func:`.restore.iterative_restore_image`); :func:`codes_preview` is a cheap false-colour view
of the codes summed so far, for progress previews.

Shapes: ``B`` batch, ``l`` tokens of one scale (``h*w``), ``d`` bits per token, ``V = 2d``
logits per token, ``C`` width, ``H x W`` the last scale; bits are ``(B, h, w, d)`` MSB-first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

from . import bsq_quant, student
from .bsq_vae import BSQVAE
from .errors import ParameterError, VARError
from .infinity_blocks import TextState
from .infinity_model import Infinity, TextCondition
from .kv_cache import KVCache

LQ_INPUT_SCALES = 10  # official constant of autoregressive_infer_cfg_w_lq_token ("if si < 10")


class SamplingInterrupted(VARError):
    """``check_interrupt`` asked to stop between two scales."""


def _per_scale(value, name: str) -> tuple[float, ...]:
    values = (value,) if isinstance(value, (int, float)) else value
    if not isinstance(values, (tuple, list)) or not values or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ParameterError(f"{name} must be a number or a non-empty list of numbers, got {value!r}")
    return tuple(float(v) for v in values)


@dataclass(frozen=True, kw_only=True)
class SamplerOptions:
    """Settings of :func:`sample` (defaults: ``tools/run_varestorer.py`` of the official code).

    ``cfg`` and ``tau``: one value, or one per scale (at least as many as the schedule has).
    ``cfg_insertion_layer``: where guidance mixes the conditional and unconditional rows: ``0``
    on the logits, ``-k`` on the output of block ``depth - k`` (both may be given). ``top_k``
    keeps the ``k`` largest of each bit's two logits (0: off; 1: greedy argmax, no randomness);
    ``top_p`` keeps the smallest set of outcomes whose probability exceeds ``top_p`` (0: off).
    ``next_scale``: how the summed codes are resized to the next scale's input. ``seed``: of
    the ``torch.Generator`` on the model's device (None: torch's global generator).
    """

    cfg: float | tuple[float, ...] = 3.0
    tau: float | tuple[float, ...] = 1.0
    cfg_insertion_layer: tuple[int, ...] = (0,)
    top_k: int = 900
    top_p: float = 0.97
    next_scale: str = "area"
    seed: int | None = 0

    def __post_init__(self):
        cfg, tau = _per_scale(self.cfg, "cfg"), _per_scale(self.tau, "tau")
        if any(not c >= 0 for c in cfg):
            raise ParameterError(f"cfg must be >= 0 (1 = no guidance), got {self.cfg}")
        if any(not t > 0 for t in tau):
            raise ParameterError(f"tau (temperature) must be > 0, got {self.tau}")
        layers = (self.cfg_insertion_layer,) if isinstance(self.cfg_insertion_layer, int) else self.cfg_insertion_layer
        try:
            layers = tuple(int(x) for x in layers)
        except (TypeError, ValueError, OverflowError):
            layers = ()
        if not layers or any(x > 0 for x in layers):
            raise ParameterError(f"cfg_insertion_layer must be 0 (on the logits) or negative (a block output), "
                                 f"got {self.cfg_insertion_layer}; the official 1 ('on probs') is never applied")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ParameterError(f"top_k must be an integer >= 0 (0 = off, 1 = greedy), got {self.top_k!r}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ParameterError(f"top_p must be in [0, 1] (0 = off), got {self.top_p}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**64):
            raise ParameterError(f"seed must be None or an integer in [0, 2**64), got {self.seed!r}")
        if self.next_scale not in bsq_quant.NEXT_SCALE_MODES:
            raise ParameterError(f"next_scale must be one of {bsq_quant.NEXT_SCALE_MODES}, got {self.next_scale!r}")
        object.__setattr__(self, "cfg", cfg if len(cfg) > 1 else cfg[0])
        object.__setattr__(self, "tau", tau if len(tau) > 1 else tau[0])
        object.__setattr__(self, "cfg_insertion_layer", layers)

    def per_scale(self, num_scales: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(cfg, tau)`` of each of ``num_scales`` scales."""
        out = []
        for name in ("cfg", "tau"):
            values = _per_scale(getattr(self, name), name)
            if len(values) == 1:
                values = values * num_scales
            if len(values) < num_scales:
                raise ParameterError(f"{name} has {len(values)} values but the schedule has {num_scales} scales")
            out.append(values[:num_scales])
        return out[0], out[1]


@dataclass(frozen=True)
class ScaleProgress:
    """What the per-scale callback gets: bits ``(B, h, w, d)`` of scale ``index`` and the codes
    summed so far ``(B, d, 1, H, W)`` (decode them for a preview)."""

    index: int
    num_scales: int
    bits: torch.Tensor
    codes: torch.Tensor


@dataclass
class SampleResult:
    """``bits[i]`` ``(B, h_i, w_i, d)`` uint8; ``logits[i]`` ``(B, l_i, V)``: guided, at temperature 1;
    ``codes`` ``(B, d, 1, H, W)``; ``image`` ``(B, 3, 16H, 16W)`` in [-1, 1] (None unless decoded)."""

    bits: list[torch.Tensor]
    logits: list[torch.Tensor]
    codes: torch.Tensor
    image: torch.Tensor | None = None


def sample_bits(logits_BlV: torch.Tensor, *, top_k: int = 0, top_p: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw every bit from its two logits ``(B, l, 2d)`` -> bits ``(B, l, d)`` int64.

    Top-k keeps outcomes not below the ``k``-th largest logit; top-p drops, in increasing
    order of probability, the outcomes whose cumulative probability stays within ``1 - top_p``
    (never the likeliest). Then one ``torch.multinomial`` draw (with replacement) per bit, over
    the rows in ``(B, l, d)`` order: the official draw order, so a seeded torch generator gives
    the official samples. ``top_k == 1`` is the argmax and draws nothing.
    """
    B, l, V = logits_BlV.shape
    pairs_Nt = rearrange(logits_BlV.float(), "B l (d two) -> (B l d) two", two=2)
    if top_k == 1:
        return pairs_Nt.argmax(-1).view(B, l, V // 2)
    if top_k > 0:
        kth_N1 = pairs_Nt.topk(min(top_k, pairs_Nt.shape[-1]), dim=-1).values.amin(-1, keepdim=True)
        pairs_Nt = pairs_Nt.masked_fill(pairs_Nt < kth_N1, -torch.inf)
    if top_p > 0:
        ascending_Nt, order_Nt = pairs_Nt.sort(dim=-1)
        drop_Nt = ascending_Nt.softmax(-1).cumsum(-1) <= 1 - top_p
        drop_Nt[:, -1] = False
        pairs_Nt = pairs_Nt.masked_fill(drop_Nt.scatter(-1, order_Nt, drop_Nt), -torch.inf)
    drawn_N1 = torch.multinomial(pairs_Nt.softmax(-1), 1, replacement=True, generator=generator)
    return drawn_N1.view(B, l, V // 2)


def check_text_channels(model: Infinity, text: TextCondition) -> None:
    """Refuse T5 features of another width than the model reads (another T5 than the model's)."""
    channels = text.kv_compact.shape[-1]
    if channels != model.config.text_channels:
        raise ParameterError(
            f"the text has {channels}-channel T5 features but the model takes {model.config.text_channels} "
            "channels; encode the prompt with the T5 that belongs to the model (flan-t5-xl for Infinity-2B)"
        )


def _guided_text(model: Infinity, text: TextCondition, negative: TextCondition | None) -> TextCondition:
    """Conditional prompts then unconditional ones (``cfg_uncond[:len]``, or ``negative``): ``2B`` rows."""
    if negative is None:
        if max(text.lens) > model.config.text_maxlen:
            raise ParameterError(f"a prompt of {max(text.lens)} tokens is longer than the "
                                 f"{model.config.text_maxlen} rows of cfg_uncond")
        negative = text.replaced(model.cfg_uncond, [True] * text.batch_size)
    if negative.batch_size != text.batch_size:
        raise ParameterError(f"{negative.batch_size} negative prompts for {text.batch_size} prompts")
    kv = torch.cat((text.kv_compact, negative.kv_compact.to(text.kv_compact)))
    return TextCondition(kv, text.lens + negative.lens)


def _check_bits(name: str, bits: Sequence[torch.Tensor], schedule, B: int, d: int) -> None:
    for si, b in enumerate(bits):
        want = (B, schedule[si][1], schedule[si][2], d)
        if tuple(b.shape) != want:
            raise ParameterError(f"{name}[{si}] is {tuple(b.shape)}, expected {want} for the schedule")


def _scale_logits(model: Infinity, x_BlC: torch.Tensor, state: TextState, rope_2lc: torch.Tensor, cache: KVCache, *,
                  cfg: float, guided: bool, layer_mix: set[int], logits_mix: bool) -> torch.Tensor:
    """Run one scale's tokens ``(B or 2B, l, C)`` through the blocks -> guided logits ``(B, l, V)``."""
    B = len(state.lens) // 2 if guided else len(state.lens)
    mix = guided and cfg != 1
    cond = state.gss if state.gss is not None else state.cond_BD
    for i, block in enumerate(model.iter_blocks()):
        x_BlC = block(x_BlC, cond, state, rope_2lc, None, cache[i])
        if mix and i in layer_mix:  # guidance on this block's output; both halves continue with it
            x_BlC = (cfg * x_BlC[:B] + (1 - cfg) * x_BlC[B:]).repeat(2, 1, 1)
    if mix and logits_mix:
        both = model.get_logits(x_BlC, state.cond_BD)
        return cfg * both[:B] + (1 - cfg) * both[B:]
    return model.get_logits(x_BlC[:B], state.cond_BD[:B])


def sample(model: Infinity, text: TextCondition, schedule, options: SamplerOptions = SamplerOptions(), *,
           negative_text: TextCondition | None = None, forced_bits: Sequence[torch.Tensor] | None = None,
           input_override: Sequence[torch.Tensor | None] | None = None, generator: torch.Generator | None = None,
           callback: Callable[[ScaleProgress], None] | None = None, check_interrupt: Callable[[], object] | None = None,
           cache: KVCache | None = None) -> SampleResult:
    """Sample the bits of every scale of ``schedule`` (``[(1, h, w), ...]``) for ``text``'s ``B`` prompts.

    ``forced_bits``: bits ``(B, h, w, d)`` used instead of the samples for the first
    ``len(forced_bits)`` scales (the official ``gt_leak``; the draws still happen, keeping the
    official random stream). ``input_override[i]`` (``(B, l_i, d)`` or None): the transformer
    input of scale ``i`` instead of the one built from the samples (scale 0, ``sos``, cannot be
    replaced). ``negative_text``: the unconditional prompts of guidance (default
    ``cfg_uncond``). ``generator`` overrides ``options.seed``. ``callback`` runs after each scale,
    ``check_interrupt`` before each (it may raise; a true return raises :class:`SamplingInterrupted`).
    ``cache``: an empty :class:`KVCache` to use; it is cleared on return and on error.
    """
    schedule = [tuple(int(v) for v in s) for s in schedule]
    if any(t != 1 for t, _, _ in schedule):
        raise ParameterError(f"next-scale sampling needs image schedules (t = 1), got {schedule}")
    n, B, depth = len(schedule), text.batch_size, model.config.depth
    cfgs, taus = options.per_scale(n)
    layer_mix = {depth + x for x in options.cfg_insertion_layer if x < 0}
    if any(x <= 0 for x in layer_mix):
        raise ParameterError(f"cfg_insertion_layer {options.cfg_insertion_layer} is out of range for {depth} blocks")
    forced = list(forced_bits or [])
    override = list(input_override or [])
    if len(forced) > n or len(override) > n or (override and override[0] is not None):
        raise ParameterError("forced_bits / input_override are longer than the schedule, or override scale 0")
    d = model.config.codebook_dim
    _check_bits("forced_bits", forced, schedule, B, d)
    for si, x in enumerate(override):
        if x is not None and tuple(x.shape) != (B, schedule[si][1] * schedule[si][2], d):
            raise ParameterError(f"input_override[{si}] is {tuple(x.shape)}, expected "
                                 f"{(B, schedule[si][1] * schedule[si][2], d)}")
    device = model.pos_start.device
    if generator is None and options.seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(options.seed))

    guided = any(c != 1 for c in cfgs)
    state = model.prepare_text(_guided_text(model, text, negative_text) if guided else text)
    rope_2Lc = model.rope(schedule, sum(h * w for _, h, w in schedule), device)
    cache = KVCache(depth) if cache is None else cache
    if len(cache.layers) != depth or not cache.is_empty:
        raise ParameterError(f"the kv cache must be empty and have {depth} layers")
    full = schedule[-1]
    codes_Bd1HW = torch.zeros(B, d, *full, device=device)
    bits_out, logits_out = [], []
    x_Bld, start = None, 0
    try:
        for si, (_, h, w) in enumerate(schedule):
            if check_interrupt is not None and check_interrupt():
                raise SamplingInterrupted(f"sampling stopped before scale {si + 1} of {n}")
            if si < len(override) and override[si] is not None:
                x_Bld = override[si].to(device)
            x_BlC = model.embed_scale(x_Bld, state, si) if not guided or x_Bld is None else \
                model.embed_scale(x_Bld.repeat(2, 1, 1), state, si)
            logits_BlV = _scale_logits(model, x_BlC, state, rope_2Lc[:, start:start + h * w], cache, cfg=cfgs[si],
                                       guided=guided, layer_mix=layer_mix,
                                       logits_mix=0 in options.cfg_insertion_layer)
            bits_Bld = sample_bits(logits_BlV.mul(1 / taus[si]), top_k=options.top_k, top_p=options.top_p,
                                   generator=generator)
            bits_Bhwd = rearrange(bits_Bld, "B (h w) d -> B h w d", h=h, w=w).to(torch.uint8)
            if si < len(forced):
                bits_Bhwd = forced[si].to(device=device, dtype=torch.uint8)
            codes_Bd1HW = codes_Bd1HW + bsq_quant.resize(bsq_quant.bits_to_codes(bits_Bhwd, d), full,
                                                         bsq_quant.INTERP_UP)
            if si + 1 < n:
                x_next = F.interpolate(codes_Bd1HW, size=schedule[si + 1], mode=options.next_scale)
                x_Bld = rearrange(x_next, "B d 1 h w -> B (h w) d")
            bits_out.append(bits_Bhwd)
            logits_out.append(logits_BlV)
            start += h * w
            if callback is not None:
                callback(ScaleProgress(si, n, bits_Bhwd, codes_Bd1HW))
    finally:
        cache.clear()
    return SampleResult(bits=bits_out, logits=logits_out, codes=codes_Bd1HW)


def teacher_forced_logits(model: Infinity, bits: Sequence[torch.Tensor], text: TextCondition, schedule, *,
                          next_scale: str = "area", cfg: float | Sequence[float] = 1.0,
                          negative_text: TextCondition | None = None) -> list[torch.Tensor]:
    """Per-scale bit logits ``(B, l_i, V)`` of given bits ``(B, h_i, w_i, d)``, in one forward pass.

    The inputs are the next-scale latents of the bits (``next_scale``: ``'area'`` as the
    sampler, ``'trilinear'`` as training), attended with the block-causal mask: the logits the
    sampler would produce had it drawn these bits (up to float rounding). ``cfg`` (one value or
    one per scale) other than 1 also runs the unconditional prompts and mixes the logits as the
    sampler does with guidance on the logits (``cfg_insertion_layer=(0,)``).
    """
    schedule = [tuple(int(v) for v in s) for s in schedule]
    if len(bits) != len(schedule):
        raise ParameterError(f"got bits for {len(bits)} scales but the schedule has {len(schedule)}")
    d = model.config.codebook_dim
    _check_bits("bits", bits, schedule, text.batch_size, d)
    device = model.pos_start.device
    parts = bsq_quant.next_scale_inputs([b.to(device) for b in bits], schedule, mode=next_scale)
    x_BLd = torch.cat(parts, dim=1) if parts else torch.zeros(text.batch_size, 0, d, device=device)
    cfgs, _ = SamplerOptions(cfg=cfg).per_scale(len(schedule))
    if all(c == 1 for c in cfgs):
        return student.split_scales(model.forward_logits(x_BLd, text, schedule, attn_mask="block_causal"), schedule)
    B = text.batch_size
    both = model.forward_logits(x_BLd.repeat(2, 1, 1), _guided_text(model, text, negative_text), schedule,
                                attn_mask="block_causal")
    return [c * s[:B] + (1 - c) * s[B:] if c != 1 else s[:B]
            for c, s in zip(cfgs, student.split_scales(both, schedule))]


def iterative_restore(model: Infinity, vae: BSQVAE, lq: torch.Tensor | Sequence[torch.Tensor], text: TextCondition,
                      schedule, options: SamplerOptions = SamplerOptions(), *, lq_scales: int = LQ_INPUT_SCALES,
                      decode: bool = True, **kwargs) -> SampleResult:
    """Conventional (iterative) VAR restoration of an LQ image, the baseline VARestorer compares with.

    ``lq``: the image ``(B, 3, 16H, 16W)`` in [-1, 1] sized to ``schedule``, or its bits per
    scale ``(B, h, w, d)``. This follows the official ``Infinity.autoregressive_infer_cfg_w_lq_token``:
    the LQ pyramid is not a prefix of the sequence; for the first ``lq_scales`` scales (official:
    10) the transformer input of the scale is the LQ's next-scale latent (``trilinear``, as
    ``flip_requant`` builds it) instead of the latent of the sampled bits; later scales continue
    from the samples. So with at most ``lq_scales`` scales (every 0.06M-0.60M schedule) the samples
    never feed back: the result is block-causal teacher forcing on the LQ pyramid followed by
    per-scale sampling, and the KV cache only makes it sequential. Other keyword arguments go
    to :func:`sample`; ``decode`` also decodes the image with ``vae``.
    """
    if lq_scales < 0:
        raise ParameterError(f"lq_scales must be >= 0, got {lq_scales}")
    student.check_vae(model, vae)
    schedule = [tuple(int(v) for v in s) for s in schedule]
    lq_bits = vae.encode(lq, schedule).bits if isinstance(lq, torch.Tensor) else list(lq)
    if len(lq_bits) != len(schedule):
        raise ParameterError(f"got LQ bits for {len(lq_bits)} scales but the schedule has {len(schedule)}")
    device = model.pos_start.device
    lq_inputs = bsq_quant.next_scale_inputs([b.to(device) for b in lq_bits], schedule, mode="trilinear")
    override = [None] + lq_inputs[: max(lq_scales - 1, 0)]
    result = sample(model, text, schedule, options, input_override=override, **kwargs)
    if decode:
        result.image = vae.decode(result.codes)
    return result


def generate(model: Infinity, vae: BSQVAE | None, text: TextCondition | None, schedule,
             options: SamplerOptions = SamplerOptions(), *, batch: int = 1, negative_text: TextCondition | None = None,
             callback: Callable[[int, ScaleProgress], None] | None = None,
             check_interrupt: Callable[[], object] | None = None, device: torch.device | None = None) -> SampleResult:
    """Text to image: ``batch`` images over ``schedule`` (``[(1, h, w), ...]``, e.g. :func:`.schedules.scale_schedule`).

    ``text``: one prompt for every image or one per image (``None``: unconditional, the first
    row of ``cfg_uncond``); ``negative_text`` likewise (``None``: ``cfg_uncond``). Image ``i`` is
    sampled alone with the generator of seed ``options.seed + i`` (``seed=None``: torch's global
    generator), so a batch gives the same images as single runs. ``callback(i, progress)`` runs
    after each scale of image ``i``, ``check_interrupt`` before each scale. With ``vae`` the
    images ``(B, 3, 16H, 16W)`` in [-1, 1] are decoded; ``logits`` are not kept (empty).
    """
    if batch < 1:
        raise ParameterError(f"batch must be at least 1, got {batch}")
    if vae is not None:
        student.check_vae(model, vae)
    device = device or model.pos_start.device

    def rows(cond: TextCondition | None, what: str) -> list[TextCondition | None]:
        if cond is None:
            return [None] * batch
        if cond.batch_size not in (1, batch):
            raise ParameterError(f"{cond.batch_size} {what} for a batch of {batch} images; give one or one per image")
        kv_NC = cond.kv_compact.to(device)
        parts = [TextCondition(kv, (n,)) for kv, n in zip(torch.split(kv_NC, cond.lens), cond.lens)]
        return parts * batch if len(parts) == 1 else parts

    for cond in (text, negative_text):
        if cond is not None:
            check_text_channels(model, cond)
    texts, negatives = rows(text, "prompts"), rows(negative_text, "negative prompts")
    bits_out, codes_out, images = [], [], []
    for i in range(batch):
        text_i = texts[i] if texts[i] is not None else TextCondition(model.cfg_uncond[:1].float(), (1,))
        generator = None
        if options.seed is not None:
            generator = torch.Generator(device=device).manual_seed((int(options.seed) + i) % 2**64)
        step = None if callback is None else (lambda p, i=i: callback(i, p))
        res = sample(model, text_i, schedule, options, negative_text=negatives[i], generator=generator,
                     callback=step, check_interrupt=check_interrupt)
        bits_out.append(res.bits)
        codes_out.append(res.codes)
        if vae is not None:
            images.append(vae.decode(res.codes))
    return SampleResult(bits=[torch.cat(scale) for scale in zip(*bits_out)], logits=[],
                        codes=torch.cat(codes_out), image=torch.cat(images) if images else None)


def codes_preview(codes_Bd1HW: torch.Tensor) -> torch.Tensor:
    """A cheap false-colour preview of the first image's summed codes ``(B, d, 1, H, W)``:
    their projection on the three principal components (largest loading positive, so the
    colours stay put from scale to scale), mapped to ``(H, W, 3)`` in [0, 1] on the CPU.
    No VAE decode: the colours are not the image's, the layout is."""
    x_dHW = codes_Bd1HW[0, :, 0].detach().float().cpu()
    d, H, W = x_dHW.shape
    x_Nd = x_dHW.reshape(d, H * W).T
    x_Nd = x_Nd - x_Nd.mean(0)
    _, vecs_dd = torch.linalg.eigh(x_Nd.T @ x_Nd)  # eigenvalues ascending
    pcs_dk = vecs_dd[:, -3:].flip(-1)
    signs_k = torch.sign(pcs_dk.gather(0, pcs_dk.abs().argmax(0, keepdim=True)))
    proj_Nk = x_Nd @ (pcs_dk * signs_k)
    if proj_Nk.shape[1] < 3:
        proj_Nk = F.pad(proj_Nk, (0, 3 - proj_Nk.shape[1]))
    spread_k = proj_Nk.std(0, correction=0).clamp_min(1e-6)
    return (0.5 + proj_Nk / (5 * spread_k)).clamp(0, 1).T.reshape(3, H, W).permute(1, 2, 0)
