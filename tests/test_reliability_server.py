"""Bad-input matrix in the real ComfyUI server (issue 9): what a prompt sent to ``/prompt`` can hold.

ComfyUI 0.3.75 does not check V3 combo values, so a model name may be any string: ``..`` and
absolute paths are refused by the loaders (only files inside ComfyUI's model folders load). A VAE
of another bit width, a NaN scale (JSON allows ``NaN``; ComfyUI's range check lets it through), an
output above the 16384 px limit fail with the pack's message. After every failure the server
still answers ``/system_stats`` (the soak, ``test_soak.py``, runs good prompts between bad ones).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from comfy_harness import execution_error
from conftest import FIXTURE_STUDENT, FIXTURE_SWINIR, FIXTURE_VAE, FIXTURES
from PIL import Image
from safetensors.torch import save_file

from test_reliability_inputs import vae_with_bits

pytestmark = [pytest.mark.comfyui, pytest.mark.reliability]

SQ64 = FIXTURES / "A_bsq_vae" / "sq64_input.png"
VAE8 = "vae_8bit.safetensors"


def one_step(image: str, *, vae: str = FIXTURE_VAE.name, model: str = FIXTURE_STUDENT.name, scale: float = 1.0) -> dict:
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "VARLoadVAE", "inputs": {"vae_name": vae, "weight_dtype": "auto"}},
        "3": {"class_type": "VARLoadStudent", "inputs": {"model_name": model, "merge_lora": True,
                                                         "weight_dtype": "auto"}},
        "4": {"class_type": "VAROneStepRestore",
              "inputs": {"model": ["3", 0], "vae": ["2", 0], "image": ["1", 0], "seed": 0, "sampling": "argmax",
                         "scale": scale, "tile_size": 512, "tile_overlap": 64, "color_fix": "none"}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }
    return graph


def fails(server, graph: dict, node_type: str, exception: str, *fragments: str) -> str:
    """Run ``graph``: it must fail in ``node_type`` with ``exception`` and a message holding ``fragments``;
    the server must answer ``/system_stats`` afterwards."""
    entry = server.run(graph)
    err = execution_error(entry)
    assert err is not None, entry["status"]
    message = err["exception_message"]
    assert err["node_type"] == node_type and err["exception_type"].endswith(exception), json.dumps(err)[:2000]
    assert "Traceback" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert server.get_json("/system_stats")["system"]
    return message


@pytest.fixture(scope="module")
def image_name(comfy_server):
    return comfy_server.add_input(SQ64, name="rel_sq64.png")


@pytest.mark.parametrize("loader,field,name,labels", [
    ("VARLoadVAE", "vae_name", "../../../../etc/passwd", "models/var/"),
    ("VARLoadVAE", "vae_name", str(FIXTURES / "A_bsq_vae" / "vae_tiny.safetensors"), "models/var/"),
    ("VARLoadModel", "model_name", "sub/../../" + FIXTURE_STUDENT.name, "models/var/"),
    ("VARLoadVQVAE", "vqvae_name", "..\\..\\vqvae.pth", "models/var/"),
    ("VARLoadSwinIR", "swinir_name", "/" + FIXTURE_SWINIR.name, "models/var/ or models/upscale_models/"),
], ids=["dotdot", "absolute-existing-file", "dotdot-in-subfolder", "windows-dotdot", "absolute"])
def test_model_names_outside_the_model_folders_are_refused(comfy_server, loader, field, name, labels):
    inputs = {field: name, "weight_dtype": "auto"}
    if loader == "VARLoadModel":
        inputs["merge_lora"] = True
    graph = {"1": {"class_type": loader, "inputs": inputs},
             "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    fails(comfy_server, graph, loader, "CheckpointError", f"model name {name!r} is refused: it points outside {labels}",
          f"Put the file in {labels}")


def test_text_encoder_names_outside_the_folder_are_refused(comfy_server):
    graph = {"1": {"class_type": "VARLoadT5", "inputs": {"t5_name": "../var", "weight_dtype": "auto"}},
             "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    fails(comfy_server, graph, "VARLoadT5", "CheckpointError", "text encoder '../var' is not a folder name in "
          "models/text_encoders/", "flan-t5-xl")


def test_vae_of_another_bit_width_is_refused(comfy_server, image_name, tmp_path):
    save_file({k: v.contiguous() for k, v in vae_with_bits(8).items()}, str(tmp_path / VAE8))
    comfy_server.add_model(tmp_path / VAE8)
    fails(comfy_server, one_step(image_name, vae=VAE8), "VAROneStepRestore", "ParameterError",
          f"the VAE {VAE8} has 8-bit tokens but the model {FIXTURE_STUDENT.name} reads 16-bit tokens",
          "use the VAE that belongs to the model")


def test_nan_scale_is_refused_by_the_node(comfy_server, image_name):
    fails(comfy_server, one_step(image_name, scale=float("nan")), "VAROneStepRestore", "ParameterError",
          "scale must be in (0, 8], got nan")


def test_output_above_the_size_limit_is_refused(comfy_server):
    strip = np.random.default_rng(0).integers(0, 256, (16, 8000, 3), dtype=np.uint8)  # an 8000 px side
    name = "rel_strip8000.png"
    Image.fromarray(strip).save(comfy_server.input_dir / name)
    fails(comfy_server, one_step(name, scale=4.0), "VAROneStepRestore", "ParameterError",
          "the output would be 32000x64 pixels, more than the 16384 px per side", "lower the scale or crop the image")

