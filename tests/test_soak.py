"""Issue 17, soak: 8 concurrent clients x 50 mixed requests against the real server.

Each client explains (Grad-CAM on the tiny test model: cheap), saves labels under its own tag, reads
them back, sends bad uploads and lists versions. The run must end with 0 unexpected statuses, every
save reply naming the right version, and 0 lost or mismatched labels (current and archived versions
read back byte-identical, with their sha256). Failed uploads must not pile up in ``.xai/uploads``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from xai_core.io import Image, write_image

_spec = importlib.util.spec_from_file_location("xai_server_utils", Path(__file__).with_name("server_utils.py"))
su = importlib.util.module_from_spec(_spec)
sys.modules.setdefault(_spec.name, su)
_spec.loader.exec_module(su)

pytestmark = pytest.mark.filterwarnings("ignore:'cgi' is deprecated:DeprecationWarning")

CLIENTS, REQUESTS = 8, 50
TOKEN = "soak-token-0123456789"
SHAPE, SPACING, ORIGIN = (24, 28, 26), (2.0, 2.0, 2.5), (-24.0, -28.0, -32.0)


def label_bytes(rng: np.random.Generator, tmp: Path) -> bytes:
    arr = (rng.random(SHAPE) > 0.9).astype(np.uint8)
    return write_image(Image(arr, SPACING, ORIGIN, (1, 0, 0, 0, 1, 0, 0, 0, 1)), tmp / "l.nii.gz").read_bytes()


def test_concurrent_mixed_clients_make_no_errors_and_lose_no_labels(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for n, sid in enumerate(("s0", "s1")):
        image, _ = su.synthetic_study(SHAPE, SPACING, ORIGIN, seed=n)
        write_image(image, src / f"{sid}.nii.gz")
    env = {**su.tiny_server_env(tmp_path), "XAI_TOKEN": TOKEN}
    flat = write_image(Image(np.ones((16, 16), np.float32), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0)),
                       tmp_path / "flat.nii.gz").read_bytes()
    bad_uploads = [("corrupt.nii.gz", b"\x1f\x8b not really gzip" * 64), ("flat.nii.gz", flat),
                   ("cut.nii", b"\x5c\x01\x00\x00" + b"\0" * 400)]
    unexpected: list[str] = []
    saved: dict[int, list[bytes]] = {i: [] for i in range(CLIENTS)}
    counts = {"explain": 0, "save": 0, "read": 0, "bad": 0, "list": 0}
    lock = threading.Lock()

    with su.running_server(src, tmp_path / "datastore", tmp_path / "server.log", env, token=TOKEN,
                           conf={"max_upload_mb": "8"}) as server:

        def client(i: int) -> None:
            s = requests.Session()
            s.headers.update(server.headers)
            rng = np.random.default_rng(i)
            image_id, tag = f"s{i % 2}", f"soak{i}"
            folder = tmp_path / f"c{i}"
            folder.mkdir()
            for j in range(REQUESTS):
                kind = ("explain", "save", "read", "bad", "save", "list", "read", "bad")[(i + j) % 8]
                try:
                    if kind == "explain":
                        r = s.post(server.url + "/infer/gradcam", params={"image": image_id, "output": "json"},
                                   json={"target": "predicted"}, timeout=300)
                        ok = r.status_code == 200 and r.json()["image_id"] == image_id
                    elif kind == "save":
                        data = label_bytes(rng, folder)
                        r = s.put(server.url + "/datastore/label", params={"image": image_id, "tag": tag},
                                  files={"label": ("l.nii.gz", data)}, timeout=120)
                        ok = (r.status_code == 200 and r.json()["version"] == len(saved[i]) + 1
                              and r.json()["sha256"] == hashlib.sha256(data).hexdigest())
                        if r.status_code == 200:
                            saved[i].append(data)
                    elif kind == "read":
                        r = s.get(server.url + "/datastore/label", params={"label": image_id, "tag": tag}, timeout=60)
                        ok = (r.status_code == 200 and r.content == saved[i][-1]) if saved[i] else r.status_code == 404
                    elif kind == "bad":
                        name, data = bad_uploads[j % len(bad_uploads)]
                        if j % 2:  # an explanation of an uploaded volume
                            r = s.post(server.url + "/infer/gradcam", params={"output": "json"},
                                       files={"file": (name, data)}, timeout=60)
                        else:  # a new study
                            r = s.put(server.url + "/datastore/image", params={"image": f"bad{i}_{j}"},
                                      files={"file": (name, data)}, timeout=60)
                        ok = r.status_code == 422 and "error_id" in r.json()
                    else:
                        r = s.get(server.url + f"/xai/labels/{image_id}/{tag}/versions", timeout=60)
                        ok = (r.status_code == 200 and r.json()["current"]["version"] == len(saved[i])
                              if saved[i] else r.status_code == 404)
                except requests.RequestException as e:
                    r, ok = None, False
                    unexpected.append(f"client {i} request {j} ({kind}): {e}")
                    continue
                with lock:
                    counts[kind] += 1
                if not ok:
                    unexpected.append(f"client {i} request {j} ({kind}): {r.status_code} {r.text[:200]}")

        t0 = time.monotonic()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=900)
        elapsed = time.monotonic() - t0
        assert not any(t.is_alive() for t in threads)
        assert unexpected == [], unexpected[:10]
        assert sum(counts.values()) == CLIENTS * REQUESTS

        # 0 lost or mismatched labels: every version of every client, current and archived.
        lost = 0
        for i in range(CLIENTS):
            image_id, tag = f"s{i % 2}", f"soak{i}"
            listing = server.get(f"/xai/labels/{image_id}/{tag}/versions").json()
            assert listing["current"]["version"] == len(saved[i])
            current = server.get("/datastore/label", params={"label": image_id, "tag": tag}).content
            lost += current != saved[i][-1]
            by_version = {v["version"]: v for v in listing["versions"]}
            for version, data in enumerate(saved[i][:-1], start=1):
                v = by_version.get(version)
                lost += v is None or server.get(v["url"]).content != data
                lost += v is not None and v["info"]["sha256"] != hashlib.sha256(data).hexdigest()
        assert lost == 0
        uploads = server.datastore / ".xai" / "uploads"
        assert not (uploads.is_dir() and list(uploads.iterdir())), "failed uploads left behind"
        assert server.get("/info/").status_code == 200
    print(f"\n{CLIENTS} clients x {REQUESTS} requests in {elapsed:.1f} s: {counts}; "
          f"{sum(len(v) for v in saved.values())} labels saved, 0 lost")
