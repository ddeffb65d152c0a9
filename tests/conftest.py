"""Shared pytest fixtures.

The ``comfy_server`` fixture starts one real ComfyUI (``tests/comfy_harness.py``) per test
session with this pack installed and the fixture BSQ VAE in ``models/var/``. Tests that use it are
marked ``comfyui`` and are skipped, with the reason, when ComfyUI is not installed
(``.venv/bin/python tests/install_comfyui.py`` installs it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # ``import var_core`` from the checkout, whichever way pytest was started
    sys.path.insert(0, str(REPO))

FIXTURES = REPO.parent / "shared" / "fixtures"
FIXTURE_VAE = FIXTURES / "A_bsq_vae" / "vae_tiny.safetensors"


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """A running ComfyUI (subprocess, 127.0.0.1, ``--cpu``) with the pack as a custom node."""
    from comfy_harness import COMFYUI_DIR, ComfyServer, comfyui_installed

    if not comfyui_installed():
        pytest.skip(f"ComfyUI is not installed at {COMFYUI_DIR}: run `.venv/bin/python tests/install_comfyui.py`")
    if not FIXTURE_VAE.is_file():
        pytest.skip(f"fixture VAE {FIXTURE_VAE} not present (../shared/fixtures)")
    server = ComfyServer(tmp_path_factory.mktemp("comfyui"))
    server.prepare()
    server.add_model(FIXTURE_VAE)
    server.start()
    yield server
    server.stop()
