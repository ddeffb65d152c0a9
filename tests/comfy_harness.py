"""A real ComfyUI server with this pack installed, for end-to-end tests.

ComfyUI 0.3.75 is installed under ``<repo>/.comfyui/ComfyUI`` by ``tests/install_comfyui.py``.
:class:`ComfyServer` runs its ``main.py`` as a subprocess on 127.0.0.1 (a free port, ``--cpu``)
with every writable directory in a temporary base directory:

    base/custom_nodes/comfyui-var-restore -> <repo>     (symlink: the pack as users install it)
    base/models/var/                                    (model files the tests copy in)
    base/input/, base/output/, base/temp/, base/user/

Readiness is checked over HTTP, and ``/object_info`` must list the pack's nodes: ComfyUI only
logs a warning when a custom node fails to import (``--quick-test-for-ci`` even exits 0), so a
start that lost the pack is reported as an error with the log's tail.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMFYUI_DIR = REPO / ".comfyui" / "ComfyUI"
PACK_NAME = "comfyui-var-restore"
PACK_NODES = ("VARLoadVAE", "VAREncodePyramid", "VARDecodePyramid", "VARLoadStudent", "VARLoadSwinIR",
              "VAROneStepRestore", "VARLoadT5", "VARTextEncode", "VARIterativeRestore", "VARTextToImage",
              "VARLoadVQVAE", "VARLoadModel", "VARRestore", "VARClassToImage", "VARPreviewPyramid")


class ComfyError(RuntimeError):
    """The server did not start, did not load the pack, or did not answer as expected."""


def comfyui_installed() -> bool:
    return (COMFYUI_DIR / "main.py").is_file() and (COMFYUI_DIR / ".install-complete").is_file()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """One ComfyUI subprocess. Use as a context manager or call :meth:`start` / :meth:`stop`."""

    def __init__(self, base_dir: Path, *, cpu: bool = True, expected_nodes=PACK_NODES,
                 startup_timeout: float = 240.0, extra_args: list[str] | None = None):
        self.base = Path(base_dir)
        self.cpu = cpu
        self.expected_nodes = tuple(expected_nodes)
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args or [])
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.models_dir = self.base / "models"
        self.input_dir = self.base / "input"
        self.output_dir = self.base / "output"
        self.log_path = self.base / "comfyui.log"
        self.proc: subprocess.Popen | None = None
        self._log = None
        self.object_info: dict = {}
        self.client_id = uuid.uuid4().hex

    # -- layout -----------------------------------------------------------------------------
    def prepare(self) -> None:
        for d in (self.models_dir / "var", self.input_dir, self.output_dir, self.base / "custom_nodes",
                  self.base / "temp", self.base / "user"):
            d.mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / PACK_NAME
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)

    def add_model(self, src: Path, folder: str = "var", name: str | None = None) -> str:
        dst = self.models_dir / folder / (name or Path(src).name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        return dst.name

    def add_input(self, src: Path, name: str | None = None) -> str:
        dst = self.input_dir / (name or Path(src).name)
        shutil.copyfile(src, dst)
        return dst.name

    # -- process ----------------------------------------------------------------------------
    def start(self) -> "ComfyServer":
        if not comfyui_installed():
            raise ComfyError(f"ComfyUI is not installed at {COMFYUI_DIR}; run tests/install_comfyui.py")
        self.prepare()
        cmd = [
            sys.executable, "main.py", *(["--cpu"] if self.cpu else []), "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(self.base), "--input-directory", str(self.input_dir),
            "--output-directory", str(self.output_dir), "--temp-directory", str(self.base / "temp"),
            "--user-directory", str(self.base / "user"), "--database-url", "sqlite:///:memory:",
            "--disable-auto-launch", "--disable-api-nodes", "--log-stdout", *self.extra_args,
        ]
        if importlib.util.find_spec("comfyui_frontend_package") is None and "--front-end-root" not in cmd:
            # The web frontend is only a static folder for browsers; without its package ComfyUI
            # refuses to start unless given one (e.g. on a machine with a partial install).
            front = self.base / "frontend"
            front.mkdir(exist_ok=True)
            (front / "index.html").write_text("<html><body>ComfyUI test harness</body></html>\n")
            cmd += ["--front-end-root", str(front)]
        env = dict(os.environ)
        env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1",
                    "PYTHONUNBUFFERED": "1"})
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=COMFYUI_DIR, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI exited with code {self.proc.returncode} while starting\n{self.log_tail()}")
            try:
                self.object_info = self.get_json("/object_info", timeout=30)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                if time.monotonic() > deadline:
                    raise ComfyError(f"ComfyUI did not answer within {self.startup_timeout:.0f}s\n{self.log_tail()}")
                time.sleep(0.5)
        missing = [n for n in self.expected_nodes if n not in self.object_info]
        if missing:
            raise ComfyError(f"ComfyUI started but the pack's nodes {missing} are not in /object_info "
                             f"(the pack failed to import?)\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 6000) -> str:
        return "--- ComfyUI log (tail) ---\n" + self.log_text()[-chars:]

    # -- HTTP ---------------------------------------------------------------------------------
    def _request(self, path: str, data: dict | None = None, timeout: float = 30):
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body,
                                     headers={"Content-Type": "application/json"} if body else {})
        return urllib.request.urlopen(req, timeout=timeout)

    def get_json(self, path: str, timeout: float = 30):
        with self._request(path, timeout=timeout) as r:
            return json.loads(r.read())

    def get_bytes(self, path: str, timeout: float = 30) -> bytes:
        with self._request(path, timeout=timeout) as r:
            return r.read()

    def post_json(self, path: str, data: dict, timeout: float = 30) -> bytes:
        with self._request(path, data, timeout=timeout) as r:
            return r.read()

    def queue(self, prompt: dict) -> str:
        """POST a prompt (API format); returns its id. A validation failure raises with the server's answer."""
        try:
            with self._request("/prompt", {"prompt": prompt, "client_id": self.client_id}) as r:
                answer = json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise ComfyError(f"/prompt refused the prompt ({e.code}): {e.read().decode(errors='replace')}") from None
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 120) -> dict:
        """Poll ``/history/{id}`` until the prompt finished (success or error); returns its entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI died while running {prompt_id}\n{self.log_tail()}")
            history = self.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            time.sleep(0.2)
        raise ComfyError(f"prompt {prompt_id} did not finish within {timeout:.0f}s\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 120) -> dict:
        return self.wait(self.queue(prompt), timeout=timeout)

    def output_image(self, image_ref: dict) -> bytes:
        """The bytes of an image listed in a history entry's ``outputs`` (fetched over ``/view``)."""
        query = urllib.parse.urlencode({k: image_ref[k] for k in ("filename", "subfolder", "type")})
        return self.get_bytes(f"/view?{query}")


