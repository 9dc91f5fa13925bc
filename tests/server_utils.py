"""Helpers for tests/test_server.py: a tiny random-weight model, small synthetic studies, and the real
server as a subprocess.

Loaded by file path (``importlib``), not as ``tests.server_utils``: the monailabel wheel installs a
top-level ``tests`` package that could shadow ours.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
import torch

from xai_core.data.brain import CLASSES
from xai_core.io import Image
from xai_core.models import ModelCard, build_network, sha256
from xai_core.settings import REPO_ROOT

MODEL = "brain-lesion-3d"


def make_tiny_model(weights_dir: Path, seed: int = 0) -> Path:
    """A random-weight ``brain-lesion-3d`` (4-16 channels, 32^3 grid at 6 mm) and its card, in the
    format ``xai train`` writes; returns the card path. Fast on a CPU, independent of shipped weights."""
    weights_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    card = ModelCard(name=MODEL, version="0.0.1-test", classes=list(CLASSES), grid_size=32, grid_spacing_mm=6.0,
                     arch_kwargs=dict(spatial_dims=3, in_channels=1, num_classes=len(CLASSES), seg_channels=2,
                                      channels=[4, 8, 8, 16]),
                     cam_layer="encoder_out", temperature=1.3)
    net = build_network(card).eval()
    pt = weights_dir / f"{MODEL}.pt"
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, pt)
    card.weights_sha256 = sha256(pt)
    card_path = weights_dir / f"{MODEL}.json"
    card_path.write_text(card.model_dump_json(indent=2))
    return card_path


def rotation(axis: tuple[float, float, float], degrees: float) -> tuple[float, ...]:
    """Row-major 3 x 3 rotation (right-handed, so a DICOM series can hold it)."""
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.deg2rad(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    r = np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)
    return tuple(float(v) for v in r.ravel())


def synthetic_study(shape_kji: tuple[int, int, int], spacing: tuple[float, float, float],
                    origin: tuple[float, float, float], direction: tuple[float, ...] = (1, 0, 0, 0, 1, 0, 0, 0, 1),
                    seed: int = 0) -> tuple[Image, Image]:
    """A head-like ellipsoid with a bright blob: ``(image float32, lesion mask uint8)`` on one grid."""
    rng = np.random.default_rng(seed)
    k, j, i = np.ogrid[: shape_kji[0], : shape_kji[1], : shape_kji[2]]
    c = [(s - 1) / 2 for s in shape_kji]
    r = [0.42 * s for s in shape_kji]
    head = ((k - c[0]) / r[0]) ** 2 + ((j - c[1]) / r[1]) ** 2 + ((i - c[2]) / r[2]) ** 2 <= 1
    blob_c = [c[0] + 0.15 * shape_kji[0], c[1] - 0.12 * shape_kji[1], c[2] + 0.1 * shape_kji[2]]
    blob = ((k - blob_c[0]) ** 2 + (j - blob_c[1]) ** 2 + (i - blob_c[2]) ** 2) <= (0.12 * min(shape_kji)) ** 2
    arr = np.where(head, 100.0, 0.0) + np.where(blob & head, 80.0, 0.0) + rng.normal(0, 3, shape_kji)
    geometry = dict(spacing=tuple(spacing), origin=tuple(origin), direction=tuple(float(d) for d in direction))
    return (Image(array=arr.astype(np.float32), **geometry),
            Image(array=(blob & head).astype(np.uint8), **geometry))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running ``xai serve`` process (the real MONAI Label server with this app)."""

    url: str
    token: str
    process: subprocess.Popen
    log_path: Path
    datastore: Path
    env: dict[str, str] = field(repr=False)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, **kw) -> requests.Response:
        kw.setdefault("timeout", 120)
        return requests.get(self.url + path, headers={**self.headers, **kw.pop("headers", {})}, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        kw.setdefault("timeout", 300)
        return requests.post(self.url + path, headers={**self.headers, **kw.pop("headers", {})}, **kw)

    def put(self, path: str, **kw) -> requests.Response:
        kw.setdefault("timeout", 120)
        return requests.put(self.url + path, headers={**self.headers, **kw.pop("headers", {})}, **kw)

    def delete(self, path: str, **kw) -> requests.Response:
        kw.setdefault("timeout", 60)
        return requests.delete(self.url + path, headers={**self.headers, **kw.pop("headers", {})}, **kw)


def start_server(studies: Path, datastore: Path, log_path: Path, env: dict[str, str], token: str = "",
                 conf: dict[str, str] | None = None, timeout: float = 240.0) -> Server:
    """Start ``xai serve`` on a free loopback port and wait until ``/info/`` answers (stop it with
    :func:`stop_server`). The process is the server itself (``xai serve`` execs it), so a signal sent
    to ``server.process`` reaches the server. The log is appended to, so restarts keep one log."""
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("xai")), "serve", "--host", "127.0.0.1", "--port", str(port),
           "--studies", str(studies), "--datastore", str(datastore)]
    for k, v in (conf or {}).items():
        cmd += ["--conf", k, v]
    full_env = {**os.environ, **env}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=REPO_ROOT)
    server = Server(url=f"http://127.0.0.1:{port}", token=token, process=proc, log_path=log_path,
                    datastore=datastore, env=full_env)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_text()[-4000:]}")
            try:
                if server.get("/info/", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {timeout:.0f} s:\n{server.log_text()[-4000:]}")
            time.sleep(0.25)
    except BaseException:
        stop_server(server)
        raise
    return server


def stop_server(server: Server) -> None:
    """SIGTERM, then SIGKILL after 20 s; a server that already exited is left alone."""
    proc = server.process
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def running_server(studies: Path, datastore: Path, log_path: Path, env: dict[str, str], token: str = "",
                   conf: dict[str, str] | None = None, timeout: float = 240.0) -> Iterator[Server]:
    """Start ``xai serve`` on a free loopback port, wait until ``/info/`` answers, stop it afterwards."""
    server = start_server(studies, datastore, log_path, env, token=token, conf=conf, timeout=timeout)
    try:
        yield server
    finally:
        stop_server(server)


def tiny_server_env(root: Path) -> dict[str, str]:
    """Environment for a server on the tiny random-weight model (written under ``root``), on the CPU."""
    shipped, user = root / "shipped_weights", root / "user_weights"
    if not (shipped / f"{MODEL}.json").is_file():
        make_tiny_model(shipped)
    user.mkdir(parents=True, exist_ok=True)
    return {"XAI_DEVICE": "cpu", "XAI_WEIGHTS_DIR": str(shipped), "XAI_USER_WEIGHTS_DIR": str(user)}
