"""Shared pytest fixtures.

The ``comfy_server`` fixture starts one real ComfyUI (``tests/comfy_harness.py``) per test
session with this pack installed and the fixture models in ``models/var/`` (BSQ VAE, VARestorer
student with LoRA, SwinIR, and the VAR / VARSR / RestoreVAR transformers with their VQVAEs, which
all are ``vqvae_tiny.safetensors`` upstream and so get distinct names), latent previews on. Tests that use it are
marked ``comfyui`` and are skipped, with the reason, when ComfyUI is not installed
(``.venv/bin/python tests/install_comfyui.py`` installs it). ``fixture_models_server`` starts such a
server in another folder (the soak test's own); ``one_thread`` runs a module with one torch thread.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # ``import var_core`` from the checkout, whichever way pytest was started
    sys.path.insert(0, str(REPO))

FIXTURES = REPO.parent / "shared" / "fixtures"
FIXTURE_VAE = FIXTURES / "A_bsq_vae" / "vae_tiny.safetensors"
FIXTURE_STUDENT = FIXTURES / "B_varestorer_student" / "varestorer_tiny_lora.safetensors"
FIXTURE_SWINIR = FIXTURES / "G_swinir" / "swinir_tiny.safetensors"
FIXTURE_VAR = FIXTURES / "D_var" / "var_tiny.safetensors"
FIXTURE_VARSR = FIXTURES / "E_varsr" / "varsr_tiny.safetensors"
FIXTURE_RESTOREVAR = FIXTURES / "F_restorevar" / "restorevar_tiny.safetensors"
# The demo model shipped in var_core/demo: the pack lists its folder after models/var/.
DEMO_FILES = sorted(p.name for p in (REPO / "var_core" / "demo").glob("*.safetensors"))
# Name in models/var/ of the test server -> fixture file copied there.
SERVER_MODELS = {
    FIXTURE_VAE.name: FIXTURE_VAE,
    FIXTURE_STUDENT.name: FIXTURE_STUDENT,
    FIXTURE_SWINIR.name: FIXTURE_SWINIR,
    FIXTURE_VAR.name: FIXTURE_VAR,
    "var_vqvae_tiny.safetensors": FIXTURES / "D_var" / "vqvae_tiny.safetensors",
    FIXTURE_VARSR.name: FIXTURE_VARSR,
    "varsr_vqvae_tiny.safetensors": FIXTURES / "E_varsr" / "vqvae_tiny.safetensors",
    FIXTURE_RESTOREVAR.name: FIXTURE_RESTOREVAR,
    "restorevar_vqvae_tiny.safetensors": FIXTURES / "F_restorevar" / "vqvae_tiny.safetensors",
}


@contextlib.contextmanager
def fixture_models_server(folder: Path, extra_args: tuple[str, ...] = ()):
    """A running ComfyUI (subprocess, 127.0.0.1, ``--cpu``) in ``folder`` with the pack as a custom node
    and :data:`SERVER_MODELS` in ``models/var/``; skips the test when ComfyUI or the fixtures are missing."""
    from comfy_harness import COMFYUI_DIR, ComfyServer, comfyui_installed

    if not comfyui_installed():
        pytest.skip(f"ComfyUI is not installed at {COMFYUI_DIR}: run `.venv/bin/python tests/install_comfyui.py`")
    missing = [str(p) for p in SERVER_MODELS.values() if not p.is_file()]
    if missing:
        pytest.skip(f"fixture models not present (../shared/fixtures): {missing}")
    server = ComfyServer(folder, extra_args=list(extra_args))
    server.prepare()
    for name, model in SERVER_MODELS.items():
        server.add_model(model, name=name)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """The session's ComfyUI; previews on (ComfyUI's default is none): VARTextToImage then sends one per scale."""
    with fixture_models_server(tmp_path_factory.mktemp("comfyui"), ("--preview-method", "auto")) as server:
        yield server


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module: tiny models run several times faster so, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
