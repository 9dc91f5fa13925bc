"""Issue 17, uploads and parameters over HTTP: each reproduction against the real server is refused with
a clear 4xx naming the problem, the server answers afterwards, and nothing outside the datastore is
read or stored.

The real server (``xai serve``, MONAI Label with this app, a bearer token and a tiny random-weight
model) runs once for the module on a free loopback port, with one small study. The crafted files are
made here; ``tests/test_io_untrusted.py`` checks the same refusals in the reader without a server.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import struct
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
sys.modules[_spec.name] = su  # dataclasses resolve their module by name
_spec.loader.exec_module(su)

pytestmark = pytest.mark.slow

TOKEN = "security-token-0123456789"
UPLOAD_LIMIT_MB = 8  # room for the 2.2 MB gzip bomb; the 512 MiB default is not what is tested here
SECRET = b"server-secret-" + os.urandom(8).hex().encode() + b"\n"
SHAPE = (20, 24, 22)  # k, j, i of the one study


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, Image]:
    src = tmp_path_factory.mktemp("src")
    image, _ = su.synthetic_study(SHAPE, (2.0, 2.0, 2.5), (-20.0, -24.0, -25.0), seed=3)
    write_image(image, src / "axial.nii.gz")
    return src, image


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory) -> Path:
    """A file of the server's machine outside the datastore (stands in for /etc/passwd)."""
    path = tmp_path_factory.mktemp("server_files") / "secret.txt"
    path.write_bytes((SECRET * 32)[:512])
    return path


