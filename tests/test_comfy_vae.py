"""End to end in a real ComfyUI: LoadImage -> VARLoadVAE -> VAREncodePyramid -> VARDecodePyramid -> SaveImage.

The saved PNG must equal var_core's own encode/decode computed in this process (converted to
uint8 the way SaveImage does) within 1 level; a wrong-family file must fail the prompt with
var_core's message, and the server must keep working afterwards.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from comfy_harness import execution_error
from conftest import DEMO_FILES, FIXTURE_VAE, FIXTURES, SERVER_MODELS
from PIL import Image

import var_core
from var_core import image as var_image
from var_core import pyramid as var_pyramid

pytestmark = pytest.mark.comfyui

SWINIR = FIXTURES / "G_swinir" / "swinir_tiny.safetensors"


def vae_graph(image_name: str, vae_name: str, prefix: str, weight_dtype: str = "auto") -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "2": {"class_type": "VARLoadVAE", "inputs": {"vae_name": vae_name, "weight_dtype": weight_dtype}},
        "3": {"class_type": "VAREncodePyramid", "inputs": {"vae": ["2", 0], "image": ["1", 0]}},
        "4": {"class_type": "VARDecodePyramid", "inputs": {"vae": ["2", 0], "pyramid": ["3", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": prefix}},
    }


def reference_uint8(png, dtype: torch.dtype = torch.float32) -> np.ndarray:
    """var_core's round trip of ``png`` in this process (CPU), as SaveImage writes it."""
    with Image.open(png) as im:  # as LoadImage reads it
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    vae = var_core.load(FIXTURE_VAE, expect=var_core.Family.INFINITY_BSQ_VAE).model.to(dtype)
    with torch.inference_mode():
        rgb_t, alpha = var_image.split_alpha(torch.from_numpy(rgb)[None])
        pyr = var_pyramid.encode_image(vae, var_image.to_model(rgb_t))
        out = var_image.from_model(var_pyramid.decode_pyramid(vae, pyr))
    assert alpha is None
    return np.clip(255.0 * out[0].numpy(), 0, 255).astype(np.uint8)  # SaveImage: truncation


def test_vae_nodes_listed(comfy_server):
    # Descriptions, tooltips and categories of every pack node: tests/test_nodes_schema.py.
    info = comfy_server.object_info
    assert info["VARLoadVAE"]["output"] == ["VAR_VAE"]
    assert info["VAREncodePyramid"]["output"] == ["VAR_PYRAMID"]
    assert info["VARDecodePyramid"]["output"] == ["IMAGE"]
    # The combo lists every file in models/var/ (the session server holds every fixture model) and the demo model.
    assert info["VARLoadVAE"]["input"]["required"]["vae_name"][1]["options"] == sorted([*SERVER_MODELS, *DEMO_FILES])


@pytest.mark.parametrize("case", ["sq64", "rect96x144"])
def test_vae_round_trip_matches_var_core(comfy_server, case):
    png = FIXTURES / "A_bsq_vae" / f"{case}_input.png"
    image_name = comfy_server.add_input(png)
    entry = comfy_server.run(vae_graph(image_name, FIXTURE_VAE.name, f"var_{case}"))
    assert entry["status"]["status_str"] == "success", json.dumps(execution_error(entry), indent=1)[:4000]
    images = entry["outputs"]["5"]["images"]
    assert len(images) == 1
    with Image.open(io.BytesIO(comfy_server.output_image(images[0]))) as im:
        assert im.mode == "RGB"
        got = np.asarray(im)
    want = reference_uint8(png)
    with Image.open(png) as im:
        assert got.shape == (im.height, im.width, 3)
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= 1, f"max |diff| {diff.max()} over {np.count_nonzero(diff > 1)} values"
    assert "VAR VAE vae_tiny.safetensors" in comfy_server.log_text()  # the loader's log line
    assert "dtype torch.float32" in comfy_server.log_text()  # auto = fp32 on --cpu


def test_wrong_family_file_fails_with_clear_message(comfy_server):
    png = FIXTURES / "A_bsq_vae" / "sq64_input.png"
    image_name = comfy_server.add_input(png)
    wrong = comfy_server.add_model(SWINIR, name="not_a_vae_swinir.safetensors")
    entry = comfy_server.run(vae_graph(image_name, wrong, "var_wrong"))
    assert entry["status"]["status_str"] == "error"
    err = execution_error(entry)
    assert err is not None, entry["status"]
    assert err["node_type"] == "VARLoadVAE"
    assert err["exception_type"].endswith("CheckpointError")
    # ComfyUI shows exception_message under the node's name: our text must come first.
    message = err["exception_message"]
    assert message.startswith("not_a_vae_swinir.safetensors "), message
    assert "SwinIR" in message and "Infinity BSQ multi-scale VAE" in message, message
    assert "Traceback" not in message

    # The server is still alive and runs the next prompt.
    assert comfy_server.get_json("/system_stats")["system"]["comfyui_version"]
    entry = comfy_server.run(vae_graph(image_name, FIXTURE_VAE.name, "var_after_error"))
    assert entry["status"]["status_str"] == "success", json.dumps(execution_error(entry), indent=1)[:4000]
    assert entry["outputs"]["5"]["images"]


