"""Every model family end to end in a real ComfyUI (``--cpu``), against var_core in this process.

Load VAR Model (+ Load VAR VQVAE / Load VAR VAE) -> VAR Restore -> SaveImage for VARSR, RestoreVAR
and VARestorer, and Load VAR Model + Load VAR VQVAE -> VAR Class to Image -> SaveImage for the
class-conditional VAR. Each saved PNG must equal the core's result computed here with the same
settings (converted to uint8 the way SaveImage does) within one level; wrong pairings must fail
with a clear message while the server keeps serving.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from comfy_harness import execution_error
from conftest import FIXTURE_RESTOREVAR, FIXTURE_STUDENT, FIXTURE_VAE, FIXTURE_VAR, FIXTURE_VARSR, FIXTURES
from PIL import Image

import var_core
from var_core import family_restore as fr
from var_core import image as var_image
from var_core import restore as var_restore
from var_core.lora import merge_lora

pytestmark = pytest.mark.comfyui

VQVAE_NAMES = {"varsr": "varsr_vqvae_tiny.safetensors", "restorevar": "restorevar_vqvae_tiny.safetensors",
               "var": "var_vqvae_tiny.safetensors"}
NEW_NODES = ("VARLoadVQVAE", "VARLoadModel", "VARRestore", "VARClassToImage")


# -- helpers ---------------------------------------------------------------------------------------------


def read_rgb(png) -> torch.Tensor:
    """``(1, H, W, 3)`` float in [0, 1], as LoadImage reads it."""
    with Image.open(png) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)[None]


def to_uint8(image_BHWC: torch.Tensor, i: int = 0) -> np.ndarray:
    return np.clip(255.0 * image_BHWC[i].numpy(), 0, 255).astype(np.uint8)  # SaveImage: truncation


def run_ok(server, graph) -> dict:
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "success", json.dumps(execution_error(entry), indent=1)[:4000]
    return entry


def saved(server, entry, node="9") -> list[np.ndarray]:
    out = []
    for ref in entry["outputs"][node]["images"]:
        with Image.open(io.BytesIO(server.output_image(ref))) as im:
            out.append(np.asarray(im).copy())
    return out


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= 1, f"max |diff| {diff.max()} over {np.count_nonzero(diff > 1)} values"


def failure(server, graph) -> dict:
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "error", entry["status"]
    err = execution_error(entry)
    assert err is not None and "Traceback" not in err["exception_message"]
    return err


def restore_inputs(**overrides) -> dict:
    inputs = {"seed": 0, "scale": 1.0, "tile_size": 64, "tile_overlap": 16, "color_fix": "auto",
              "sampling": "argmax", "varsr_cfg": 6.0, "varsr_refiner_steps": 10, "varsr_top_k": 1,
              "varsr_top_p": 0.75, "restorevar_refine": True}
    inputs.update(overrides)
    return inputs


def restore_graph(image_name: str, prefix: str, model_name: str, vae: tuple[str, str], **overrides) -> dict:
    """LoadImage -> VARLoadModel + (VARLoadVQVAE | VARLoadVAE) -> VARRestore -> SaveImage."""
    vae_node, vae_name = vae
    vae_key = "vqvae_name" if vae_node == "VARLoadVQVAE" else "vae_name"
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "2": {"class_type": "VARLoadModel", "inputs": {"model_name": model_name, "merge_lora": True,
                                                       "weight_dtype": "auto"}},
        "3": {"class_type": vae_node, "inputs": {vae_key: vae_name, "weight_dtype": "auto"}},
        "4": {"class_type": "VARRestore", "inputs": {"model": ["2", 0], "vae": ["3", 0], "image": ["1", 0],
                                                     **restore_inputs(**overrides)}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": prefix}},
    }


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A 3:2 crop of VARSR's LR fixture image and a 2:3-stretched RestoreVAR degraded image."""
    folder = tmp_path_factory.mktemp("family_images")
    with Image.open(FIXTURES / "E_varsr" / "lr0.png") as im:
        im.convert("RGB").crop((4, 10, 52, 42)).save(folder / "varsr_32x48.png")  # 48 wide, 32 high
    with Image.open(FIXTURES / "F_restorevar" / "degraded0.png") as im:
        im.convert("RGB").resize((64, 96), Image.BICUBIC).save(folder / "restorevar_96x64.png")  # 1:1.5
    return folder


