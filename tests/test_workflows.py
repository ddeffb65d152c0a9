"""The shipped workflows (UI format) are consistent with the nodes the real ComfyUI lists, and run.

Each workflow is converted to an API prompt the way the frontend does it (widget values by
position, a seed's "control after generate" value skipped), its official model names swapped
for the tiny fixture files, and queued on the real server.
"""

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
SHARED = REPO.parent / "shared"
# Official file name -> the tiny fixture the test server has in models/var/.
FIXTURE_FOR = {
    "infinity_vae_d32reg.pth": "vae_tiny.safetensors",
    "varestorer.pth": "varestorer_tiny_lora.safetensors",
    "general_swinir_v1.ckpt": "swinir_tiny.safetensors",
    "VARSR.pth": "varsr_tiny.safetensors",
    "VQVAE.pth": "varsr_vqvae_tiny.safetensors",
    "restorevar.pth": "restorevar_tiny.safetensors",
    "vae_restorevar.ckpt": "restorevar_vqvae_tiny.safetensors",
}

pytestmark = pytest.mark.comfyui


def _is_socket(spec) -> bool:
    return isinstance(spec[0], str) and spec[0] not in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def to_api(workflow: dict, object_info: dict) -> dict:
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
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


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_matches_nodes_and_runs(comfy_server, path):
    workflow = json.loads(path.read_text())
    info = comfy_server.object_info
    for node in workflow["nodes"]:
        assert node["type"] in info, f"{path.name}: unknown node {node['type']}"
        for out in node.get("outputs", []):
            for link_id in out.get("links") or []:
                link = next(link for link in workflow["links"] if link[0] == link_id)
                assert link[5] == out["type"]
    prompt = to_api(workflow, info)
    for node in prompt.values():
        for key, value in node["inputs"].items():
            if isinstance(value, str) and value in FIXTURE_FOR:
                node["inputs"][key] = FIXTURE_FOR[value]
        if node["class_type"] == "LoadImage":
            name = node["inputs"]["image"]
            comfy_server.add_input(SHARED / "images" / "real_lq" / name)
        if node["class_type"] in ("VAROneStepRestore", "VARRestore"):
            node["inputs"]["scale"] = 1.0  # keep the CPU run short; the widgets are checked above
    entry = comfy_server.run(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