def test_unknown_vae_name_fails_with_clear_message(comfy_server):
    # ComfyUI 0.3.75 does not check V3 combo values against their options at validation, so
    # the node itself must explain a file that is not in models/var/.
    image_name = comfy_server.add_input(FIXTURES / "A_bsq_vae" / "sq64_input.png")
    entry = comfy_server.run(vae_graph(image_name, "missing_vae.pth", "var_missing"))
    err = execution_error(entry)
    assert err is not None and err["node_type"] == "VARLoadVAE", entry["status"]
    assert err["exception_message"].startswith("model file 'missing_vae.pth' not found in models/var/")


def test_unknown_weight_dtype_fails_with_clear_message(comfy_server):
    image_name = comfy_server.add_input(FIXTURES / "A_bsq_vae" / "sq64_input.png")
    entry = comfy_server.run(vae_graph(image_name, FIXTURE_VAE.name, "var_fp16", weight_dtype="fp16"))
    err = execution_error(entry)
    assert err is not None and err["node_type"] == "VARLoadVAE", entry["status"]
    assert err["exception_message"].startswith("weight_dtype 'fp16' is not one of"), err["exception_message"]


# -- GPU: the same graph in a ComfyUI that runs on CUDA (VAR_TEST_GPU=1) ------------------------


@pytest.fixture(scope="module", params=["normal_vram", "novram"])
def comfy_gpu_server(request, tmp_path_factory):
    """ComfyUI on CUDA; ``--novram`` makes ModelPatcher load the VAE partially (lowvram casting)."""
    import os

    from comfy_harness import ComfyServer, comfyui_installed

    if os.environ.get("VAR_TEST_GPU") != "1" or not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU and VAR_TEST_GPU=1")
    if not comfyui_installed():
        pytest.skip("ComfyUI is not installed: run `.venv/bin/python tests/install_comfyui.py`")
    extra = ["--novram"] if request.param == "novram" else []
    server = ComfyServer(tmp_path_factory.mktemp("comfyui_gpu"), cpu=False, extra_args=extra)
    server.prepare()
    server.add_model(FIXTURE_VAE)
    server.start()
    yield server
    server.stop()


@pytest.mark.gpu
@pytest.mark.parametrize("weight_dtype", ["auto", "bf16"])
@pytest.mark.parametrize("case", ["sq64", "rect96x144"])
def test_vae_round_trip_on_gpu(comfy_gpu_server, case, weight_dtype):
    png = FIXTURES / "A_bsq_vae" / f"{case}_input.png"
    image_name = comfy_gpu_server.add_input(png)
    entry = comfy_gpu_server.run(vae_graph(image_name, FIXTURE_VAE.name, f"gpu_{case}_{weight_dtype}", weight_dtype))
    assert entry["status"]["status_str"] == "success", json.dumps(execution_error(entry), indent=1)[:4000]
    with Image.open(io.BytesIO(comfy_gpu_server.output_image(entry["outputs"]["5"]["images"][0]))) as im:
        got = np.asarray(im).astype(np.int16)
    want = reference_uint8(png).astype(np.int16)
    assert got.shape == want.shape
    log = comfy_gpu_server.log_text()
    assert "load device cuda" in log
    assert ("dtype torch.bfloat16" if weight_dtype == "bf16" else "dtype torch.float32") in log
    diff = np.abs(got - want)
    if weight_dtype == "auto":  # fp32
        # TF32 convolutions may flip a low-margin bit or two of the random tiny VAE.
        assert diff.mean() < 1.0 and diff.max() <= 8, f"mean |diff| {diff.mean():.3f}, max {diff.max()}"
    else:
        # bf16 weights flip 1-3% of the finest-scale bits of this random tiny VAE, which its
        # decoder amplifies (~25 levels mean on CPU too): be as close as a CPU bf16 round trip is.
        cpu_bf16 = np.abs(reference_uint8(png, torch.bfloat16).astype(np.int16) - want).mean()
        assert diff.mean() < 2 * cpu_bf16 + 2, f"mean |diff| {diff.mean():.3f} vs CPU bf16 {cpu_bf16:.3f}"
