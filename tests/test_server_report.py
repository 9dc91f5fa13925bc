"""``report: true`` over plain HTTP with the shipped model: findings that name the lesion's structure
and side, a drafted report, both also as artifacts; one registration per image, reused."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from xai_core.findings import Findings
from xai_core.schema import ExplanationResult

_spec = importlib.util.spec_from_file_location("xai_server_utils_report", Path(__file__).with_name("server_utils.py"))
su = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = su
_spec.loader.exec_module(su)

pytestmark = [pytest.mark.slow]


def _one_lesion_study(rows: list[dict]) -> dict:
    """An oblique (non-NIfTI) study with one lesion on one side."""
    for r in rows:
        if r["label"] != "none" and r["hemisphere"] in ("left", "right") and int(r["n_lesions"]) == 1 \
                and r["format"] != "nifti":
            return r
    pytest.skip("no single-lesion oblique study in the fixture")


@pytest.fixture(scope="module")
def served(heldout_studies, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    study = _one_lesion_study(heldout_studies)
    src = root / "src"
    src.mkdir()
    path = Path(study["image"])
    name = f"case{''.join(path.suffixes) if path.is_file() else ''}"
    (shutil.copy if path.is_file() else shutil.copytree)(path, src / name)
    env = {"XAI_DEVICE": "cpu", "XAI_USER_WEIGHTS_DIR": str(root / "user_weights")}
    with su.running_server(src, root / "datastore", root / "server.log", env) as srv:
        yield srv, study


def test_report_true_returns_findings_and_report(served):
    server, study = served
    r = server.post("/infer/gradcampp", params={"image": "case", "output": "json"},
                    json={"report": True, "target": study["label"]})
    assert r.status_code == 200, r.text
    result = ExplanationResult.model_validate(r.json())
    f = result.findings
    assert isinstance(f, Findings) and result.report
    structures = study["structures"]
    truth = {name for name, _ in (json.loads(structures) if isinstance(structures, str) else structures)}
    named = {s.name for s in f.location.structures}
    assert named & truth, f"findings name {sorted(named)}, the lesion lies in {sorted(truth)}"
    assert f.location.hemisphere == study["hemisphere"]
    assert f.levels and [lv.level for lv in f.levels] == sorted(lv.level for lv in f.levels)
    assert f.location.structures[0].label.lower() in result.report.lower()
    assert result.timings_s["report"] > 0
    # Both are artifacts too.
    saved = server.get(result.artifacts["findings"])
    assert saved.status_code == 200 and saved.json() == f.model_dump(mode="json")
    assert server.get(result.artifacts["report"]).text == result.report


def test_registration_is_reused_and_report_is_off_by_default(served):
    server, study = served
    plain = server.post("/infer/gradcam", params={"image": "case", "output": "json"}, json={}).json()
    assert plain.get("findings") is None and plain.get("report") is None and "report" not in plain["timings_s"]
    first = server.post("/infer/gradcam", params={"image": "case", "output": "json"}, json={"report": True}).json()
    again = server.post("/infer/scorecam", params={"image": "case", "output": "json"},
                        json={"report": "true"}).json()
    # The second method on the same image reuses the registration: identical registration record.
    assert first["findings"]["registration"] == again["findings"]["registration"]
    bad = server.post("/infer/gradcam", params={"image": "case", "output": "json"}, json={"report": "maybe"})
    assert bad.status_code in (400, 422) and "report must be true or false" in bad.json()["detail"]
