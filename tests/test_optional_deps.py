"""The pack imports without its optional packages (peft, transformers); the node that needs one says so.

Each check runs in a fresh interpreter where ``sys.modules[name] = None`` makes ``import name``
fail as if the package were not installed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from comfy_harness import COMFYUI_DIR, PACK_NODES, REPO, comfyui_installed
from conftest import FIXTURE_STUDENT

BLOCK = 'import sys\nsys.modules["peft"] = None\nsys.modules["transformers"] = None\n'


def run_python(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_var_core_imports_without_peft_and_transformers():
    out = run_python("""
        import importlib, pkgutil
        import var_core
        for m in pkgutil.iter_modules(var_core.__path__):
            if not m.ispkg and m.name != "__main__":
                importlib.import_module("var_core." + m.name)
        import var_core.lora, var_core.text
        print("ok")
    """, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@pytest.mark.comfyui
def test_pack_imports_and_loaders_report_the_missing_package(tmp_path):
    if not comfyui_installed():
        pytest.skip(f"ComfyUI is not installed at {COMFYUI_DIR}")
    (tmp_path / "t5" / "fake-t5").mkdir(parents=True)
    (tmp_path / "t5" / "fake-t5" / "config.json").write_text("{}")
    out = run_python(f"""
        import asyncio, importlib.util
        sys.argv = ["main.py", "--cpu"]
        sys.path.insert(0, ".")
        import comfy.options
        comfy.options.enable_args_parsing()
        spec = importlib.util.spec_from_file_location("var_pack", {str(REPO / "__init__.py")!r},
                                                      submodule_search_locations=[{str(REPO)!r}])
        pack = importlib.util.module_from_spec(spec)
        sys.modules["var_pack"] = pack
        spec.loader.exec_module(pack)
        nodes = asyncio.run(asyncio.run(pack.comfy_entrypoint()).get_node_list())
        print("nodes", len(nodes))

        import folder_paths
        from var_pack import var_core
        from var_pack.nodes import student, text
        folder_paths.add_model_folder_path("var", {str(FIXTURE_STUDENT.parent)!r})
        folder_paths.add_model_folder_path("text_encoders", {str(tmp_path / "t5")!r})
        for load in (lambda: student.load_transformer({FIXTURE_STUDENT.name!r}, families=("infinity",)),
                     lambda: text.VARLoadT5.execute("fake-t5", "fp32")):
            try:
                load()
            except var_core.VARError as e:
                print("error", e)
    """, cwd=COMFYUI_DIR)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0] == f"nodes {len(PACK_NODES)}", out.stdout
    errors = [line for line in lines if line.startswith("error")]
    assert len(errors) == 2, out.stdout + out.stderr[-3000:]
    for error, package in zip(errors, ("peft", "transformers")):
        assert f"needs the Python package {package}" in error and "pip install -r requirements.txt" in error, error