def execution_error(entry: dict) -> dict | None:
    """The ``execution_error`` message of a history entry, if the prompt failed."""
    for event, data in entry.get("status", {}).get("messages", []):
        if event == "execution_error":
            return data
    return None


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory (``VmRSS``) of a process in bytes; ``"self"`` is this one."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class WebSocketEvents:
    """The server's websocket messages to the harness's client id, collected in a thread: JSON
    messages with their arrival times (``messages``) and binary frames such as previews (``binary``)."""

    def __init__(self, server: ComfyServer):
        self.url = f"ws://127.0.0.1:{server.port}/ws?clientId={server.client_id}"
        self.messages: list[tuple[float, dict]] = []
        self.binary: list[bytes] = []
        self.arrived = threading.Condition()
        self.ready, self.stop = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._listen()), daemon=True)

    async def _listen(self) -> None:
        import aiohttp  # ComfyUI's own dependency

        async with aiohttp.ClientSession() as session, session.ws_connect(self.url) as ws:
            self.ready.set()
            while not self.stop.is_set():
                try:
                    msg = await ws.receive(timeout=0.1)
                except asyncio.TimeoutError:
                    continue
                if msg.type == aiohttp.WSMsgType.TEXT:
                    with self.arrived:
                        self.messages.append((time.monotonic(), json.loads(msg.data)))
                        self.arrived.notify_all()
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    self.binary.append(msg.data)
                elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    break

    def wait_for(self, kind: str, prompt_id: str, timeout: float) -> float:
        """Arrival time of the first ``kind`` message of ``prompt_id``."""
        deadline = time.monotonic() + timeout
        with self.arrived:
            while True:
                for t, m in self.messages:
                    if m.get("type") == kind and m.get("data", {}).get("prompt_id") == prompt_id:
                        return t
                left = deadline - time.monotonic()
                assert left > 0, f"no {kind} message for {prompt_id}: {[m.get('type') for _, m in self.messages]}"
                self.arrived.wait(left)

    def progress(self, prompt_id: str) -> list[float]:
        """Arrival times of the ``progress`` messages of ``prompt_id``."""
        return [t for t, m in self.messages if m.get("type") == "progress" and m["data"].get("prompt_id") == prompt_id]

    def __enter__(self) -> "WebSocketEvents":
        self.thread.start()
        assert self.ready.wait(10), "no websocket connection"
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(10)
