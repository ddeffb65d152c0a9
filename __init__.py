"""ComfyUI entry point of the VAR image-restoration pack (V3 node API, ComfyUI >= 0.3.48).

ComfyUI imports this folder as a package and calls :func:`comfy_entrypoint`. The pack does not
export ``NODE_CLASS_MAPPINGS``: ComfyUI's loader would then ignore ``comfy_entrypoint``.

Outside ComfyUI (``comfy_api`` not importable) this file defines nothing, so that tools which
import the folder as a package (pytest collects the repository root, which has this
``__init__.py``) and the standalone ``var_core`` keep working without ComfyUI.
"""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import VARExtension

    async def comfy_entrypoint() -> VARExtension:
        return VARExtension()