@pytest.fixture(scope="module")
def server(study, tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    shipped, user = root / "shipped_weights", root / "user_weights"
    su.make_tiny_model(shipped)
    user.mkdir()
    env = {"XAI_DEVICE": "cpu", "XAI_WEIGHTS_DIR": str(shipped), "XAI_USER_WEIGHTS_DIR": str(user),
           "XAI_TOKEN": TOKEN}
    with su.running_server(study[0], root / "datastore", root / "server.log", env, token=TOKEN,
                           conf={"max_upload_mb": str(UPLOAD_LIMIT_MB)}) as srv:
        yield srv


# ---------------------------------------------------------------------------------------------- helpers

def datastore_files(server) -> dict[str, bytes]:
    """Every stored file (outside the app's private state folder) -> its content, gzip inflated."""
    out = {}
    for p in sorted(server.datastore.rglob("*")):
        rel = p.relative_to(server.datastore)
        if p.is_file() and rel.parts[0] != ".xai":
            data = p.read_bytes()
            out[str(rel)] = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    return out


def uploads_left(server) -> list[str]:
    folder = server.datastore / ".xai" / "uploads"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def assert_refused(server, r: requests.Response, status: int, *words: str) -> str:
    """The reply is ``status`` with a detail holding ``words``, logged under its error id, leaking no
    server file, and the server still answers."""
    assert r.status_code == status, r.text[:500]
    body = r.json()
    for w in words:
        assert w in body["detail"], body
    assert "\n" not in body["detail"]
    assert SECRET not in r.content and b"root:x:0:0" not in r.content
    assert f"error_id={body['error_id']}" in server.log_text()
    assert server.get("/info/", timeout=10).status_code == 200
    return body["detail"]


def upload(server, route: str, name: str, data: bytes, image_id: str) -> requests.Response:
    """Send ``data`` as an uploaded file to one of the three upload routes."""
    if route == "image":
        return server.put("/datastore/image", params={"image": image_id}, files={"file": (name, data)})
    if route == "label":
        return server.put("/datastore/label", params={"image": "axial", "tag": image_id},
                          files={"label": (name, data)})
    return server.post("/infer/classify", params={"output": "json"}, files={"file": (name, data)})


def assert_nothing_stored(server, before: dict[str, bytes]) -> None:
    after = datastore_files(server)
    assert after == before
    assert not any(SECRET in content for content in after.values())
    assert uploads_left(server) == []


def meta_header(data_file: str, dims=(256, 1, 2)) -> bytes:
    return (f"ObjectType = Image\nNDims = 3\nDimSize = {' '.join(map(str, dims))}\nElementType = MET_UCHAR\n"
            f"ElementDataFile = {data_file}\n").encode()


def nrrd_header(field: str) -> bytes:
    return f"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 256 1 2\nencoding: raw\n{field}\n\n".encode()


def nifti_bytes(image: Image, tmp: Path, **patch: float) -> bytes:
    """Uncompressed NIfTI-1 bytes of ``image`` with header fields overwritten (``pixdim1``, ``dim3``)."""
    data = bytearray(write_image(image, tmp / "x.nii", compress=False).read_bytes())
    for key, value in patch.items():
        if key == "dim3":
            struct.pack_into("<h", data, 46, int(value))
        else:
            struct.pack_into("<f", data, {"pixdim1": 80}[key], value)
    return bytes(data)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, all threads


# ---------------------------------------------------------------------------------------- 1. server files

@pytest.mark.parametrize("route", ["image", "label", "infer"])
@pytest.mark.parametrize("kind", ["metaimage", "nrrd data file", "nrrd datafile"])
def test_header_naming_a_server_file_is_refused_and_the_file_is_never_read(server, secret_file, route, kind):
    before = datastore_files(server)
    for target in (str(secret_file), "/etc/passwd"):
        if kind == "metaimage":
            name, data = "l.mha", meta_header(target)
        else:
            name, data = "l.nrrd", nrrd_header(f"{kind.removeprefix('nrrd ')}: {target}")
        r = upload(server, route, name, data, "leak")
        assert_refused(server, r, 422, "uploaded file", "another file")
    assert server.get("/datastore/image", params={"image": "leak"}).status_code == 404
    assert_nothing_stored(server, before)


def test_refusal_does_not_reveal_whether_the_named_path_exists(server, secret_file):
    exists = upload(server, "image", "l.mha", meta_header(str(secret_file)), "probe").json()["detail"]
    missing = upload(server, "image", "l.mha", meta_header(str(secret_file) + ".nope"), "probe").json()["detail"]
    assert exists.replace(str(secret_file), "P") == missing.replace(str(secret_file) + ".nope", "P")


def test_the_issue_reproduction_etc_passwd_leak(server):
    """The issue's own commands: upload the header naming /etc/passwd, then try to download it."""
    before = datastore_files(server)
    r = server.put("/datastore/image", params={"image": "leak"},
                   files={"file": ("l.mha", meta_header("/etc/passwd"))})
    assert_refused(server, r, 422, "has a MetaImage header that takes its voxels from another file",
                   "ElementDataFile = '/etc/passwd'", "LOCAL")
    download = server.get("/datastore/image", params={"image": "leak"})
    assert download.status_code == 404 and b"root:" not in download.content
    assert_nothing_stored(server, before)


def test_analyze_pair_header_is_refused(server, study, tmp_path):
    write_image(study[1], tmp_path / "pair.hdr")
    data = bytearray((tmp_path / "pair.hdr").read_bytes())
    data[344:348] = b"\0\0\0\0"  # Analyze 7.5
    r = upload(server, "image", "x.hdr", bytes(data), "analyze")
    assert_refused(server, r, 422, "Analyze", "separate .img file")


# ---------------------------------------------------------------------------------- 5. inputs not to accept

def test_dicom_segmentation_is_not_stored_as_a_study(server):
    data_store = pytest.importorskip("data_store")
    seg = (Path(data_store.DataStore().data_path) / "liver.dcm").read_bytes()
    before = datastore_files(server)
    for route in ("image", "infer"):
        r = upload(server, route, "liver.dcm", seg, "seg")
        assert_refused(server, r, 422, "DICOM Segmentation Storage object", "not an image")
    assert_nothing_stored(server, before)


@pytest.mark.parametrize("value", [float("nan"), 0.0, -1.5])
def test_bad_spacing_is_refused_not_set_to_1_mm(server, study, tmp_path, value):
    r = upload(server, "image", "s.nii", nifti_bytes(study[1], tmp_path, pixdim1=value), "spacing")
    assert_refused(server, r, 422, "spacing", "finite and positive")
    assert uploads_left(server) == []


def test_tiny_volume_is_refused(server, study, tmp_path):
    tiny = Image(np.random.default_rng(0).random((4, 30, 30)).astype(np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0),
                 (1, 0, 0, 0, 1, 0, 0, 0, 1))
    r = upload(server, "infer", "tiny.nii.gz", write_image(tiny, tmp_path / "tiny.nii.gz").read_bytes(), "tiny")
    assert_refused(server, r, 422, "at least 8 voxels")


def test_gzip_with_gigabytes_of_trailing_data_costs_the_server_no_cpu(server, tmp_path):
    """The issue's 64^3 NIfTI with 2.2 GB of gzip trailing data (2.2 MB sent): refused from a capped
    inflation, so the server spends well under a second on it (5 s of CPU per read before)."""
    nii = write_image(Image(np.random.default_rng(1).random((64, 64, 64)).astype(np.float32), (3.0, 3.0, 3.0),
                            (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)), tmp_path / "x.nii", compress=False)
    zeros = gzip.compress(bytes(64 << 20), 6)  # one gzip member inflating to 64 MiB
    bomb = gzip.compress(nii.read_bytes(), 6) + zeros * 34
    assert len(bomb) < 4 * 2**20  # 1 MiB of random voxels barely compresses; the trailing 2.2 GB is 2.2 MB
    before = datastore_files(server)
    for route in ("image", "infer"):
        cpu = cpu_s(server.process.pid)
        r = upload(server, route, "bomb.nii.gz", bomb, "bomb")
        assert_refused(server, r, 413, "inflates to more than", "trailing data")
        assert cpu_s(server.process.pid) - cpu < 1.0
    assert_nothing_stored(server, before)


def test_concurrent_uploads_declaring_huge_volumes_do_not_raise_memory(server, tmp_path):
    """Four 0.5 MiB uploads declaring 512^3 float32 (4.5 GiB of server memory before): each is refused
    from its header before any voxel is decoded."""
    raw = bytearray(write_image(Image(np.zeros((8, 8, 8), np.float32) + np.arange(8), (1.0,) * 3, (0.0,) * 3,
                                      (1, 0, 0, 0, 1, 0, 0, 0, 1)), tmp_path / "h.nii", compress=False)
                    .read_bytes()[:352])
    struct.pack_into("<4h", raw, 40, 3, 512, 512, 512)
    bomb = gzip.compress(bytes(raw)) + gzip.compress(bytes(64 << 20), 6) * 8  # 512 MiB of float32 zeros
    assert len(bomb) < 2**20
    pid = server.process.pid
    baseline, peak, done = rss_kib(pid), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_kib(pid))
            time.sleep(0.005)

    replies: list[requests.Response] = []
    sampler = threading.Thread(target=sample)
    sampler.start()
    clients = [threading.Thread(target=lambda i=i: replies.append(upload(server, "image", "big.nii.gz", bomb,
                                                                         f"big{i}"))) for i in range(4)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(60)
    done.set()
    sampler.join()
    assert len(replies) == 4
    for r in replies:
        assert_refused(server, r, 413, "512, 512, 512", "per-upload limit")
    assert (peak[0] - baseline) / 1024 < 300, f"server memory rose by {(peak[0] - baseline) / 1024:.0f} MiB"


# ------------------------------------------------------------------------------ 6. client errors, not 500s

def test_deeply_nested_params_are_a_422(server):
    nested = "[" * 100_000
    r = server.post("/infer/classify", params={"image": "axial", "output": "json"}, data=nested,
                    headers={"Content-Type": "application/json"})
    assert_refused(server, r, 422, "nest")
    r = server.post("/infer/classify", params={"image": "axial", "output": "json"}, data={"params": nested})
    assert_refused(server, r, 422, "nest")
    deep: object = 1
    for _ in range(40):
        deep = [deep]
    r = server.post("/xai/explain/gradcam", params={"image": "axial"}, json={"target": 0, "extra": deep})
    assert_refused(server, r, 422, "41 levels deep")


def test_label_whose_header_has_a_zero_dimension_is_a_4xx(server, study, tmp_path):
    label = study[1].with_array((study[1].array > 150).astype(np.uint8))
    r = upload(server, "label", "zero.nii", nifti_bytes(label, tmp_path, dim3=0), "zero")
    assert_refused(server, r, 422, "no voxels")
    assert uploads_left(server) == []


# ---------------------------------------------------------------------------------------- 7. smaller faults

def test_json_params_are_not_buffered_beyond_their_limit(server):
    big = json.dumps({"target": 0, "pad": "x" * (2 << 20)})
    r = server.post("/infer/classify", params={"image": "axial", "output": "json"}, data=big,
                    headers={"Content-Type": "application/json"})
    assert_refused(server, r, 413, "1024 KiB limit")

    def chunks():  # no Content-Length: the limit holds while streaming
        for _ in range(3):
            yield b" " * (1 << 20)

    r = server.post("/infer/classify", params={"image": "axial", "output": "json"}, data=chunks(),
                    headers={"Content-Type": "application/json"})
    assert_refused(server, r, 413, "1024 KiB limit")
    r = server.post("/infer/classify", params={"image": "axial", "output": "json"}, data={"params": big})
    assert_refused(server, r, 413, "1024 KiB limit")


def test_failed_uploads_are_deleted_from_the_uploads_folder(server, study, tmp_path):
    flat = write_image(Image(np.random.default_rng(0).random((32, 32)).astype(np.float32), (1.0, 1.0), (0.0, 0.0),
                             (1.0, 0.0, 0.0, 1.0)), tmp_path / "flat.nii.gz").read_bytes()
    wrong_grid = write_image(Image(np.zeros((10, 10, 10), np.uint8), (1.0,) * 3, (0.0,) * 3,
                                   (1, 0, 0, 0, 1, 0, 0, 0, 1)), tmp_path / "wrong.nii.gz").read_bytes()
    for route, data, status in (("infer", flat, 422), ("infer", b"garbage" * 100, 422), ("image", flat, 422),
                                ("label", wrong_grid, 422), ("label", meta_header("/etc/passwd"), 422)):
        r = upload(server, route, "x.nii.gz", data, "gone")
        assert r.status_code == status, r.text
        assert uploads_left(server) == [], f"{route}: a refused upload was left behind"


def test_good_uploads_still_work(server, study, tmp_path):
    """The checks refuse crafted files only: a normal image, label and /infer upload go through."""
    data = write_image(study[1], tmp_path / "ok.nii.gz").read_bytes()
    r = upload(server, "image", "ok.nii.gz", data, "ok_upload")
    assert r.status_code == 200, r.text
    label = write_image(study[1].with_array((study[1].array > 150).astype(np.uint8)), tmp_path / "l.nii.gz")
    r = upload(server, "label", "l.nii.gz", label.read_bytes(), "ok_tag")
    assert r.status_code == 200, r.text
    empty = write_image(study[1].with_array(np.zeros(SHAPE, np.uint8)), tmp_path / "e.nii.gz")
    assert upload(server, "label", "e.nii.gz", empty.read_bytes(), "empty_tag").status_code == 200
    mha = write_image(study[1], tmp_path / "ok.mha").read_bytes()
    r = upload(server, "infer", "ok.mha", mha, "")
    assert r.status_code == 200, r.text
    assert set(r.json()["prediction"]["probabilities"]) == {"none", "glioma", "meningioma", "metastasis"}
