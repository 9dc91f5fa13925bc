"""Several models served at once (``--conf models a,b``): the default keeps the plain task names, the
other's tasks are prefixed with its name, each runs its own weights, and ``/info/`` lists only the
methods that fit each model's kind."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from xai_core.explain import available_methods

_spec = importlib.util.spec_from_file_location("xai_server_utils_models", Path(__file__).with_name("server_utils.py"))
su = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = su
_spec.loader.exec_module(su)

pytestmark = [pytest.mark.slow]

OTHER = "tiny-b"


def _copy_model(weights: Path, name: str, version: str) -> None:
    """A second model: the tiny model's weights re-initialised with another seed, under ``name``."""
    tmp = weights.parent / "tmp_b"
    su.make_tiny_model(tmp, seed=5)
    card = json.loads((tmp / f"{su.MODEL}.json").read_text())
    card.update(name=name, version=version)
    shutil.copy(tmp / f"{su.MODEL}.pt", weights / f"{name}.pt")
    (weights / f"{name}.json").write_text(json.dumps(card))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    env = su.tiny_server_env(root)
    _copy_model(Path(env["XAI_WEIGHTS_DIR"]), OTHER, "0.0.2-b")
    src = root / "src"
    src.mkdir()
    image, _ = su.synthetic_study((30, 36, 32), (2.5, 2.5, 3.0), (-37.0, -45.0, -48.0),
                                  su.rotation((1, 0, 1), 20), seed=3)
    from xai_core.io import write_image

    write_image(image, src / "case.nii.gz")
    with su.running_server(src, root / "datastore", root / "server.log", env,
                           conf={"models": f"{su.MODEL},{OTHER}"}) as srv:
        yield srv


def test_info_lists_tasks_per_model(server):
    info = server.get("/info/").json()
    fitting = {m.replace("+", "p") for m in available_methods("volume-classifier")}
    plain = {t for t in info["models"] if "." not in t}
    prefixed = {t.split(".", 1)[1] for t in info["models"] if t.startswith(f"{OTHER}.")}
    assert fitting <= plain and fitting <= prefixed
    assert {"classify", "segment", "saliency_mask"} <= plain & prefixed
    assert set(info["models"]) == plain | {f"{OTHER}.{t}" for t in prefixed}
    served = info["xai"]["models"]
    assert set(served) == {su.MODEL, OTHER}
    assert served[su.MODEL]["default"] is True and served[OTHER]["default"] is False
    assert served[OTHER]["kind"] == "volume-classifier" and served[OTHER]["version"] == "0.0.2-b"
    assert f"{OTHER}.gradcampp" in served[OTHER]["tasks"] and "gradcampp" in served[su.MODEL]["tasks"]
    assert info["xai"]["model"]["version"] == "0.0.1-test"  # the default model, as before


def test_each_model_runs_its_own_weights(server):
    a = server.post("/infer/classify", params={"image": "case", "output": "json"}, json={}).json()
    b = server.post(f"/infer/{OTHER}.classify", params={"image": "case", "output": "json"}, json={}).json()
    assert a["model"]["version"] == "0.0.1-test" and b["model"]["version"] == "0.0.2-b"
    assert a["prediction"]["logits"] != b["prediction"]["logits"]
    e = server.post(f"/infer/{OTHER}.gradcampp", params={"image": "case", "output": "json"},
                    json={"target": "glioma"})
    assert e.status_code == 200, e.text
    assert e.json()["model"]["name"] == OTHER and e.json()["targets"] == ["glioma"]
    bad = server.post(f"/infer/{OTHER}.gradcampp", params={"image": "case", "output": "json"},
                      json={"target": "²"})
    assert bad.status_code == 422 and "unknown target" in bad.json()["detail"]
    assert server.get("/info/").status_code == 200


def test_relig_job_reports_progress_and_cancels_mid_attribution(server):
    """A long RE-LIG (bounded method_params make it long on purpose) reports its progress inside the
    attribution stage, and a cancel stops it there, not at the end."""
    import time

    bad = server.post("/xai/explain/relig", params={"image": "case"}, json={"method_params": {"n_samples": 500}})
    assert bad.status_code == 422 and "n_samples must be a number in [1, 64]" in bad.json()["detail"]
    job = server.post("/xai/explain/relig", params={"image": "case"},
                      json={"method_params": {"n_samples": 64, "n_steps": 128}}).json()["job_id"]
    seen, deadline = [], time.monotonic() + 120
    while time.monotonic() < deadline:
        state = server.get(f"/xai/jobs/{job}").json()
        seen.append((state["stage"], state["progress"]))
        if state["stage"] == "attribute" and 0.2 < state["progress"] < 0.7:
            break
        assert state["status"] in ("queued", "running"), state
        time.sleep(0.05)
    assert any(s == "attribute" and 0.2 < p < 0.7 for s, p in seen), seen
    t = time.monotonic()
    server.delete(f"/xai/jobs/{job}")
    while server.get(f"/xai/jobs/{job}").json()["status"] == "running" and time.monotonic() - t < 60:
        time.sleep(0.05)
    final = server.get(f"/xai/jobs/{job}").json()
    assert final["status"] == "cancelled" and final["progress"] < 0.7
