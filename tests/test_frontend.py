"""The shipped workflows open in the real ComfyUI frontend without missing nodes.

The session's real ComfyUI server (``comfy_server``) serves its own web frontend
(``comfyui-frontend-package``); Debian's Chromium, headless and driven by Playwright, opens it,
loads each file of ``workflows/`` the way a user's drag-and-drop does (``app.loadGraphData``),
and checks that every node type is registered (no red "missing node" boxes), that the graph
has all nodes and links of the file, and that every widget kept its saved value (values are
stored by position, so an input added anywhere but last would shift them). A screenshot of
each graph is saved; with ``VAR_UPDATE_SCREENSHOTS=1`` it replaces the workflow's same-name
preview picture in ``workflows/`` that the README shows.

Needs ``/usr/bin/chromium`` (Debian package ``chromium``) and the ``playwright`` Python package
(its driver only: no browser is ever downloaded).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
INPUTS = REPO.parent / "shared" / "images" / "real_lq"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Flags for a headless Chromium on a machine without network or GPU: no background
# connections, no first-run or sync, no sandbox (CI runs as root).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
VIEWPORT = {"width": 1600, "height": 900}
# Frontend state of a returning user: no template browser, no minimap, no Nodes 2.0 banner.
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}
BANNER_DISMISSED = "localStorage.setItem('vueNodesBannerDismissed', 'true')"

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def browser_page(comfy_server, tmp_path_factory):
    """A page of the real frontend, served by the session's ComfyUI, in headless Chromium."""
    if not Path(CHROMIUM).is_file():
        pytest.skip("Chromium is not installed: `apt-get install -y chromium` (Debian)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the driver; no browser)")
    comfy_server.post_json("/settings", SETTINGS)
    for path in WORKFLOWS:
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"] == "LoadImage" and (INPUTS / node["widgets_values"][0]).is_file():
                comfy_server.add_input(INPUTS / node["widgets_values"][0])
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, viewport=VIEWPORT)
        try:
            page = context.new_page()
            page.add_init_script(BANNER_DISMISSED)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(comfy_server.url)
            page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
            page.errors = errors
            yield page
        finally:
            context.close()


GRAPH_STATE = """() => {
    const graph = window.app.graph.serialize();
    return {
        nodes: graph.nodes.map(n => ({id: n.id, type: n.type, widgets_values: n.widgets_values ?? [],
                                      registered: !!window.LiteGraph.registered_node_types[n.type]})),
        links: graph.links.length,
    };
}"""


def _missing_node_dialog(page) -> bool:
    return page.get_by_text("missing", exact=False).filter(visible=True).count() > 0


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_loads_in_the_frontend(browser_page, path, tmp_path):
    page = browser_page
    workflow = json.loads(path.read_text())
    page.evaluate("([wf, name]) => window.app.loadGraphData(wf, true, true, name)", [workflow, path.stem])
    page.wait_for_timeout(500)
    state = page.evaluate(GRAPH_STATE)
    missing = [n["type"] for n in state["nodes"] if not n["registered"]]
    assert not missing, f"{path.name}: node types the frontend does not know: {missing}"
    assert not _missing_node_dialog(page), f"{path.name}: the frontend shows a missing-nodes message"
    assert len(state["nodes"]) == len(workflow["nodes"])
    assert state["links"] == len(workflow["links"])
    saved = {n["id"]: n.get("widgets_values", []) for n in workflow["nodes"]}
    for node in state["nodes"]:
        # Inputs added to a node after the file was saved come last, with their defaults.
        assert node["widgets_values"][: len(saved[node["id"]])] == saved[node["id"]], (
            f"{path.name}: {node['type']} (#{node['id']}) widgets changed on load: "
            f"{saved[node['id']]} -> {node['widgets_values']}")

    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    page.wait_for_timeout(800)
    shot = tmp_path / path.with_suffix(".png").name
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("VAR_UPDATE_SCREENSHOTS") == "1":
        shutil.copyfile(shot, path.with_suffix(".png"))
    assert not browser_page.errors, f"{path.name}: page errors {browser_page.errors}"


def test_every_workflow_has_its_preview_picture():
    missing = [p.with_suffix(".png").name for p in WORKFLOWS if not p.with_suffix(".png").is_file()]
    assert not missing, f"preview pictures missing (run the frontend test with VAR_UPDATE_SCREENSHOTS=1): {missing}"


def test_a_missing_node_type_is_detected(browser_page):
    """The checks above can fail: a node type nobody registers is reported by both of them."""
    page = browser_page
    workflow = json.loads(WORKFLOWS[0].read_text())
    workflow["nodes"][0]["type"] = "VARNodeThatDoesNotExist"
    page.evaluate("wf => window.app.loadGraphData(wf, true, true, 'missing')", workflow)
    page.wait_for_timeout(500)
    state = page.evaluate(GRAPH_STATE)
    assert [n["type"] for n in state["nodes"] if not n["registered"]] == ["VARNodeThatDoesNotExist"]
    assert _missing_node_dialog(page)
    page.keyboard.press("Escape")
