"""Conformance runner: check ``var_core`` against fixture folders computed by the official code.

Usage::

    python -m var_core.conformance DIR [DIR ...]

Each ``DIR`` is a fixture folder holding a ``manifest.json`` or a folder of such folders. For
every case the runner loads the case's safetensors file, calls the adapter of the manifest's
``kind`` (``var_core/conformance_cases/<kind>.py``: ``run_case(case, tensors, weights, folder)``,
which loads the weights through ``var_core.load`` as a user's file would be) and compares every
``expected`` tensor within its tolerance: ``{"atol", "rtol"}``, ``{"exact": true}`` or
``{"max_mismatch": N}`` (at most N differing elements). It prints one line per tensor, then
``N passed, N failed, N skipped``, and exits 1 on any failure. Kinds without an adapter, and
cases an adapter cannot run yet, are reported as SKIP with the reason.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from .errors import UnsupportedFamilyError

log = logging.getLogger(__name__)


class CaseSkipped(Exception):
    """Raised by an adapter for a case (or parameter) it does not support yet."""


@dataclass
class Tally:
    counts: dict[str, int] = field(default_factory=lambda: {"PASS": 0, "FAIL": 0, "SKIP": 0})

    def add(self, status: str, label: str, detail: str, out) -> None:
        self.counts[status] += 1
        print(f"{status}  {label}  {detail}", file=out, flush=True)

    def summary(self) -> str:
        return f"{self.counts['PASS']} passed, {self.counts['FAIL']} failed, {self.counts['SKIP']} skipped"


def compare(got: torch.Tensor, want: torch.Tensor, tol: dict) -> tuple[bool, str]:
    """Compare one tensor with a manifest tolerance; returns ``(ok, detail)``."""
    if tuple(got.shape) != tuple(want.shape):
        return False, f"shape {tuple(got.shape)} != expected {tuple(want.shape)}"
    g, w = got.detach().cpu(), want.detach().cpu()
    if not g.is_floating_point() and not w.is_floating_point():
        g, w = g.long(), w.long()
    else:
        g, w = g.double(), w.double()
    diff = (g - w).abs()
    max_err = diff.max().item() if diff.numel() else 0.0
    if tol.get("exact"):
        n = int((diff != 0).sum())
        return n == 0, f"max_abs_err={max_err:.3g} mismatches={n} (exact)"
    if "max_mismatch" in tol:
        n = int((diff != 0).sum())
        return n <= tol["max_mismatch"], f"max_abs_err={max_err:.3g} mismatches={n} (allowed {tol['max_mismatch']})"
    atol, rtol = float(tol.get("atol", 0.0)), float(tol.get("rtol", 0.0))
    bad = diff > atol + rtol * w.abs()
    ok = not bool(bad.any()) and bool(torch.isfinite(g).all() or not torch.isfinite(w).all())
    return ok, f"max_abs_err={max_err:.3g} (atol {atol:g}, rtol {rtol:g})"


def _adapter(kind: str):
    name = f"{__package__}.conformance_cases.{kind}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            return None
        raise


def run_folder(folder: Path, tally: Tally, out=None) -> None:
    out = out or sys.stdout
    manifest = json.loads((folder / "manifest.json").read_text())
    kind = manifest["kind"]
    weights = {role: str((folder / rel).resolve()) for role, rel in manifest.get("weights", {}).items()}
    adapter = _adapter(kind)
    for case in manifest["cases"]:
        label = f"{folder.name}/{case['name']}"
        if adapter is None:
            tally.add("SKIP", label, f"kind {kind!r} is not implemented yet ({len(case['expected'])} tensors)", out)
            continue
        tensors = load_file(str(folder / case["tensors"]))
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                got = adapter.run_case(case, tensors, weights, folder)
        except (CaseSkipped, UnsupportedFamilyError, NotImplementedError) as e:
            tally.add("SKIP", label, f"{e}", out)
            continue
        except Exception as e:  # noqa: BLE001 - a crashing adapter is a failure of every tensor of the case
            log.debug("case %s crashed", label, exc_info=True)
            for name in case["expected"]:
                tally.add("FAIL", f"{label} {name}", f"error: {type(e).__name__}: {e}", out)
            continue
        dt = time.perf_counter() - t0
        for name, tol in case["expected"].items():
            if name not in got:
                tally.add("FAIL", f"{label} {name}", "not computed by the adapter", out)
                continue
            if name not in tensors:
                tally.add("FAIL", f"{label} {name}", "expected tensor missing from the fixture file", out)
                continue
            ok, detail = compare(got[name], tensors[name], tol)
            tally.add("PASS" if ok else "FAIL", f"{label} {name}", detail, out)
        log.info("%s took %.2f s", label, dt)


def fixture_folders(paths: list[Path]) -> list[Path]:
    folders = []
    for p in paths:
        if (p / "manifest.json").is_file():
            folders.append(p)
        elif p.is_dir():
            folders.extend(sorted(d for d in p.iterdir() if (d / "manifest.json").is_file()))
    return folders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m var_core.conformance", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="fixture folder(s) with manifest.json, or their parent")
    parser.add_argument("-v", "--verbose", action="store_true", help="log case timings and adapter tracebacks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    folders = fixture_folders(args.dirs)
    if not folders:
        print(f"no manifest.json found under {', '.join(map(str, args.dirs))}", file=sys.stderr)
        return 2
    tally = Tally()
    for folder in folders:
        run_folder(folder, tally)
    print(tally.summary())
    return 1 if tally.counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
