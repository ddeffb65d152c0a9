"""Key/value cache of the self-attention layers for next-scale autoregressive sampling.

Paper: Han et al., "Infinity: Scaling Bitwise AutoRegressive Modeling for High-Resolution Image
Synthesis" (CVPR 2025). As in ``SelfAttention.kv_caching`` of ``infinity/models/basic.py``
(EternalEvan/VARestorer = FoundationVision/Infinity), each layer keeps the RoPE-rotated,
normalised keys and the values of every scale run so far; the tokens of the next scale attend
to all of them (no mask: a scale sees itself and every earlier scale).

Unlike the official code the cache is an object owned by the caller and passed through
``forward``, never state of the model, so that concurrent runs and exceptions cannot leave keys
behind in the model.

Shapes: ``B`` batch, ``H`` heads, ``L`` cached tokens, ``l`` new tokens, ``c`` head dim.
"""

from __future__ import annotations

import torch


class LayerKVCache:
    """Keys and values ``(B, H, L, c)`` of one self-attention layer."""

    __slots__ = ("k_BHLc", "v_BHLc")

    def __init__(self):
        self.k_BHLc: torch.Tensor | None = None
        self.v_BHLc: torch.Tensor | None = None

    def extend(self, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens' keys and values; returns all of them ``(B, H, L + l, c)``."""
        if self.k_BHLc is not None:
            k_BHlc = torch.cat((self.k_BHLc, k_BHlc), dim=2)
            v_BHlc = torch.cat((self.v_BHLc, v_BHlc), dim=2)
        self.k_BHLc, self.v_BHLc = k_BHlc, v_BHlc
        return k_BHlc, v_BHlc

    def clear(self) -> None:
        self.k_BHLc = self.v_BHLc = None

    def __len__(self) -> int:
        return 0 if self.k_BHLc is None else int(self.k_BHLc.shape[2])


class KVCache:
    """One :class:`LayerKVCache` per transformer block; ``len`` is the number of cached tokens."""

    def __init__(self, num_layers: int):
        self.layers = [LayerKVCache() for _ in range(num_layers)]

    def __getitem__(self, index: int) -> LayerKVCache:
        return self.layers[index]

    def __len__(self) -> int:
        return len(self.layers[0]) if self.layers else 0

    @property
    def is_empty(self) -> bool:
        return all(layer.k_BHLc is None for layer in self.layers)

    def clear(self) -> None:
        """Drop every cached tensor (call it in a ``finally``)."""
        for layer in self.layers:
            layer.clear()
