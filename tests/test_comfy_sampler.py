"""The iterative Infinity teacher nodes end to end in a real ComfyUI (``--cpu``), against var_core in this process.

LoadImage -> VARLoadStudent (strip_lora: the student file as its own teacher) + VARLoadVAE ->
VARIterativeRestore -> SaveImage must equal ``var_core.restore.iterative_restore_image`` within one
level; VARTextToImage (empty prompt) must give the template's size, the seed's images and a
pyramid that decodes to them; ``/interrupt`` stops a long iterative run and the server goes on.
"""

from __future__ import annotations

import io
import struct
import time


import numpy as np
import pytest
import torch
from comfy_harness import WebSocketEvents, execution_error
from conftest import FIXTURE_STUDENT, FIXTURE_VAE, FIXTURES
from PIL import Image
from test_comfy_restore import assert_close, install_t5, make_tiny_t5, read_rgb, run_ok, saved, to_uint8

import var_core
from var_core import image as var_image
from var_core import restore as var_restore
from var_core import sampler as var_sampler
from var_core.lora import strip_lora
from var_core.schedules import scale_schedule, schedule_pixels

pytestmark = pytest.mark.comfyui

WINTER = FIXTURES.parent / "images" / "real_lq" / "winter.png"
NEW_NODES = ("VARIterativeRestore", "VARTextToImage")


@pytest.fixture(scope="module")
def teacher():
    model = strip_lora(var_core.load(FIXTURE_STUDENT, expect=var_core.Family.INFINITY).model)
    vae = var_core.load(FIXTURE_VAE, expect=var_core.Family.INFINITY_BSQ_VAE).model
    return model, vae


@pytest.fixture(scope="module")
def t5_name(comfy_server, tmp_path_factory):
    return install_t5(comfy_server, make_tiny_t5(tmp_path_factory.mktemp("t5") / "tiny-t5"))


def loaders(strip=True) -> dict:
    return {
        "2": {"class_type": "VARLoadVAE", "inputs": {"vae_name": FIXTURE_VAE.name, "weight_dtype": "auto"}},
        "3": {"class_type": "VARLoadStudent", "inputs": {"model_name": FIXTURE_STUDENT.name, "merge_lora": True,
                                                         "weight_dtype": "auto", "strip_lora": strip}},
    }


def iterative_graph(image_name: str, prefix: str, *, seed=0, cfg=3.0, tau=1.0, top_k=1, top_p=0.0,
                    next_scale="area", scale=2.0, tile=128, overlap=32, color_fix="none") -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        **loaders(),
        "4": {"class_type": "VARIterativeRestore",
              "inputs": {"model": ["3", 0], "vae": ["2", 0], "image": ["1", 0], "seed": seed, "cfg": cfg, "tau": tau,
                         "top_k": top_k, "top_p": top_p, "next_scale": next_scale, "scale": scale, "tile_size": tile,
                         "tile_overlap": overlap, "color_fix": color_fix}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": prefix}},
    }


