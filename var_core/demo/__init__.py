"""The demo model shipped with the pack, for a first run without the official weights.

A small VARestorer student (LoRA on a from-scratch Infinity-style transformer) and its BSQ VAE,
trained on a CPU by ``python -m var_core train`` on the photographs bundled with scikit-image.
``MODEL_CARD.md`` in this folder lists the data, the commands, the time and the measured quality.
``python -m var_core restore INPUT -o OUT`` uses it when no weights are given. It shows that the
pipeline runs; it is no substitute for the official ``varestorer.pth``.

The student file stores its LoRA adapters unmerged (the official ``varestorer.pth`` layout), so
the same file is also the iterative teacher once the adapters are stripped (``restore --iterative``).
"""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
STUDENT = DEMO_DIR / "varestorer_demo.safetensors"
VAE = DEMO_DIR / "vae_demo.safetensors"
MODEL_CARD = DEMO_DIR / "MODEL_CARD.md"
# Settings that cannot be read from the weights: the models were trained on 128 x 128 crops, so
# they restore in tiles of that size; a quarter-tile overlap (the official 512 px tiles use 64).
TILE = 128
OVERLAP = 32
# The small VAE loses flat colours (its GroupNorm layers normalise them away and it saw seven
# photographs), so the demo keeps the input's low frequencies: the wavelet colour fix.
COLOR_FIX = "wavelet"


def missing_files() -> list[Path]:
    """Demo files absent from this install (a packaging error if any)."""
    return [p for p in (STUDENT, VAE) if not p.is_file()]
