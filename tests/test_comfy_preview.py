"""VAR Pyramid Preview and the VAR_PYRAMID output of VAR One-Step Restore in a real ComfyUI (``--cpu``).

The frames of an encoded image must be var_core's progressive decode computed in this process
(within one level, as SaveImage writes them), a batch is laid out image-major, and the pyramid a
restore outputs must decode to the restored image when it was restored as one tile (or from a
pyramid); a tiled restore outputs the VAE encoding of its result.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from comfy_harness import execution_error
from conftest import FIXTURE_STUDENT, FIXTURE_VAE, FIXTURES
from PIL import Image

import var_core
from var_core import image as var_image
from var_core import pyramid as var_pyramid
from var_core import restore as var_restore
from var_core.lora import merge_lora
from var_core.schedules import fit_schedule

pytestmark = pytest.mark.comfyui

RECT = FIXTURES / "A_bsq_vae" / "rect96x144_input.png"  # a 5-scale 2:3 schedule
SQ64 = FIXTURES / "A_bsq_vae" / "sq64_input.png"


def run_ok(server, graph) -> dict:
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "success", json.dumps(execution_error(entry), indent=1)[:4000]
    return entry


def saved(server, entry, node: str) -> list[np.ndarray]:
    out = []
    for ref in entry["outputs"][node]["images"]:
        with Image.open(io.BytesIO(server.output_image(ref))) as im:
            out.append(np.asarray(im).astype(np.int16))
    return out


def to_uint8(image_BHWC: torch.Tensor) -> np.ndarray:
    return np.clip(255.0 * image_BHWC.numpy(), 0, 255).astype(np.uint8).astype(np.int16)  # SaveImage: truncation


def assert_close(got: np.ndarray, want: np.ndarray, levels: int = 1) -> None:
    assert got.shape == want.shape
    diff = np.abs(got - want)
    assert diff.max() <= levels, f"max |diff| {diff.max()} over {np.count_nonzero(diff > levels)} values"


def save(graph: dict, node: str, source: list, prefix: str) -> None:
    graph[node] = {"class_type": "SaveImage", "inputs": {"images": source, "filename_prefix": prefix}}


def test_preview_of_an_encoded_image_and_a_batch(comfy_server):
    name = comfy_server.add_input(RECT)
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "VARLoadVAE", "inputs": {"vae_name": FIXTURE_VAE.name, "weight_dtype": "auto"}},
        "3": {"class_type": "VAREncodePyramid", "inputs": {"vae": ["2", 0], "image": ["1", 0]}},
        "4": {"class_type": "VARPreviewPyramid", "inputs": {"vae": ["2", 0], "pyramid": ["3", 0], "columns": 0}},
        "7": {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 2}},
        "8": {"class_type": "VAREncodePyramid", "inputs": {"vae": ["2", 0], "image": ["7", 0]}},
        "9": {"class_type": "VARPreviewPyramid", "inputs": {"vae": ["2", 0], "pyramid": ["8", 0], "columns": 2}},
    }
    save(graph, "5", ["4", 0], "preview_frames")
    save(graph, "6", ["4", 1], "preview_grid")
    save(graph, "10", ["9", 0], "preview_batch")
    save(graph, "11", ["9", 1], "preview_batch_grid")
    entry = run_ok(comfy_server, graph)

    vae = var_core.load(FIXTURE_VAE, expect=var_core.Family.INFINITY_BSQ_VAE).model
    with torch.inference_mode():
        x = var_image.load_image_file(RECT)[..., :3]
        frames = var_pyramid.progressive_decode(vae, var_pyramid.encode_image(vae, var_image.to_model(x)))
    want = to_uint8(var_image.from_model(frames[0]))  # (5, 96, 144, 3)
    got = saved(comfy_server, entry, "5")
    assert len(got) == 5
    for g, w in zip(got, want):
        assert_close(g, w)
    # Auto grid for one image of 5 scales: 3 columns, 2 rows, the last cell black.
    (grid,) = saved(comfy_server, entry, "6")
    assert grid.shape == (192, 432, 3)
    assert_close(grid[96:, 144:288], want[4])
    assert not grid[96:, 288:].any()
    # A batch of two: image-major frames (the same image twice here), 2 columns as asked.
    batch = saved(comfy_server, entry, "10")
    assert len(batch) == 10
    for k in range(5):
        assert_close(batch[k], want[k])
        assert_close(batch[5 + k], want[k])
    (batch_grid,) = saved(comfy_server, entry, "11")
    assert batch_grid.shape == (5 * 96, 2 * 144, 3)


def restore_graph(image_name: str, *, scale: float, tile: int, overlap: int, pyramid_input: bool = False) -> dict:
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "2": {"class_type": "VARLoadVAE", "inputs": {"vae_name": FIXTURE_VAE.name, "weight_dtype": "auto"}},
        "3": {"class_type": "VARLoadStudent",
              "inputs": {"model_name": FIXTURE_STUDENT.name, "merge_lora": True, "weight_dtype": "auto"}},
        "4": {"class_type": "VAROneStepRestore",
              "inputs": {"model": ["3", 0], "vae": ["2", 0], "seed": 3, "sampling": "gumbel", "scale": scale,
                         "tile_size": tile, "tile_overlap": overlap, "color_fix": "none"}},
        "6": {"class_type": "VARDecodePyramid", "inputs": {"vae": ["2", 0], "pyramid": ["4", 1]}},
        "8": {"class_type": "VARPreviewPyramid", "inputs": {"vae": ["2", 0], "pyramid": ["4", 1], "columns": 0}},
    }
    if pyramid_input:
        graph["7"] = {"class_type": "VAREncodePyramid", "inputs": {"vae": ["2", 0], "image": ["1", 0]}}
        graph["4"]["inputs"]["pyramid"] = ["7", 0]
    else:
        graph["4"]["inputs"]["image"] = ["1", 0]
    save(graph, "5", ["4", 0], "restored")
    save(graph, "9", ["6", 0], "restored_bits")
    save(graph, "10", ["8", 0], "restored_frames")
    return graph


@pytest.mark.parametrize("pyramid_input", [False, True], ids=["one_tile", "pyramid_input"])
def test_restore_outputs_its_predicted_bits(comfy_server, pyramid_input):
    log_start = len(comfy_server.log_text())
    entry = run_ok(comfy_server, restore_graph(comfy_server.add_input(SQ64), scale=1.0, tile=512, overlap=64,
                                               pyramid_input=pyramid_input))
    (restored,) = saved(comfy_server, entry, "5")
    (decoded,) = saved(comfy_server, entry, "9")
    assert_close(decoded, restored)  # the pyramid is exactly what the model predicted
    frames = saved(comfy_server, entry, "10")
    # An image restored directly is squashed up to a full 512 px tile's schedule; an encoded pyramid
    # keeps the schedule it was encoded on (the image's own grid).
    schedule = fit_schedule(64, 64) if pyramid_input else var_restore.tile_schedule(64, 64, 512)
    assert len(frames) == len(schedule)
    assert_close(frames[-1], restored)
    assert "restored in tiles" not in comfy_server.log_text()[log_start:]


def test_tiled_restore_outputs_the_encoding_of_its_result(comfy_server):
    log_start = len(comfy_server.log_text())
    entry = run_ok(comfy_server, restore_graph(comfy_server.add_input(SQ64), scale=2.0, tile=64, overlap=16))
    (restored,) = saved(comfy_server, entry, "5")
    (decoded,) = saved(comfy_server, entry, "9")
    assert restored.shape == decoded.shape == (128, 128, 3)
    assert "VAR_PYRAMID output is the VAE encoding" in comfy_server.log_text()[log_start:]
    # The encoding of var_core's restore of the same image, decoded at the restored size.
    model = var_core.load(FIXTURE_STUDENT, expect=var_core.Family.INFINITY).model
    merge_lora(model)  # VARLoadStudent's default
    vae = var_core.load(FIXTURE_VAE, expect=var_core.Family.INFINITY_BSQ_VAE).model
    options = var_restore.RestoreOptions(scale=2.0, tile=64, overlap=16, seed=3)
    with torch.inference_mode():
        x = var_image.to_model(var_image.load_image_file(SQ64)[..., :3])
        y = var_image.from_model(var_restore.restore_image(model, vae, x, options=options))
        pyr = var_pyramid.encode_image(vae, var_image.to_model(y))
        want = to_uint8(var_image.from_model(var_pyramid.decode_pyramid(vae, pyr)))[0]
    assert_close(restored, to_uint8(y)[0])
    assert_close(decoded, want)
    assert len(saved(comfy_server, entry, "10")) == len(pyr.schedule)
