"""Safe loading everywhere (issue 9): no code from a checkpoint, no network, no path outside the model folders.

* The code base (``var_core/``, ``nodes/``, ``__init__.py``) is parsed: every ``torch.load`` passes
  ``weights_only=True``; no ``pickle``/``marshal``/``yaml`` loading, ``eval``/``exec``,
  ``trust_remote_code`` or download helper; every ``from_pretrained`` reads local files only; the
  nodes resolve model names only through ``nodes/folders.py`` (which refuses ``..`` and absolute
  paths: ``test_reliability_server.py``).
* A restore (safetensors, ``.pth`` and ``.ckpt`` weights, SwinIR, a T5 prompt) runs with every
  socket connection and name lookup raising.
"""

from __future__ import annotations

import ast
import socket
from pathlib import Path

import pytest
import torch

import var_core
from var_core import restore, text as text_lib
from var_core.restore import RestoreOptions

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
SOURCES = sorted([*(REPO / "var_core").rglob("*.py"), *(REPO / "nodes").rglob("*.py"), REPO / "__init__.py"])

# Calls that load code or objects, or reach the network: ``module.function`` by their last two
# parts, builtins and download helpers by name.
FORBIDDEN_ATTRIBUTES = {"pickle.load", "pickle.loads", "pickle.Unpickler", "marshal.load", "marshal.loads",
                        "yaml.load", "yaml.unsafe_load", "dill.load", "dill.loads", "request.urlopen"}
FORBIDDEN_NAMES = {"eval", "exec", "__import__", "hf_hub_download", "snapshot_download", "urlopen"}

def dotted(node: ast.AST) -> str:
    """``a.b.c`` of a Name / Attribute chain ('' otherwise)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def keyword_is(call: ast.Call, name: str, value) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def findings(path: Path, root: Path = REPO) -> list[str]:
    """What in ``path`` could run code from a file, load objects or reach the network."""
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(root)
    out = []
    calls = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Attribute) and dotted(node) == "torch.load" and id(node) not in calls:
            out.append(f"{where}: torch.load used as a value (aliased loads escape this check)")
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        parts = name.split(".")
        if name == "torch.load" and not keyword_is(node, "weights_only", True):
            out.append(f"{where}: torch.load without weights_only=True")
        if ".".join(parts[-2:]) in FORBIDDEN_ATTRIBUTES or name in FORBIDDEN_NAMES or name.startswith("torch.hub."):
            out.append(f"{where}: {name}() loads code or objects, or downloads")
        if parts[-1] == "from_pretrained" and not keyword_is(node, "local_files_only", True):
            out.append(f"{where}: {name}() without local_files_only=True may download")
        if keyword_is(node, "trust_remote_code", True):
            out.append(f"{where}: trust_remote_code=True runs code from a model folder")
        if name == "folder_paths.get_full_path" and path.name != "folders.py":
            out.append(f"{where}: model names must be resolved by nodes/folders.py (it confines them)")
    return out


def test_code_base_loads_weights_safely():
    assert len(SOURCES) > 30 and REPO / "var_core" / "checkpoint.py" in SOURCES
    problems = [f for path in SOURCES for f in findings(path)]
    assert not problems, "\n".join(problems)


def test_the_scan_catches_what_it_forbids(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch, pickle\nsd = torch.load(p)\nsd = torch.load(p, weights_only=False)\n"
                   "x = pickle.loads(b)\neval('1')\nload = torch.load\nT.from_pretrained(f)\n"
                   "T.from_pretrained(f, local_files_only=True, trust_remote_code=True)\n")
    found = findings(bad, tmp_path)
    assert len(found) == 7, found
    good = tmp_path / "good.py"
    good.write_text("import torch\nsd = torch.load(p, map_location='cpu', weights_only=True)\nmodel.eval()\n")
    assert findings(good, tmp_path) == []


@pytest.fixture
def no_network(monkeypatch):
    """Every connection, datagram and name lookup raises (as on a machine without network)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:2] or args[:1])
        raise OSError("network access blocked by the test")

    for name in ("connect", "connect_ex", "sendto"):
        monkeypatch.setattr(socket.socket, name, refuse)
    for name in ("create_connection", "getaddrinfo", "gethostbyname"):
        monkeypatch.setattr(socket, name, refuse)
    return attempts


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="../shared/fixtures not present")
def test_restore_runs_with_the_network_blocked(no_network, tmp_path):
    from test_comfy_restore import make_tiny_t5

    t5_folder = make_tiny_t5(tmp_path / "tiny-t5")  # written before anything is loaded
    with pytest.raises(OSError, match="blocked"):
        socket.create_connection(("huggingface.co", 443))  # the block is in place
    no_network.clear()
    model = var_core.load(FIXTURES / "B_varestorer_student" / "varestorer_tiny_lora.pth").model
    vae = var_core.load(FIXTURES / "A_bsq_vae" / "vae_tiny.safetensors").model
    swinir = var_core.load(FIXTURES / "G_swinir" / "swinir_tiny.ckpt").model
    encoder = text_lib.T5TextEncoder.from_folder(t5_folder)
    with torch.inference_mode():
        y = restore.restore_image(model, vae, torch.zeros(1, 3, 32, 48), text=encoder.encode(["a sharp photo"]),
                                  swinir=swinir, options=RestoreOptions(scale=2.0, sampling="gumbel", seed=1))
    assert y.shape == (1, 3, 64, 96) and torch.isfinite(y).all()
    assert no_network == [], f"network access attempted: {no_network}"