def load(path, family):
    return var_core.load(path, expect=family).model


# -- tests -------------------------------------------------------------------------------------------------


def test_nodes_listed_with_descriptions_and_tooltips(comfy_server):
    info = comfy_server.object_info
    for node_id in NEW_NODES:
        node = info[node_id]
        assert node["description"].strip(), node_id
        assert node["category"].startswith("image/restoration/VAR/"), node_id
        inputs = {**node["input"].get("required", {}), **node["input"].get("optional", {})}
        for name, (_type, opts) in inputs.items():
            assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert info["VARLoadVQVAE"]["output"] == ["VAR_VQVAE"]
    assert info["VARLoadModel"]["output"] == ["VAR_MODEL"]
    assert info["VARClassToImage"]["output"] == ["IMAGE"]
    restore = info["VARRestore"]
    assert list(restore["input"]["required"]) == ["model", "vae", "image", *restore_inputs()]
    assert sorted(restore["input"]["optional"]) == ["swinir", "text"]
    assert restore["input"]["required"]["vae"][0] == "VAR_VAE,VAR_VQVAE"  # one socket for both kinds of VAE
    assert restore["input"]["required"]["color_fix"][1]["options"] == ["auto", "none", "wavelet", "adain"]
    names = info["VARLoadModel"]["input"]["required"]["model_name"][1]["options"]
    assert {FIXTURE_VARSR.name, FIXTURE_RESTOREVAR.name, FIXTURE_VAR.name, FIXTURE_STUDENT.name} <= set(names)


def test_varsr_restore_matches_var_core(comfy_server, images):
    png = images / "varsr_32x48.png"
    graph = restore_graph(comfy_server.add_input(png), "varsr", FIXTURE_VARSR.name,
                          ("VARLoadVQVAE", VQVAE_NAMES["varsr"]), seed=3, scale=2.0)
    (got,) = saved(comfy_server, run_ok(comfy_server, graph))
    assert got.shape == (64, 96, 3)  # 3:2 kept, two 64 px tiles
    model = load(FIXTURE_VARSR, var_core.Family.VARSR)
    vqvae = load(FIXTURES / "E_varsr" / "vqvae_tiny.safetensors", var_core.Family.VAR_VQVAE)
    with torch.inference_mode():
        y = fr.varsr_restore_image(model, vqvae, var_image.to_model(read_rgb(png)),
                                   options=var_restore.RestoreOptions(scale=2.0, tile=64, overlap=16, seed=3))
    assert_close(got, to_uint8(var_image.from_model(y)))
    log = comfy_server.log_text()
    assert f"VAR model {FIXTURE_VARSR.name}: VARSR" in log and "VAR restore (VARSR" in log


def test_restorevar_restore_matches_var_core(comfy_server, images):
    png = images / "restorevar_96x64.png"
    graph = restore_graph(comfy_server.add_input(png), "restorevar", FIXTURE_RESTOREVAR.name,
                          ("VARLoadVQVAE", VQVAE_NAMES["restorevar"]), seed=11)
    (got,) = saved(comfy_server, run_ok(comfy_server, graph))
    assert got.shape == (96, 64, 3)  # restored at the input size
    model = load(FIXTURE_RESTOREVAR, var_core.Family.RESTOREVAR)
    vqvae = load(FIXTURES / "F_restorevar" / "vqvae_tiny.safetensors", var_core.Family.VAR_VQVAE)
    with torch.inference_mode():
        y = fr.restorevar_restore_image(model, vqvae, var_image.to_model(read_rgb(png)),
                                        options=var_restore.RestoreOptions(scale=1.0, tile=64, overlap=16))
    assert_close(got, to_uint8(var_image.from_model(y)))


