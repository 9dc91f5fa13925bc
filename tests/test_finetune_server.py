"""The learning loop on the real server (issue 18): corrected labels in, a validated fine-tune in the
background, the guard, the live switch and rollback, and "Next sample".

One ``xai serve`` process for the module, on a tiny network trained here on plain synthetic heads
(``tests/test_finetune.py``) and studies of the condition it is weak on (skull-on). Nothing depends
on the shipped weights.
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import requests

from xai_core.io import write_image
from xai_core.models import sha256


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(file))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


su = _load("xai_server_utils", "server_utils.py")
ft = _load("xai_test_finetune", "test_finetune.py")

pytestmark = pytest.mark.slow

TOKEN = "test-token-learning-0123"
LABELLED = [f"skull{s}" for s in range(8)]
UNLABELLED = ["skull_new0", "skull_new1", "plain_new0"]
# What the runs here train with: hold-out, head only, a few epochs (seconds on the tiny model).
QUICK = {"split": "holdout", "val_fraction": 0.3, "parts": "head", "lr": 0.003, "max_epochs": 12, "patience": 5}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    shipped, user, src = root / "shipped_weights", root / "user_weights", root / "studies"
    shipped.mkdir()
    card = ft.pretrained_card(tmp_path_factory)
    for f in (card, card.with_suffix(".pt")):
        shutil.copy(f, shipped / f.name)
    user.mkdir()
    src.mkdir()
    masks = {}
    for n, sid in enumerate(LABELLED):
        image, mask = ft.blob_study(100 + n, "skull", lesion=n % 5 != 4)
        write_image(image, src / f"{sid}.nii.gz")
        masks[sid] = mask
    for n, sid in enumerate(UNLABELLED):
        image, _ = ft.blob_study(500 + n, "plain" if sid.startswith("plain") else "skull")
        write_image(image, src / f"{sid}.nii.gz")
    seed_replay_cache(root / "datastore" / ".xai")
    env = {"XAI_DEVICE": "cpu", "XAI_WEIGHTS_DIR": str(shipped), "XAI_USER_WEIGHTS_DIR": str(user), "XAI_TOKEN": TOKEN}
    # A generous start-up limit: the server imports MONAI Label (seconds), slower on a shared machine.
    with su.running_server(src, root / "datastore", root / "server.log", env, token=TOKEN, timeout=900) as srv:
        srv.shipped, srv.user_weights, srv.masks, srv.tmp = shipped, user, masks, root
        yield srv


def seed_replay_cache(state_dir: Path) -> None:
    """The trainer's rehearsal cache (``<state dir>/replay/original-s<seed>``), filled with the tiny
    model's original condition (plain heads) as ``xai data make-brain`` would fill it with brains:
    plain heads of the default sizes (``replay_studies`` rehearsed, then ``replay_check_studies`` for
    the guard's check)."""
    from lib.trainers.finetune import FinetuneSettings
    from lib.trainers.seg_head import replay_folder

    folder = replay_folder(state_dir, FinetuneSettings())
    (folder / "labels").mkdir(parents=True)
    lines = ["study_id,image,mask"]
    cfg = FinetuneSettings()
    for seed in [*range(500, 500 + cfg.replay_studies), *range(600, 600 + cfg.replay_check_studies)]:
        image, mask = ft.blob_study(seed, "plain", lesion=seed % 5 != 0)
        write_image(image, folder / f"plain{seed}.nii.gz")
        write_image(mask, folder / "labels" / f"plain{seed}.nii.gz")
        lines.append(f"plain{seed},plain{seed}.nii.gz,labels/plain{seed}.nii.gz")
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")


def save_labels(server) -> None:
    for sid, mask in server.masks.items():
        buf = io.BytesIO(write_image(mask, server.tmp / f"{sid}_label.nii.gz").read_bytes())
        r = server.put("/datastore/label", params={"image": sid, "tag": "final"}, files={"label": ("l.nii.gz", buf)},
                       data={"params": json.dumps({"note": "ground truth as a corrected label"})})
        assert r.status_code == 200, r.text


def train(server, params: dict, timeout: float = 1800) -> dict:
    r = server.post("/train/seg_head_finetune", json=params)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + timeout
    seen_progress = []
    while True:
        state = server.get("/train/").json()
        seen_progress.append(state["progress"])
        if state["status"] not in ("SUBMITTED", "RUNNING") or time.monotonic() > deadline:
            break
        assert server.get("/info/", timeout=10).status_code == 200  # the server answers while training runs
        time.sleep(1)
    state["seen_progress"] = seen_progress
    return state


def segment_version(server, image: str) -> str:
    r = server.post("/infer/segment", params={"image": image, "output": "json"}, json={})
    assert r.status_code == 200, r.text
    return r.json()["model"]["version"]


def test_train_status_is_empty_before_any_run(server):
    r = server.get("/train/")
    assert r.status_code == 200, r.text
    state = r.json()
    assert state["status"] == "NONE" and state["curve"] == [] and state["outcome"] is None
    assert server.get("/train/", params={"all": "true"}).json() == []
    # MONAI Label's meaning of check_if_running (its Slicer plugin polls it) is kept: nothing runs.
    assert server.get("/train/", params={"check_if_running": "true"}).status_code == 404
    info = server.get("/info/").json()
    assert info["xai"]["model"]["active_version"] == "0.0.1" and info["xai"]["model"]["display_name"] == \
        "brain-lesion-3d@0.0.1"
    assert info["train_stats"]["seg_head_finetune"]["count"] == 0


def test_new_routes_need_the_token(server):
    for method, path in (("GET", "/train/"), ("GET", "/xai/models/brain-lesion-3d/versions"),
                         ("POST", "/xai/models/brain-lesion-3d/activate"),
                         ("POST", "/xai/models/brain-lesion-3d/rollback"), ("POST", "/activelearning/least_sure")):
        r = requests.request(method, server.url + path, timeout=30)
        assert r.status_code == 401, (method, path, r.status_code)


def test_next_sample_is_an_unlabelled_study_the_model_is_least_sure_of(server):
    info = server.get("/info/").json()
    assert list(info["strategies"])[0] == "least_sure" and "random" in info["strategies"]
    r = server.post("/activelearning/least_sure", json={})
    assert r.status_code == 200, r.text
    pick = r.json()
    assert pick["id"] in LABELLED + UNLABELLED  # no label saved yet: every study is a candidate
    assert 0 <= pick["score"] <= 1 and pick["score"] == max(pick["class_doubt"], pick["disagreement"])
    ranking = [x["score"] for x in pick["ranking"]]
    assert ranking == sorted(ranking, reverse=True) and pick["candidates"] == len(LABELLED + UNLABELLED)
    assert server.post("/activelearning/no_such", json={}).status_code == 404


def test_finetune_publishes_a_better_version_and_the_guard_refuses_a_worse_one(server):
    shipped = {p.name: sha256(p) for p in server.shipped.iterdir()}
    r = server.post("/train/seg_head_finetune", json={"tag": "final"})
    assert r.status_code == 422 and "no stored labels" in r.json()["detail"]
    save_labels(server)
    # The tiny model at this test's high lr loses about 0.03 on the original condition's check set, so
    # the bound is loosened here; the 0.02 default refusing a forgetting version is tested in
    # tests/test_finetune.py (test_guard_refuses_a_version_that_forgets_the_original_condition).
    state = train(server, {**QUICK, "max_original_drop": 0.1})
    assert state["status"] == "DONE" and state["outcome"] == "published", state
    v = state["validation"]
    assert v["after"] > v["before"] and v["scheme"] == "holdout" and v["n_validation"] == 3
    assert state["curve"][0]["epoch"] == 0 and len(state["curve"]) >= 2 and state["progress"] == 1.0
    assert state["version"] == "0.0.1+ft1"
    # The guard's second condition, in the status and the card: the original condition was kept.
    original = v["original_condition"]
    n_check = ft.FinetuneSettings().replay_check_studies
    assert original["n_studies"] == n_check and original["n_replay"] == ft.FinetuneSettings().replay_studies
    assert original["kept"] and original["drop"] <= 0.1 and original["max_drop"] == 0.1, original
    assert original["before"] > 0.5 and original["after"] > 0.5, original
    card = json.loads((server.user_weights / "versions" / "brain-lesion-3d" / "0.0.1+ft1.json").read_text())
    training = card["training"]
    assert card["metrics"]["original_condition"] == original and training["replay"]["n_check"] == n_check
    assert training["base"]["weights_sha256"] == json.loads((server.shipped / "brain-lesion-3d.json").read_text())[
        "weights_sha256"]
    assert sorted(x["image"] for x in training["labels"]) == sorted(LABELLED)
    assert all(x["label_version"] == 1 and len(x["sha256"]) == 64 for x in training["labels"])
    assert card["metrics"]["validation"]["before"] == v["before"] and training["settings"]["parts"] == "head"
    assert {p.name: sha256(p) for p in server.shipped.iterdir()} == shipped
    # Published is not active: the release still serves until someone switches.
    assert server.get("/info/").json()["xai"]["model"]["active_version"] == "0.0.1"

    # The guard: a learning rate that wrecks the network ends "not better", with both figures.
    worse = train(server, {**QUICK, "parts": "all", "lr": 1.0, "max_epochs": 2})
    assert worse["status"] == "DONE" and worse["outcome"] == "not_better", worse
    assert worse["validation"]["after"] < worse["validation"]["before"]
    assert "not better" in worse["message"] and worse["version"] is None
    versions = server.get("/xai/models/brain-lesion-3d/versions").json()
    assert [x["version"] for x in versions["versions"]] == ["0.0.1+ft1"]


def test_activate_and_rollback_switch_info_and_segment_without_a_restart(server):
    if not server.get("/xai/models/brain-lesion-3d/versions").json()["versions"]:
        pytest.skip("needs the version published by the previous test")
    pid = server.process.pid
    assert segment_version(server, "skull_new0") == "0.0.1"
    # A job that is already running when the switch happens finishes on the weights it started with.
    job = server.post("/xai/explain/relig", params={"image": "skull_new1"},
                      json={"method_params": {"n_samples": 8, "n_steps": 64}}).json()["job_id"]
    deadline = time.monotonic() + 120
    while server.get(f"/xai/jobs/{job}").json()["stage"] in ("queued", "starting", "load", "prepare"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = server.post("/xai/models/brain-lesion-3d/activate", json={"version": "0.0.1+ft1"})
    assert r.status_code == 200, r.text
    assert r.json()["active_version"] == "0.0.1+ft1" and r.json()["previous_version"] == "0.0.1"
    while (state := server.get(f"/xai/jobs/{job}").json())["status"] in ("queued", "running"):
        time.sleep(0.2)
    assert state["status"] == "done" and state["result"]["model"]["version"] == "0.0.1", state["status"]

    info = server.get("/info/").json()["xai"]["model"]
    assert info["active_version"] == "0.0.1+ft1" and info["version"] == "0.0.1+ft1"
    assert info["display_name"] == "brain-lesion-3d@0.0.1+ft1"
    assert [x["version"] for x in info["lineage"]] == ["0.0.1", "0.0.1+ft1"]
    assert segment_version(server, "skull_new0") == "0.0.1+ft1"
    assert server.get("/info/").json()["train_stats"]["seg_head_finetune"]["latest"] == "brain-lesion-3d@0.0.1+ft1"

    r = server.post("/xai/models/brain-lesion-3d/rollback")
    assert r.status_code == 200 and r.json()["active_version"] == "0.0.1", r.text
    assert server.get("/info/").json()["xai"]["model"]["version"] == "0.0.1"
    assert segment_version(server, "skull_new0") == "0.0.1"
    assert server.post("/xai/models/brain-lesion-3d/rollback").status_code == 409  # nothing earlier
    for bad in ({"version": "9.9.9+ft1"}, {"version": "../../x+ft1"}):
        r = server.post("/xai/models/brain-lesion-3d/activate", json=bad)
        assert r.status_code == 404 and "not a published version" in r.json()["detail"], r.text
    assert server.post("/xai/models/brain-lesion-3d/activate", json={}).status_code == 422
    assert server.post("/xai/models/nope/activate", json={"version": "0.0.1+ft1"}).status_code == 404
    assert server.process.pid == pid and server.process.poll() is None  # the same process throughout


def test_a_fine_tune_continues_the_lineage_of_the_active_version(server):
    if not server.get("/xai/models/brain-lesion-3d/versions").json()["versions"]:
        pytest.skip("needs the version published by an earlier test")
    assert server.post("/xai/models/brain-lesion-3d/activate", json={"version": "0.0.1+ft1"}).status_code == 200
    state = train(server, {**QUICK, "min_improvement": -1.0, "max_original_drop": 1.0, "max_epochs": 2,
                           "activate": True})
    assert state["outcome"] == "published" and state["version"] == "0.0.1+ft2", state
    info = server.get("/info/").json()["xai"]["model"]
    # Named by lineage (never ...-ft-...-ft-...), activated at once with activate: true.
    assert info["active_version"] == "0.0.1+ft2"
    assert [x["version"] for x in info["lineage"]] == ["0.0.1", "0.0.1+ft1", "0.0.1+ft2"]
    assert server.post("/xai/models/brain-lesion-3d/activate", json={"version": "base"}).json()[
        "active_version"] == "0.0.1"