def t2i_graph(t5_name: str, prefix: str, *, seed=0, aspect="0.666", pn="0.06M", batch=1, cfg=3.0, top_k=900) -> dict:
    return {
        **loaders(),
        "6": {"class_type": "VARLoadT5", "inputs": {"t5_name": t5_name, "weight_dtype": "auto"}},
        "7": {"class_type": "VARTextEncode", "inputs": {"t5": ["6", 0], "prompt": ""}},
        "4": {"class_type": "VARTextToImage",
              "inputs": {"model": ["3", 0], "vae": ["2", 0], "text": ["7", 0], "seed": seed, "cfg": cfg, "tau": 1.0,
                         "top_k": top_k, "top_p": 0.97, "next_scale": "area", "aspect_ratio": aspect,
                         "pixel_budget": pn, "batch_size": batch}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": prefix}},
        "8": {"class_type": "VARDecodePyramid", "inputs": {"vae": ["2", 0], "pyramid": ["4", 1]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix + "_pyramid"}},
    }


def saved_all(server, entry, node="5") -> list[np.ndarray]:
    out = []
    for ref in entry["outputs"][node]["images"]:
        with Image.open(io.BytesIO(server.output_image(ref))) as im:
            out.append(np.asarray(im).copy())
    return out


def test_nodes_listed_with_descriptions_and_tooltips(comfy_server):
    info = comfy_server.object_info
    for node_id in NEW_NODES:
        node = info[node_id]
        assert node["description"].strip() and node["category"].startswith("image/restoration/VAR/"), node_id
        inputs = {**node["input"].get("required", {}), **node["input"].get("optional", {})}
        for name, (_type, opts) in inputs.items():
            assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
    restore = info["VARIterativeRestore"]
    assert restore["output"] == ["IMAGE"]
    assert list(restore["input"]["required"]) == ["model", "vae", "image", "seed", "cfg", "tau", "top_k", "top_p",
                                                  "next_scale", "scale", "tile_size", "tile_overlap", "color_fix"]
    assert sorted(restore["input"]["optional"]) == ["swinir", "text"]
    assert restore["input"]["required"]["next_scale"][1]["options"] == ["area", "trilinear"]
    t2i = info["VARTextToImage"]
    assert t2i["output"] == ["IMAGE", "VAR_PYRAMID"]
    assert list(t2i["input"]["optional"]) == ["negative_text"]
    required = t2i["input"]["required"]
    assert "1.000" in required["aspect_ratio"][1]["options"] and "0.666" in required["aspect_ratio"][1]["options"]
    assert required["pixel_budget"][1]["options"] == ["0.06M", "0.25M", "0.60M", "1M"]
    loader = info["VARLoadStudent"]["input"]
    assert list(loader["required"]) == ["model_name", "merge_lora", "weight_dtype"]  # saved workflows: by position
    assert list(loader["optional"]) == ["strip_lora"] and loader["optional"]["strip_lora"][1]["default"] is False


def test_iterative_restore_matches_var_core(comfy_server, teacher):
    entry = run_ok(comfy_server, iterative_graph(comfy_server.add_input(WINTER), "iterative", seed=0))
    got = saved(comfy_server, entry)
    with Image.open(WINTER) as im:
        assert got.shape == (2 * im.height, 2 * im.width, 3)
    with torch.inference_mode():
        y = var_restore.iterative_restore_image(
            *teacher, var_image.to_model(read_rgb(WINTER)),
            options=var_restore.RestoreOptions(scale=2.0, tile=128, overlap=32, seed=0),
            sampler_options=var_sampler.SamplerOptions(cfg=3.0, tau=1.0, top_k=1, top_p=0.0))
    assert_close(got, to_uint8(var_image.from_model(y)))
    log = comfy_server.log_text()
    assert "LoRA adapters stripped" in log and "VAR iterative restore: 1 image(s)" in log


def test_text_to_image_size_seeds_and_pyramid(comfy_server, teacher, t5_name):
    schedule = scale_schedule(0.666, "0.06M")
    H, W = schedule_pixels(schedule)
    runs = {}
    for i, seed in enumerate((5, 6, 5)):
        entry = run_ok(comfy_server, t2i_graph(t5_name, f"t2i_{i}", seed=seed))
        (image,) = saved_all(comfy_server, entry)
        (decoded,) = saved_all(comfy_server, entry, "9")
        assert image.shape == (H, W, 3)
        assert_close(decoded, image)  # the pyramid output holds the generated bits
        runs[i] = image
    assert np.array_equal(runs[0], runs[2])  # run 2 really samples again: run 1 evicted seed 5 from the cache
    assert not np.array_equal(runs[0], runs[1])
    with torch.inference_mode():
        res = var_sampler.generate(*teacher, None, schedule, var_sampler.SamplerOptions(cfg=3.0, seed=5), batch=2)
    want = [to_uint8(var_image.from_model(res.image[i : i + 1])) for i in range(2)]
    assert_close(runs[0], want[0])
    batch = saved_all(comfy_server, run_ok(comfy_server, t2i_graph(t5_name, "t2i_batch", seed=5, batch=2)))
    assert len(batch) == 2
    assert_close(batch[0], want[0])
    assert_close(batch[1], runs[1])  # image 1 of a batch uses seed + 1
    assert "VAR text to image: 2 image(s) of 336x224, 7 scales" in comfy_server.log_text()


def test_text_to_image_sends_a_preview_per_scale(comfy_server, t5_name):
    with WebSocketEvents(comfy_server) as listener:
        run_ok(comfy_server, t2i_graph(t5_name, "t2i_preview", seed=11))
        time.sleep(0.3)  # the last messages are sent from the server's loop
    previews = []
    for data in listener.binary:
        event, image_type = struct.unpack(">II", data[:8])
        if event == 1 and image_type == 1:  # PREVIEW_IMAGE, JPEG
            with Image.open(io.BytesIO(data[8:])) as im:
                previews.append(im.size)
    assert len(previews) == 7, previews  # one per scale of the 0.06M schedule
    assert all(w > h for w, h in previews)  # the 2:3 landscape token grid


def test_interrupt_stops_a_long_run_and_the_next_prompt_succeeds(comfy_server, tmp_path):
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(big)
    # 2048 x 2048 in 1024 tiles of 64 px, 3 scales each: half a minute or more on the CPU.
    graph = iterative_graph(comfy_server.add_input(big), "interrupted", scale=4.0, tile=64, overlap=0, top_k=0,
                            top_p=0.97)
    marker = "VAR iterative restore: 1 image(s) 512x512 -> 2048x2048"
    before = comfy_server.log_text().count(marker)
    start = time.monotonic()
    prompt_id = comfy_server.queue(graph)
    while comfy_server.log_text().count(marker) == before:  # the node is running (models loaded)
        assert time.monotonic() - start < 60, comfy_server.log_tail()
        time.sleep(0.1)
    time.sleep(0.5)
    with comfy_server._request("/interrupt", {}) as r:
        assert r.status == 200
    interrupted = time.monotonic()
    entry = comfy_server.wait(prompt_id, timeout=60)
    events = [event for event, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in events and "execution_error" not in events, execution_error(entry)
    assert time.monotonic() - interrupted < 10, "the interrupt did not stop the run early"
    assert "Processing interrupted" in comfy_server.log_text()
    # The interrupt flag is consumed: the next prompt runs normally.
    entry = run_ok(comfy_server, iterative_graph(comfy_server.add_input(WINTER), "after_interrupt", seed=1,
                                                 top_k=0, top_p=0.97, scale=1.0, tile=512))
    with Image.open(WINTER) as im:
        assert saved(comfy_server, entry).shape == (im.height, im.width, 3)
