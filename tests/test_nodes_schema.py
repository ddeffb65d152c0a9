"""The pack's node schemas as the real ComfyUI serves them (``/object_info``), and its model folders.

Every node of the pack: a ``VAR`` id, a category under ``image/restoration/VAR``, a description,
a tooltip on every input and output, and the words users type in the node search box. SwinIR is
found in ComfyUI's ``upscale_models`` as well as ``models/var``; ``extra_model_paths.yaml`` folders
are listed and loaded; a missing file names the official file, where to get it and its folder.
"""

from __future__ import annotations

import json
import shutil

import pytest
from comfy_harness import PACK_NAME, PACK_NODES, ComfyServer, execution_error
from conftest import DEMO_FILES, FIXTURE_STUDENT, FIXTURE_SWINIR, FIXTURE_VAE, FIXTURES

pytestmark = pytest.mark.comfyui

SQ64 = FIXTURES / "A_bsq_vae" / "sq64_input.png"
RESTORE_NODES = ("VAROneStepRestore", "VARRestore", "VARIterativeRestore")


def pack_nodes(info: dict) -> dict:
    return {k: v for k, v in info.items() if v.get("python_module", "").endswith(PACK_NAME)}


def test_every_pack_node_is_listed_categorised_and_documented(comfy_server):
    nodes = pack_nodes(comfy_server.object_info)
    assert sorted(nodes) == sorted(PACK_NODES)
    for node_id, node in nodes.items():
        assert node_id.startswith("VAR"), node_id
        assert node["category"].startswith("image/restoration/VAR/"), (node_id, node["category"])
        assert node["description"].strip(), node_id
        assert node["display_name"].strip() and node["display_name"] != node_id, node_id
        inputs = {**node["input"].get("required", {}), **node["input"].get("optional", {})}
        assert inputs, node_id
        for name, spec in inputs.items():
            assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert len(node["output_tooltips"]) == len(node["output"]), node_id
        assert all(node["output_tooltips"]), f"{node_id} has an output without a tooltip"
    for node_id in RESTORE_NODES:  # what users type in the search box
        text = (nodes[node_id]["display_name"] + " " + nodes[node_id]["description"]).lower()
        for word in ("restor", "upscale", "super-resolution"):
            assert word in text, (node_id, word)
    preview = nodes["VARPreviewPyramid"]
    assert preview["output"] == ["IMAGE", "IMAGE"] and preview["output_name"] == ["frames", "grid"]
    assert list(preview["input"]["required"]) == ["vae", "pyramid", "columns"]
    assert nodes["VAROneStepRestore"]["output"] == ["IMAGE", "VAR_PYRAMID"]


def restore_graph(image_name: str, *, swinir: str | None = None, vae: str = FIXTURE_VAE.name,
                  t5: str | None = None) -> dict:
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "2": {"class_type": "VARLoadVAE", "inputs": {"vae_name": vae, "weight_dtype": "auto"}},
        "3": {"class_type": "VARLoadStudent",
              "inputs": {"model_name": FIXTURE_STUDENT.name, "merge_lora": True, "weight_dtype": "auto"}},
        "4": {"class_type": "VAROneStepRestore",
              "inputs": {"model": ["3", 0], "vae": ["2", 0], "image": ["1", 0], "seed": 0, "sampling": "argmax",
                         "scale": 1.0, "tile_size": 512, "tile_overlap": 64, "color_fix": "none"}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }
    if swinir is not None:
        graph["6"] = {"class_type": "VARLoadSwinIR", "inputs": {"swinir_name": swinir, "weight_dtype": "auto"}}
        graph["4"]["inputs"]["swinir"] = ["6", 0]
    if t5 is not None:
        graph["7"] = {"class_type": "VARLoadT5", "inputs": {"t5_name": t5, "weight_dtype": "auto"}}
        graph["8"] = {"class_type": "VARTextEncode", "inputs": {"t5": ["7", 0], "prompt": "a photo"}}
        graph["4"]["inputs"]["text"] = ["8", 0]
    return graph


def vae_graph(image_name: str, vae: str) -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "2": {"class_type": "VARLoadVAE", "inputs": {"vae_name": vae, "weight_dtype": "auto"}},
        "3": {"class_type": "VAREncodePyramid", "inputs": {"vae": ["2", 0], "image": ["1", 0]}},
        "4": {"class_type": "VARDecodePyramid", "inputs": {"vae": ["2", 0], "pyramid": ["3", 0]}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }


