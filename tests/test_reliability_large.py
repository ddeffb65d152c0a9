"""A real 8000 x 8000 image through the tiled restore path (issue 9), outside the default run and
outside ``-m reliability`` (it needs ~3 GB): ``.venv/bin/python -m pytest -m slow tests/test_reliability_large.py``.

The refusal above the 16384 px limit and the tile plan of this size are in ``test_reliability_inputs.py``.
"""

from __future__ import annotations

import resource

import pytest
import torch

from var_core import restore
from var_core.restore import RestoreOptions

pytestmark = pytest.mark.slow


def test_8000_px_at_scale_1_restores_with_bounded_memory():
    """The tiled path over a real 8000 x 8000 image (an identity restorer stands in for the model):
    every tile is model-sized and the peak memory is a few copies of the image, not per tile."""
    x = torch.rand(1, 3, 8000, 8000) * 2 - 1
    image_bytes = x.numel() * 4
    sizes = set()

    def identity(t_B3hw, seeds, step):
        sizes.add(tuple(t_B3hw.shape[-2:]))
        step()
        return t_B3hw.clone()

    before = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS:"))
    y = restore.restore_tiled(x, identity, options=RestoreOptions(scale=1.0), steps_per_tile=lambda h, w: 1,
                              progress=None, check_interrupt=None, device=torch.device("cpu"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert sizes == {(512, 512)} and y.shape == x.shape
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)
    print(f"8000 x 8000, 324 tiles: peak +{(peak - before) / image_bytes:.2f} x the image ({image_bytes / 2**20:.0f} MB)")
    assert peak - before < 4 * image_bytes, f"peak grew {(peak - before) / image_bytes:.1f}x the image"
