"""The shipped workflows (UI format) are consistent with the nodes the real ComfyUI lists, and run.

Each workflow is converted to an API prompt the way the frontend does it (widget values by
position, a seed's "control after generate" value skipped, frontend-only notes left out), its
official model names swapped for the tiny fixture files, its sizes shrunk for a quick CPU run,
and queued on the real server; every SaveImage must have saved an image of the expected size, and
every PreviewImage shown one.
"""

import io
import json
from pathlib import Path

import pytest
from conftest import FIXTURE_STUDENT
from PIL import Image
from safetensors.torch import load_file, save_file
from test_comfy_restore import install_t5, make_tiny_t5

from var_core.lora import split_state_dict
from var_core.tiling import count_tiles

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
SHARED = REPO.parent / "shared"
FIXTURE_TEACHER = "infinity_teacher_tiny.safetensors"  # the student's base weights (as fixture C's teacher)
FIXTURE_T5 = "tiny-t5-workflows"
# Official file name -> the tiny fixture the test server has in models/var/ (or models/text_encoders/).
FIXTURE_FOR = {
    "infinity_vae_d32reg.pth": "vae_tiny.safetensors",
    "varestorer.pth": "varestorer_tiny_lora.safetensors",
    "infinity_2b_reg.pth": FIXTURE_TEACHER,
    "general_swinir_v1.ckpt": "swinir_tiny.safetensors",
    "flan-t5-xl": FIXTURE_T5,
    "VARSR.pth": "varsr_tiny.safetensors",
    "VQVAE.pth": "varsr_vqvae_tiny.safetensors",
    "restorevar.pth": "restorevar_tiny.safetensors",
    "vae_restorevar.ckpt": "restorevar_vqvae_tiny.safetensors",
}
FRONTEND_ONLY = ("Note", "MarkdownNote")  # drawn by the frontend, never sent to the server
RESTORE_NODES = ("VAROneStepRestore", "VARIterativeRestore", "VARRestore")
# Test-run settings per workflow on top of scale 1 (restore nodes) and the 0.06M budget (text to
# image): the tiled workflow keeps several tiles on the 200x200 dog.
SHRINK = {"varestorer_large_image_tiled.json": {"tile_size": 128, "tile_overlap": 32}}
# Size (width, height) of every image each workflow saves in the test run.
SAVED_SIZE = {
    "varestorer_x4_restore.json": (200, 200),
    "varestorer_demo_restore.json": (200, 200),
    "varestorer_large_image_tiled.json": (200, 200),
    "infinity_iterative_restore.json": (200, 200),
    "one_step_vs_iterative.json": (200, 200),
    "infinity_text_to_image.json": (256, 256),
    "varsr_x4_restore.json": (200, 200),
    "restorevar_restore.json": (200, 200),
}

pytestmark = pytest.mark.comfyui


def _is_socket(spec) -> bool:
    return isinstance(spec[0], str) and spec[0] not in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def to_api(workflow: dict, object_info: dict) -> dict:
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        info = object_info[node["type"]]
        inputs = {}
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                _, src, slot, *_ = links[inp["link"]]
                inputs[inp["name"]] = [str(src), slot]
        values = list(node.get("widgets_values", []))
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                if _is_socket(spec) or name in inputs or not values:
                    continue
                inputs[name] = values.pop(0)
                opts = spec[1] if len(spec) > 1 else {}
                if opts.get("control_after_generate") or opts.get("image_upload"):
                    values.pop(0)
        assert not values, f"{node['type']}: {len(values)} widget values left over"
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


@pytest.fixture(scope="module")
def workflow_models(comfy_server, tmp_path_factory):
    """The fixture teacher and a tiny T5 folder in the test server, under the names FIXTURE_FOR maps to."""
    base, _ = split_state_dict(load_file(FIXTURE_STUDENT))
    teacher = tmp_path_factory.mktemp("teacher") / FIXTURE_TEACHER
    save_file(base, teacher)
    comfy_server.add_model(teacher)
    install_t5(comfy_server, make_tiny_t5(tmp_path_factory.mktemp("t5") / FIXTURE_T5))


def check_graph(workflow: dict, info: dict, name: str) -> None:
    links = {link[0]: link for link in workflow["links"]}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            assert not node.get("inputs") and not node.get("outputs"), f"{name}: a note with sockets"
            continue
        assert node["type"] in info, f"{name}: unknown node {node['type']}"
        for out in node.get("outputs", []):
            for link_id in out.get("links") or []:
                assert links[link_id][5] == out["type"], f"{name}: link {link_id} type"


def test_layout_has_no_overlaps_and_a_note():
    for path in WORKFLOWS:
        nodes = json.loads(path.read_text())["nodes"]
        assert any(n["type"] in FRONTEND_ONLY for n in nodes), f"{path.name}: no note saying what it needs"
        boxes = [(n["id"], n["pos"][0], n["pos"][1] - 30, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
                 for n in nodes]  # 30: the title bar above pos
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert not (a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]), f"{path.name}: {a} {b}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_matches_nodes_and_runs(comfy_server, workflow_models, path):
    workflow = json.loads(path.read_text())
    info = comfy_server.object_info
    check_graph(workflow, info, path.name)
    prompt = to_api(workflow, info)
    for node in prompt.values():
        for key, value in node["inputs"].items():
            if isinstance(value, str) and value in FIXTURE_FOR:
                node["inputs"][key] = FIXTURE_FOR[value]
        if node["class_type"] == "LoadImage":
            name = node["inputs"]["image"]
            comfy_server.add_input(SHARED / "images" / "real_lq" / name)
        if node["class_type"] in RESTORE_NODES:
            node["inputs"]["scale"] = 1.0  # keep the CPU run short; the widgets are checked above
            node["inputs"].update(SHRINK.get(path.name, {}))
            if path.name in SHRINK:  # the 200x200 dog at scale 1
                assert count_tiles(200, 200, node["inputs"]["tile_size"], node["inputs"]["tile_overlap"]) > 1
        if node["class_type"] == "VARTextToImage":
            node["inputs"]["pixel_budget"] = "0.06M"
    entry = comfy_server.run(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    shown = {key: node["class_type"] for key, node in prompt.items()
             if node["class_type"] in ("SaveImage", "PreviewImage")}
    assert "SaveImage" in shown.values(), f"{path.name} saves nothing"
    for key, kind in shown.items():
        images = entry["outputs"][key]["images"]
        assert len(images) == 1, f"{path.name}: node {key} showed {len(images)} images"
        with Image.open(io.BytesIO(comfy_server.output_image(images[0]))) as im:
            if kind == "SaveImage":
                assert im.size == SAVED_SIZE[path.name], f"{path.name}: node {key} saved {im.size}"