def test_varestorer_through_var_restore_matches_var_core(comfy_server):
    png = FIXTURES / "A_bsq_vae" / "sq64_input.png"
    graph = restore_graph(comfy_server.add_input(png), "varestorer_generic", FIXTURE_STUDENT.name,
                          ("VARLoadVAE", FIXTURE_VAE.name), scale=2.0, tile_size=512, tile_overlap=64,
                          color_fix="wavelet")
    (got,) = saved(comfy_server, run_ok(comfy_server, graph))
    model = load(FIXTURE_STUDENT, var_core.Family.INFINITY)
    merge_lora(model)
    vae = load(FIXTURE_VAE, var_core.Family.INFINITY_BSQ_VAE)
    with torch.inference_mode():
        y = var_restore.restore_image(model, vae, var_image.to_model(read_rgb(png)),
                                      options=var_restore.RestoreOptions(scale=2.0, sampling="argmax",
                                                                         color_fix="wavelet"))
    assert got.shape == (128, 128, 3)
    assert_close(got, to_uint8(var_image.from_model(y)))


def test_class_to_image_matches_var_core(comfy_server):
    graph = {
        "2": {"class_type": "VARLoadModel", "inputs": {"model_name": FIXTURE_VAR.name, "merge_lora": True,
                                                       "weight_dtype": "auto"}},
        "3": {"class_type": "VARLoadVQVAE", "inputs": {"vqvae_name": VQVAE_NAMES["var"], "weight_dtype": "auto"}},
        "4": {"class_type": "VARClassToImage", "inputs": {"model": ["2", 0], "vqvae": ["3", 0], "class_index": 3,
                                                          "seed": 5, "cfg": 4.0, "top_k": 100, "top_p": 0.95,
                                                          "more_smooth": False, "batch_size": 2}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "var_class"}},
    }
    got = saved(comfy_server, run_ok(comfy_server, graph))
    assert len(got) == 2
    model = load(FIXTURE_VAR, var_core.Family.VAR)
    vqvae = load(FIXTURES / "D_var" / "vqvae_tiny.safetensors", var_core.Family.VAR_VQVAE)
    with torch.inference_mode():
        y = var_image.from_model(fr.generate_class_images(model, vqvae, 3, batch=2, seed=5, cfg=4.0, top_k=100,
                                                          top_p=0.95))
    for i in range(2):
        assert got[i].shape == (64, 64, 3)
        assert_close(got[i], to_uint8(y, i))


