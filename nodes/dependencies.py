"""Optional Python packages of the pack: a node that needs one reports it when run.

The pack imports without ``peft`` (LoRA adapters of ``varestorer.pth``) and ``transformers``
(the T5 text encoder): ``var_core`` imports them inside the functions that use them. A loader that
reaches such an import turns the ``ModuleNotFoundError`` into a message saying what to install.
"""

from __future__ import annotations

import contextlib

from .. import var_core

OPTIONAL = {
    "peft": "the LoRA adapters of VARestorer checkpoints",
    "transformers": "the T5 text encoder",
}


@contextlib.contextmanager
def optional_dependencies(node: str):
    """Re-raise a missing optional package met inside the block as a ``VARError`` naming the fix."""
    try:
        yield
    except ModuleNotFoundError as e:
        package = (e.name or "").partition(".")[0]
        if package not in OPTIONAL:
            raise
        raise var_core.VARError(
            f"{node} needs the Python package {package} (for {OPTIONAL[package]}), which is not installed. "
            "Install peft/transformers: pip install -r requirements.txt (in the pack's folder, with ComfyUI's "
            "Python), then restart ComfyUI"
        ) from None
