"""ComfyUI glue of the VAR restoration pack: node definitions only, the maths lives in ``var_core``."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import folders

folders.register()

from . import families, sampler, student, text, vae  # noqa: E402  (the node modules read the registered folder)


class VARExtension(ComfyExtension):
    """The pack's node list, handed to ComfyUI by the top-level ``comfy_entrypoint``."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*vae.NODES, *student.NODES, *text.NODES, *sampler.NODES, *families.NODES]
