"""Checkpoint reading, unwrapping and family detection, including bad files."""

import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import var_core
from var_core.checkpoint import load_state_dict, unwrap
from var_core.detect import Family, detect_family

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason="../shared/fixtures not present")

# Every weights file of the fixtures and the family the official code built it as.
FIXTURE_FAMILIES = {
    "A_bsq_vae/vae_tiny.pth": Family.INFINITY_BSQ_VAE,
    "A_bsq_vae/vae_tiny.safetensors": Family.INFINITY_BSQ_VAE,
    "B_varestorer_student/varestorer_tiny_lora.pth": Family.INFINITY,
    "B_varestorer_student/varestorer_tiny_lora.safetensors": Family.INFINITY,
    "D_var/vqvae_tiny.pth": Family.VAR_VQVAE,
    "D_var/vqvae_tiny.safetensors": Family.VAR_VQVAE,
    "D_var/var_tiny.pth": Family.VAR,
    "D_var/var_tiny.safetensors": Family.VAR,
    "E_varsr/vqvae_tiny_trainer.pth": Family.VAR_VQVAE,
    "E_varsr/vqvae_tiny.safetensors": Family.VAR_VQVAE,
    "E_varsr/varsr_tiny_trainer.pth": Family.VARSR,
    "E_varsr/varsr_tiny.safetensors": Family.VARSR,
    "F_restorevar/vqvae_tiny.pth": Family.VAR_VQVAE,
    "F_restorevar/vqvae_tiny.safetensors": Family.VAR_VQVAE,
    "F_restorevar/restorevar_tiny.pth": Family.RESTOREVAR,
    "F_restorevar/restorevar_tiny.safetensors": Family.RESTOREVAR,
    "G_swinir/swinir_tiny.ckpt": Family.SWINIR,
    "G_swinir/swinir_tiny.safetensors": Family.SWINIR,
}


@pytest.mark.parametrize("rel,family", sorted(FIXTURE_FAMILIES.items()))
def test_fixture_family_detected(rel, family):
    got, sd = var_core.inspect(FIXTURES / rel)
    assert got == family
    assert not any(k.startswith("module.") for k in sd)


@pytest.mark.parametrize("stem", ["A_bsq_vae/vae_tiny", "D_var/var_tiny", "F_restorevar/restorevar_tiny"])
def test_pth_and_safetensors_hold_the_same_tensors(stem):
    a = load_state_dict(FIXTURES / f"{stem}.pth")
    b = load_state_dict(FIXTURES / f"{stem}.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_official_nestings_are_unwrapped():
    sd = {"a.weight": torch.zeros(2), "b.bias": torch.ones(1)}
    for wrapped in ({"vae": sd}, {"state_dict": {"module." + k: v for k, v in sd.items()}},
                    {"trainer": {"var_wo_ddp": sd}}, {"model": sd, "epoch": 3}):
        got = unwrap(wrapped)
        assert got.keys() == sd.keys()
    both = {"trainer": {"vae_local": {"x": torch.zeros(1)}, "var_wo_ddp": sd}}
    assert unwrap(both).keys() == sd.keys()
    assert unwrap(both["trainer"], component="vae_local").keys() == {"x"}


def _write(tmp_path, name, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


@pytest.mark.reliability
def test_zero_length_file(tmp_path):
    with pytest.raises(var_core.CheckpointError, match="empty"):
        var_core.load(_write(tmp_path, "empty.pth", b""))


@pytest.mark.reliability
@pytest.mark.parametrize("name", ["noise.pth", "noise.safetensors", "noise.ckpt"])
def test_random_bytes(tmp_path, name):
    data = bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).tolist())
    with pytest.raises(var_core.CheckpointError) as e:
        var_core.load(_write(tmp_path, name, data))
    assert name in str(e.value)


@pytest.mark.reliability
@pytest.mark.parametrize("name", ["vae_tiny.pth", "vae_tiny.safetensors"])
def test_truncated_file(tmp_path, name):
    data = (FIXTURES / "A_bsq_vae" / name).read_bytes()
    with pytest.raises(var_core.CheckpointError, match="truncated|corrupt"):
        var_core.load(_write(tmp_path, name, data[: len(data) // 2]))


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/var_core_pwned",))


@pytest.mark.reliability
def test_pickle_that_would_run_code_is_refused(tmp_path):
    target = Path("/tmp/var_core_pwned")
    target.unlink(missing_ok=True)
    p = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _RunsCode()}, p)
    with pytest.raises(var_core.CheckpointError, match="refused"):
        var_core.load(p)
    assert not target.exists()
    # A raw (non-zip) pickle is refused too.
    raw = tmp_path / "evil_raw.pth"
    raw.write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(var_core.CheckpointError):
        var_core.load(raw)
    assert not target.exists()


@pytest.mark.reliability
def test_unknown_model_names_what_was_found(tmp_path):
    p = tmp_path / "other.safetensors"
    save_file({"foo.weight": torch.zeros(2, 2)}, str(p))
    with pytest.raises(var_core.CheckpointError, match=r"not a model this pack knows.*foo\.weight.*Expected one of"):
        var_core.load(p)


@pytest.mark.reliability
def test_wrong_family_for_the_caller():
    with pytest.raises(var_core.CheckpointError, match=r"wrong model.*SwinIR.*needs the Infinity BSQ.*Pick the right file"):
        var_core.load(FIXTURES / "G_swinir/swinir_tiny.safetensors", expect=Family.INFINITY_BSQ_VAE)


@pytest.mark.reliability
def test_missing_file_and_folder(tmp_path):
    with pytest.raises(var_core.CheckpointError, match="not found"):
        var_core.load(tmp_path / "nope.pth")
    with pytest.raises(var_core.CheckpointError, match="folder"):
        var_core.load(tmp_path)


@pytest.mark.reliability
def test_zip_that_is_not_a_checkpoint(tmp_path):
    p = tmp_path / "archive.pth"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("hello.txt", "hi")
    with pytest.raises(var_core.CheckpointError):
        var_core.load(p)


def test_detect_empty_state_dict():
    with pytest.raises(var_core.CheckpointError, match="empty"):
        detect_family({})
