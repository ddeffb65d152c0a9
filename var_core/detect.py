"""Model-family detection from state-dict keys and shapes alone (no side config).

Families (``Family`` values) and the keys that identify them:

* ``infinity_bsq_vae``: Infinity's multi-scale BSQ VAE (``infinity_vae_d*.pth``):
  ``encoder.conv_in.conv.weight`` and a ``quantizer.lfq.mask`` bit-order buffer.
* ``infinity``: the Infinity / VARestorer bitwise transformer (``infinity_2b_reg.pth``,
  ``varestorer.pth``): ``block_chunks.*`` (or ``blocks.*``) with ``shared_ada_lin`` and
  ``text_proj_for_sos``; LoRA adapters show as ``lora_down``/``lora_up`` keys.
* ``var_vqvae``: the VQVAE of VAR / VARSR / RestoreVAR (``vae_ch160v4096z32.pth``, ``VQVAE.pth``):
  ``quantize.embedding.weight`` with ``quant_conv``/``post_quant_conv``.
* ``var``: class-conditional VAR (``var_d16.pth`` ...): ``class_emb``, ``pos_1LC``, ``blocks.*``.
* ``varsr``: VARSR (``VARSR.pth``): VAR blocks plus ``con_embedding`` and the ``diffloss`` refiner.
* ``restorevar``: RestoreVAR (``restorevar.pth``): ``word_embed_cond`` and ``cond_proj4`` (the latent
  refiner ``vae_refiner`` is part of the released file; checkpoints trained without it are recognised too).
* ``swinir``: DiffBIR's SwinIR pre-cleaner (``general_swinir_v1.ckpt``): ``conv_first``,
  ``patch_embed`` and ``layers.*.residual_group``.
"""

from __future__ import annotations

from .checkpoint import StateDict
from .errors import CheckpointError


class Family:
    INFINITY_BSQ_VAE = "infinity_bsq_vae"
    INFINITY = "infinity"
    VAR_VQVAE = "var_vqvae"
    VAR = "var"
    VARSR = "varsr"
    RESTOREVAR = "restorevar"
    SWINIR = "swinir"


DESCRIPTIONS = {
    Family.INFINITY_BSQ_VAE: "Infinity BSQ multi-scale VAE (e.g. infinity_vae_d32reg.pth)",
    Family.INFINITY: "Infinity / VARestorer bitwise transformer (e.g. varestorer.pth, infinity_2b_reg.pth)",
    Family.VAR_VQVAE: "VAR multi-scale VQVAE (e.g. vae_ch160v4096z32.pth, VARSR VQVAE.pth)",
    Family.VAR: "class-conditional VAR transformer (e.g. var_d16.pth)",
    Family.VARSR: "VARSR super-resolution transformer (VARSR.pth)",
    Family.RESTOREVAR: "RestoreVAR restoration transformer (restorevar.pth)",
    Family.SWINIR: "SwinIR pre-cleaner (e.g. general_swinir_v1.ckpt)",
}


def _has_prefix(sd: StateDict, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in sd)


def detect_family(sd: StateDict, *, source: str = "checkpoint") -> str:
    """Return the :class:`Family` of a flat state dict, or raise a :class:`CheckpointError`."""
    if not sd:
        raise CheckpointError(f"{source}: the state dict is empty")
    if "encoder.conv_in.conv.weight" in sd and ("quantizer.lfq.mask" in sd or "quantize.lfq.mask" in sd
                                                or "decoder.conv_in.conv.weight" in sd):
        return Family.INFINITY_BSQ_VAE
    if "quantize.embedding.weight" in sd and "quant_conv.weight" in sd:
        return Family.VAR_VQVAE
    if (("conv_first.weight" in sd or "conv_first.1.weight" in sd)  # plain / PixelUnshuffle+conv stem
            and _has_prefix(sd, "layers.0.residual_group.") and _has_prefix(sd, "patch_embed")):
        return Family.SWINIR
    if _has_prefix(sd, "con_embedding.") and "class_emb.weight" in sd:  # before Infinity: VARSR may have shared_ada_lin
        return Family.VARSR
    if "shared_ada_lin.1.weight" in sd or "text_proj_for_sos.ca.mat_q.weight" in sd or (
        "cfg_uncond" in sd and (_has_prefix(sd, "block_chunks.") or _has_prefix(sd, "blocks."))
    ):
        return Family.INFINITY
    if _has_prefix(sd, "word_embed_cond.") and ("cond_proj4.weight" in sd or _has_prefix(sd, "vae_refiner.")):
        return Family.RESTOREVAR
    if "class_emb.weight" in sd and _has_prefix(sd, "blocks.") and "word_embed.weight" in sd:
        return Family.VAR
    sample = sorted(sd)[:8]
    raise CheckpointError(
        f"{source}: not a model this pack knows. Its {len(sd)} tensors start with {sample}. "
        "Expected one of: " + "; ".join(DESCRIPTIONS.values()) + "."
    )


def count_indexed(sd: StateDict, prefix: str) -> int:
    """Number of ``prefix{i}.`` children (``prefix`` ends with a dot): 0, 1, ... contiguous."""
    n = 0
    while _has_prefix(sd, f"{prefix}{n}."):
        n += 1
    return n


def summarize(family: str, sd: StateDict) -> dict[str, int]:
    """Headline sizes of a checkpoint read from its shapes (for messages and ``info``)."""
    def shape(key: str, dim: int) -> int:
        return int(sd[key].shape[dim]) if key in sd else 0

    if family in (Family.VAR, Family.VARSR, Family.RESTOREVAR):
        return {
            "depth": count_indexed(sd, "blocks."),
            "embed_dim": shape("word_embed.weight", 0),
            "num_heads": shape("blocks.0.attn.scale_mul_1H11", 1),
            "vocab_size": shape("head.weight", 0),
            # class_emb has one extra row, the unconditional (CFG) class.
            "num_classes": max(shape("class_emb.weight", 0) - 1, 0),
        }
    if family == Family.VAR_VQVAE:
        return {
            "vocab_size": shape("quantize.embedding.weight", 0),
            "z_channels": shape("quantize.embedding.weight", 1),
            "base_ch": shape("encoder.conv_in.weight", 0),
            "num_resolutions": count_indexed(sd, "encoder.down."),
        }
    return {}