def test_wrong_pairings_fail_clearly_and_the_server_goes_on(comfy_server, images):
    image_name = comfy_server.add_input(images / "varsr_32x48.png")
    # VARSR with the BSQ VAE of VARestorer
    err = failure(comfy_server, restore_graph(image_name, "varsr_bsq", FIXTURE_VARSR.name,
                                              ("VARLoadVAE", FIXTURE_VAE.name)))
    assert err["node_type"] == "VARRestore" and err["exception_type"].endswith("ParameterError")
    assert err["exception_message"].startswith(
        f"VAR Restore: {FIXTURE_VARSR.name} is VARSR, which works with its VAR VQVAE (VQVAE.pth from Load VAR "
        "VQVAE)"), err["exception_message"]
    # VARestorer with a VQVAE
    err = failure(comfy_server, restore_graph(image_name, "student_vq", FIXTURE_STUDENT.name,
                                              ("VARLoadVQVAE", VQVAE_NAMES["varsr"])))
    assert "restores with the Infinity BSQ VAE" in err["exception_message"], err["exception_message"]
    # RestoreVAR with VARSR's VQVAE (another codebook)
    err = failure(comfy_server, restore_graph(image_name, "restorevar_vq", FIXTURE_RESTOREVAR.name,
                                              ("VARLoadVQVAE", VQVAE_NAMES["varsr"])))
    assert "does not belong to" in err["exception_message"], err["exception_message"]
    # the generation-only VAR in the restorer, and a VARSR model in the VARestorer-only node
    err = failure(comfy_server, restore_graph(image_name, "var_restore", FIXTURE_VAR.name,
                                              ("VARLoadVQVAE", VQVAE_NAMES["var"])))
    assert err["exception_message"].startswith(f"VAR Restore cannot run {FIXTURE_VAR.name}: it is the "
                                               "class-conditional VAR"), err["exception_message"]
    one_step = restore_graph(image_name, "one_step_varsr", FIXTURE_VARSR.name, ("VARLoadVAE", FIXTURE_VAE.name))
    one_step["4"] = {"class_type": "VAROneStepRestore",
                     "inputs": {"model": ["2", 0], "vae": ["3", 0], "image": ["1", 0], "seed": 0, "sampling": "argmax",
                                "scale": 1.0, "tile_size": 512, "tile_overlap": 64, "color_fix": "none"}}
    err = failure(comfy_server, one_step)
    assert err["node_type"] == "VAROneStepRestore"
    assert "VAR One-Step Restore cannot run" in err["exception_message"] and "use VAR Restore" in err[
        "exception_message"]
    # a VQVAE file picked as the transformer
    err = failure(comfy_server, restore_graph(image_name, "vq_as_model", VQVAE_NAMES["varsr"],
                                              ("VARLoadVQVAE", VQVAE_NAMES["varsr"])))
    assert err["node_type"] == "VARLoadModel"
    assert err["exception_message"].startswith(f"{VQVAE_NAMES['varsr']} is the wrong model here")
    # the server still restores
    (got,) = saved(comfy_server, run_ok(comfy_server, restore_graph(
        image_name, "after_errors", FIXTURE_VARSR.name, ("VARLoadVQVAE", VQVAE_NAMES["varsr"]), seed=1)))
    assert got.shape == (32, 48, 3)


def test_bf16_weights(comfy_server, images):
    """bf16 weights. The transformer's casting layers compute in float32 from the rounded weights on the
    CPU; the VQVAE computes in its own precision (bf16)."""
    png = images / "varsr_32x48.png"
    graph = restore_graph(comfy_server.add_input(png), "varsr_bf16", FIXTURE_VARSR.name,
                          ("VARLoadVQVAE", VQVAE_NAMES["varsr"]), seed=3, scale=2.0)
    graph["2"]["inputs"]["weight_dtype"] = graph["3"]["inputs"]["weight_dtype"] = "bf16"
    (got,) = saved(comfy_server, run_ok(comfy_server, graph))
    assert "VAR model varsr_tiny.safetensors: VARSR" in comfy_server.log_text()
    model = load(FIXTURE_VARSR, var_core.Family.VARSR)
    vqvae = load(FIXTURES / "E_varsr" / "vqvae_tiny.safetensors", var_core.Family.VAR_VQVAE)
    for p in model.parameters():
        p.data = p.data.bfloat16().float()
    vqvae = vqvae.to(torch.bfloat16)
    with torch.inference_mode():
        y = fr.varsr_restore_image(model, vqvae, var_image.to_model(read_rgb(png)),
                                   options=var_restore.RestoreOptions(scale=2.0, tile=64, overlap=16, seed=3))
    want = to_uint8(var_image.from_model(y))
    # bf16 convolutions on the CPU round differently from one process (thread count) to another, which
    # flips a few nearest-neighbour codes of this random tiny VQVAE (measured: mean |diff| 1.0, max 19).
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.mean() < 2.0, f"mean |diff| {diff.mean():.3f}, max {diff.max()}"
    assert got.std() > 10