def swinir_options(server) -> list[str]:
    info = server.get_json("/object_info/VARLoadSwinIR")["VARLoadSwinIR"]
    return info["input"]["required"]["swinir_name"][1]["options"]


def test_swinir_is_found_in_upscale_models(comfy_server):
    name = comfy_server.add_model(FIXTURE_SWINIR, folder="upscale_models", name="upscale_swinir_tiny.safetensors")
    options = swinir_options(comfy_server)
    assert name in options and FIXTURE_SWINIR.name in options  # upscale_models and models/var, merged
    assert options == sorted(set(options))
    entry = comfy_server.run(restore_graph(comfy_server.add_input(SQ64), swinir=name))
    assert entry["status"]["status_str"] == "success", json.dumps(execution_error(entry), indent=1)[:4000]
    assert f"VAR SwinIR {name}" in comfy_server.log_text()


@pytest.mark.parametrize("case", [
    ("swinir", "VARLoadSwinIR", "general_swinir_v1.ckpt", ["models/var/ or models/upscale_models/",
                                                            "ComfyUI/models/upscale_models/",
                                                            "huggingface.co/lxq007/DiffBIR"]),
    ("vae", "VARLoadVAE", "infinity_vae_d32reg.pth", ["models/var/", "FoundationVision/Infinity"]),
    ("t5", "VARLoadT5", "flan-t5-xl", ["models/text_encoders/", "huggingface.co/google/flan-t5-xl"]),
], ids=lambda c: c[0])
def test_missing_official_file_says_where_to_get_it(comfy_server, case):
    kind, node_type, official, words = case
    graph = restore_graph(comfy_server.add_input(SQ64), **{"swinir": official} if kind == "swinir" else
                          {"vae": official} if kind == "vae" else {"t5": official})
    entry = comfy_server.run(graph)
    err = execution_error(entry)
    assert err is not None and err["node_type"] == node_type, entry["status"]
    message = err["exception_message"]
    assert err["exception_type"].endswith("CheckpointError") and "Traceback" not in message
    assert repr(official) in message and f"The official {'one' if kind == 't5' else 'file'} is {official}" in message
    for word in words:
        assert word in message, (word, message)


def test_missing_unofficial_name_names_the_loaders_official_file(comfy_server):
    entry = comfy_server.run(restore_graph(comfy_server.add_input(SQ64), swinir="my_swinir.pth"))
    message = execution_error(entry)["exception_message"]
    assert message.startswith("model file 'my_swinir.pth' not found in models/var/ or models/upscale_models/")
    assert "The official file is general_swinir_v1.ckpt" in message


def test_extra_model_paths_yaml_folders_are_listed_and_loaded(tmp_path):
    """A second ComfyUI whose only model files are in folders of an ``extra_model_paths.yaml``."""
    shared = tmp_path / "elsewhere"
    for folder, src in (("var_files", FIXTURE_VAE), ("upscalers", FIXTURE_SWINIR)):
        (shared / folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, shared / folder / src.name)
    yaml = tmp_path / "extra_model_paths.yaml"
    yaml.write_text(f"mine:\n  base_path: {shared}\n  var: var_files\n  upscale_models: upscalers\n")
    with ComfyServer(tmp_path / "comfy", extra_args=["--extra-model-paths-config", str(yaml)]) as server:
        info = server.object_info
        assert info["VARLoadVAE"]["input"]["required"]["vae_name"][1]["options"] == sorted([FIXTURE_VAE.name,
                                                                                            *DEMO_FILES])
        # upscale_models + var (with the demo folder)
        assert swinir_options(server) == sorted([FIXTURE_SWINIR.name, FIXTURE_VAE.name, *DEMO_FILES])
        entry = server.run(vae_graph(server.add_input(SQ64), FIXTURE_VAE.name))
        assert entry["status"]["status_str"] == "success", json.dumps(execution_error(entry), indent=1)[:4000]
        message = execution_error(server.run(vae_graph(server.add_input(SQ64), "gone.pth")))["exception_message"]
        assert str(shared / "var_files") in message  # the yaml folder is among those searched
