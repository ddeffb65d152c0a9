"""Soak (issue 9): 100 prompts back to back in one real ComfyUI server, every family, several sizes.

``.venv/bin/python -m pytest -m slow tests/test_soak.py -s`` runs it (a few minutes on 2 CPU cores).
One server (``--cpu``, the fixture models of ``conftest.SERVER_MODELS``) runs, in a fixed mixed
order: VAE round trips, one-step VARestorer (with SwinIR, tiled), the iterative teacher, VARSR,
RestoreVAR, class-to-image and the pyramid preview on inputs of five sizes, and, every sixth
prompt, a prompt that must fail: a missing file, a wrong-family file, a ``..`` path, tile overlap
>= tile, a NaN scale, a VQVAE of another model. Checked: every failure is exactly the intended one
(node and error type and message) and every other prompt succeeds; ``/system_stats`` answers after
every prompt; the server's resident memory (``VmRSS``) at prompt 100 is within 5% of prompt 10.
The figures are printed and written to ``soak.json`` in the test's tmp dir.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from comfy_harness import execution_error, rss_bytes
from conftest import FIXTURE_RESTOREVAR, FIXTURE_STUDENT, FIXTURE_SWINIR, FIXTURE_VAE, FIXTURE_VAR, FIXTURE_VARSR
from conftest import fixture_models_server
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.comfyui]

RUNS = 100
SIZES = [(32, 32), (48, 64), (64, 48), (40, 72), (64, 64)]  # (height, width) of the inputs
VQVAE = {"varsr": "varsr_vqvae_tiny.safetensors", "restorevar": "restorevar_vqvae_tiny.safetensors",
         "var": "var_vqvae_tiny.safetensors"}


# -- graphs (API format) ---------------------------------------------------------------------------------


def vae_loader(name: str = FIXTURE_VAE.name) -> dict:
    return {"class_type": "VARLoadVAE", "inputs": {"vae_name": name, "weight_dtype": "auto"}}


def student_loader(name: str = FIXTURE_STUDENT.name, strip: bool = False) -> dict:
    return {"class_type": "VARLoadStudent", "inputs": {"model_name": name, "merge_lora": True, "weight_dtype": "auto",
                                                       "strip_lora": strip}}


def preview(source: list) -> dict:
    return {"class_type": "PreviewImage", "inputs": {"images": source}}


def vae_roundtrip(image: str, i: int) -> dict:
    return {"1": {"class_type": "LoadImage", "inputs": {"image": image}}, "2": vae_loader(),
            "3": {"class_type": "VAREncodePyramid", "inputs": {"vae": ["2", 0], "image": ["1", 0]}},
            "4": {"class_type": "VARDecodePyramid", "inputs": {"vae": ["2", 0], "pyramid": ["3", 0]}},
            "5": preview(["4", 0])}


def pyramid_preview(image: str, i: int) -> dict:
    graph = vae_roundtrip(image, i)
    graph["4"] = {"class_type": "VARPreviewPyramid", "inputs": {"vae": ["2", 0], "pyramid": ["3", 0], "columns": 0}}
    graph["6"] = preview(["4", 1])
    return graph


def one_step(image: str, i: int, *, scale: float = 2.0, tile: int = 64, overlap: int = 16,
             model: str = FIXTURE_STUDENT.name) -> dict:
    return {"1": {"class_type": "LoadImage", "inputs": {"image": image}}, "2": vae_loader(), "3": student_loader(model),
            "6": {"class_type": "VARLoadSwinIR", "inputs": {"swinir_name": FIXTURE_SWINIR.name, "weight_dtype": "auto"}},
            "4": {"class_type": "VAROneStepRestore",
                  "inputs": {"model": ["3", 0], "vae": ["2", 0], "image": ["1", 0], "swinir": ["6", 0], "seed": i,
                             "sampling": "gumbel", "scale": scale, "tile_size": tile, "tile_overlap": overlap,
                             "color_fix": "wavelet"}},
            "5": preview(["4", 0])}


def iterative(image: str, i: int) -> dict:
    return {"1": {"class_type": "LoadImage", "inputs": {"image": image}}, "2": vae_loader(),
            "3": student_loader(strip=True),
            "4": {"class_type": "VARIterativeRestore",
                  "inputs": {"model": ["3", 0], "vae": ["2", 0], "image": ["1", 0], "seed": i, "cfg": 3.0, "tau": 1.0,
                             "top_k": 0, "top_p": 0.97, "next_scale": "area", "scale": 1.0, "tile_size": 512,
                             "tile_overlap": 64, "color_fix": "none"}},
            "5": preview(["4", 0])}


def family_restore(model: str, vqvae: str, image: str, i: int, *, scale: float, overlap: int = 16) -> dict:
    return {"1": {"class_type": "LoadImage", "inputs": {"image": image}},
            "2": {"class_type": "VARLoadModel", "inputs": {"model_name": model, "merge_lora": True,
                                                           "weight_dtype": "auto"}},
            "3": {"class_type": "VARLoadVQVAE", "inputs": {"vqvae_name": vqvae, "weight_dtype": "auto"}},
            "4": {"class_type": "VARRestore",
                  "inputs": {"model": ["2", 0], "vae": ["3", 0], "image": ["1", 0], "seed": i, "scale": scale,
                             "tile_size": 64, "tile_overlap": overlap, "color_fix": "auto", "sampling": "argmax",
                             "varsr_cfg": 6.0, "varsr_refiner_steps": 4, "varsr_top_k": 1, "varsr_top_p": 0.75,
                             "restorevar_refine": True}},
            "5": preview(["4", 0])}


def varsr(image: str, i: int) -> dict:
    return family_restore(FIXTURE_VARSR.name, VQVAE["varsr"], image, i, scale=2.0)


def restorevar(image: str, i: int) -> dict:
    return family_restore(FIXTURE_RESTOREVAR.name, VQVAE["restorevar"], image, i, scale=1.0)


def class_to_image(image: str, i: int) -> dict:
    return {"2": {"class_type": "VARLoadModel", "inputs": {"model_name": FIXTURE_VAR.name, "merge_lora": True,
                                                           "weight_dtype": "auto"}},
            "3": {"class_type": "VARLoadVQVAE", "inputs": {"vqvae_name": VQVAE["var"], "weight_dtype": "auto"}},
            "4": {"class_type": "VARClassToImage",
                  "inputs": {"model": ["2", 0], "vqvae": ["3", 0], "class_index": i % 10, "seed": i, "cfg": 4.0,
                             "top_k": 100, "top_p": 0.95, "more_smooth": False, "batch_size": 1 + i % 2}},
            "5": preview(["4", 0])}


GOOD = {"vae_roundtrip": vae_roundtrip, "one_step": one_step, "iterative": iterative, "varsr": varsr,
        "restorevar": restorevar, "class_to_image": class_to_image, "pyramid_preview": pyramid_preview}

# name -> (graph, failing node, exception type, message fragment)
BAD = {
    "missing_file": (lambda image, i: one_step(image, i, model="no_such_model.safetensors"),
                     "VARLoadStudent", "CheckpointError", "model file 'no_such_model.safetensors' not found"),
    "wrong_family": (lambda image, i: one_step(image, i, model=FIXTURE_VAE.name),
                     "VARLoadStudent", "CheckpointError", f"{FIXTURE_VAE.name} is the wrong model here"),
    "dotdot_path": (lambda image, i: one_step(image, i, model="../../" + FIXTURE_STUDENT.name),
                    "VARLoadStudent", "CheckpointError", "is refused: it points outside models/var/"),
    "overlap_ge_tile": (lambda image, i: one_step(image, i, tile=64, overlap=64),
                        "VAROneStepRestore", "ParameterError", "tile overlap (64) must be at least 0 and smaller"),
    "nan_scale": (lambda image, i: one_step(image, i, scale=float("nan")),
                  "VAROneStepRestore", "ParameterError", "scale must be in (0, 8], got nan"),
    "wrong_vqvae": (lambda image, i: family_restore(FIXTURE_VARSR.name, VQVAE["restorevar"], image, i, scale=2.0),
                    "VARRestore", "ParameterError", "does not belong to"),
}


def plan() -> list[str]:
    """The 100 prompt kinds: every sixth a failure (the six in turn), the others the families in turn."""
    good, bad = list(GOOD), list(BAD)
    kinds, g, b = [], 0, 0
    for i in range(RUNS):
        if i % 6 == 5:
            kinds.append(bad[b % len(bad)])
            b += 1
        else:
            kinds.append(good[g % len(good)])
            g += 1
    return kinds


@pytest.fixture(scope="module")
def soak_server(tmp_path_factory):
    with fixture_models_server(tmp_path_factory.mktemp("soak_comfyui")) as server:
        yield server


def test_soak_100_prompts(soak_server, tmp_path):
    server = soak_server
    rng = np.random.default_rng(0)
    kinds = plan()
    failures, unexpected, stats_ok, seconds = [], [], 0, []
    rss = {}
    for i, kind in enumerate(kinds):
        h, w = SIZES[i % len(SIZES)]
        name = f"soak_{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(server.input_dir / name)
        start = time.monotonic()
        if kind in GOOD:
            entry = server.run(GOOD[kind](name, i), timeout=300)
            if entry["status"]["status_str"] != "success":
                unexpected.append((i, kind, execution_error(entry)))
        else:
            build, node, exception, fragment = BAD[kind]
            entry = server.run(build(name, i), timeout=300)
            err = execution_error(entry)
            failures.append(kind)
            if not (err and err["node_type"] == node and err["exception_type"].endswith(exception)
                    and fragment in err["exception_message"] and "Traceback" not in err["exception_message"]):
                unexpected.append((i, kind, err or entry["status"]))
        seconds.append(time.monotonic() - start)
        stats = server.get_json("/system_stats", timeout=10)
        stats_ok += bool(stats.get("system", {}).get("comfyui_version"))
        if i + 1 in (1, 10, 25, 50, 75, 100):
            rss[i + 1] = rss_bytes(server.proc.pid)
    growth = (rss[100] - rss[10]) / rss[10]
    report = {
        "runs": RUNS, "kinds": {k: kinds.count(k) for k in (*GOOD, *BAD)},
        "intended_failures": len(failures), "unexpected": [str(u)[:500] for u in unexpected],
        "system_stats_answered": stats_ok, "rss_mb": {k: round(v / 2**20, 1) for k, v in rss.items()},
        "rss_growth_10_to_100_pct": round(100 * growth, 2), "total_s": round(sum(seconds), 1),
        "median_prompt_s": round(float(np.median(seconds)), 3), "max_prompt_s": round(max(seconds), 3),
    }
    print("soak:", json.dumps(report, indent=1))
    (tmp_path / "soak.json").write_text(json.dumps(report, indent=1))
    assert unexpected == [], report
    assert len(failures) == RUNS // 6 and stats_ok == RUNS
    assert growth < 0.05, report
