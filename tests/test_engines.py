"""The local and Ray engines give the same per-study numbers (xai_core.engines), on a tiny random-weight
model and small synthetic studies, with a local Ray instance that the test starts and shuts down."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from xai_core.engines import Task, explain_study, run, run_local, tables
from xai_core.io import write_image
from xai_core.settings import Settings

_spec = importlib.util.spec_from_file_location("xai_server_utils_engines", Path(__file__).with_name("server_utils.py"))
su = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = su  # dataclasses look their module up while the file runs
_spec.loader.exec_module(su)

N_STUDIES = 8


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """8 small studies (32^3 voxels at 4-6 mm, oblique ones too) with masks, and a tiny model's settings."""
    root = tmp_path_factory.mktemp("cohort")
    su.make_tiny_model(root / "weights", seed=3)
    rows = []
    labels = ["glioma", "meningioma", "metastasis", "none"]
    for n in range(N_STUDIES):
        direction = su.rotation((1, 0.3, 0.2), 15.0 * n) if n % 3 == 2 else (1, 0, 0, 0, 1, 0, 0, 0, 1)
        img, mask = su.synthetic_study((28 + n % 3, 32, 30), (6.0, 5.0, 5.5 + 0.2 * n), (-80.0, -90.0, -70.0),
                                       direction=direction, seed=n)
        write_image(img, root / f"s{n}.nii.gz")
        write_image(mask, root / f"s{n}_mask.nii.gz")
        rows.append({"study_id": f"s{n}", "label": labels[n % 4], "format": "nifti",
                     "image": str(root / f"s{n}.nii.gz"), "mask": str(root / f"s{n}_mask.nii.gz")})
    settings = Settings(weights_dir=root / "weights", user_weights_dir=root / "no-user-weights", device="cpu",
                        num_threads=1, faithfulness_steps=4, ray_cpus_per_worker=1.0,
                        sanity_verdicts=root / "verdicts.json")
    return rows, settings


def _numbers(rows):
    """Every per-study number of the cases, curves and sanity tables, timings left out."""
    out = {}
    for r in rows:
        key = (r["table"], r["study_id"], r["method"], r.get("curve", ""))
        out[key] = {k: v for k, v in r.items() if "seconds" not in k and k not in ("study_s",)}
    return out


def test_ray_engine_matches_local_engine(cohort):
    ray = pytest.importorskip("ray")
    rows, settings = cohort
    task = Task(methods=["gradcam", "gradcam++"], sanity_ids=("s0",))
    local = run_local(rows, task, settings)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 1024 * 1024,
             _node_ip_address="127.0.0.1")
    try:
        stats: dict = {}
        remote = run(rows, task, settings, engine="ray", workers=2, stats=stats)
    finally:
        ray.shutdown()
    assert stats["workers"] == 2 and len(stats["study_s"]) == N_STUDIES and stats["gpus_per_worker"] == 0
    a, b = _numbers(local), _numbers(remote)
    assert a.keys() == b.keys()
    t = tables(local)
    assert len(t["cases"]) == 2 * N_STUDIES and len(t["sanity"]) == 2 and len(t["curves"]) == 2 * 2 * N_STUDIES
    scored = [c for c in t["cases"] if c["label"] != "none"]
    assert len(scored) == 2 * 6 and all("dice" in c and "auc_deletion_morf" in c for c in scored)
    assert all("dice" not in c for c in t["cases"] if c["label"] == "none")
    for key in a:
        assert a[key] == b[key], key  # identical, not merely close
    assert all(math.isfinite(c["abpc"]) for c in t["cases"])


def test_explain_study_writes_files_and_examples(cohort, tmp_path):
    rows, settings = cohort
    task = Task(methods=["gradcam"], faithfulness=False, localisation=False, target=None,
                example_ids=("s1",), out_dir=str(tmp_path / "out"))
    got = tables(explain_study(rows[1], settings, task=task))
    case = got["cases"][0]
    assert "dice" not in case and "auc_deletion_morf" not in case and case["target"] == case["predicted"]
    folder = tmp_path / "out" / "s1" / "gradcam"
    assert (folder / "saliency.nii.gz").is_file() and (folder / "result.json").is_file()
    ex = got["examples"][0]
    assert ex["image"].shape == ex["saliency"].shape == ex["truth"].shape and ex["truth"].any()


def test_unknown_engine(cohort):
    rows, settings = cohort
    with pytest.raises(ValueError, match="engine"):
        run(rows[:1], Task(methods=["gradcam"]), settings, engine="spark")
