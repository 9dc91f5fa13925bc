"""Label provenance is the server's word: stamped from the stored result, never from the client."""

from __future__ import annotations

import pytest

from monai_app.lib.errors import BadInput
from monai_app.lib.provenance import stamp

RESULT = {"image_id": "case1", "task": "gradcampp", "method": "gradcam++", "method_title": "Grad-CAM++ (...)",
          "targets": ["glioma"], "model": {"name": "brain-lesion-3d", "version": "1.2.0", "weights_sha256": "ab"}}


def test_server_values_win_over_the_clients():
    forged = {"result_id": "r1", "method": "manual-drawing", "model_version": "9.9", "source": "radiologist",
              "user": "someone-else", "saved_at": "1999-01-01", "note": "rim included"}
    info = stamp(forged, image_id="case1", result=RESULT, user=None, auth=True)
    assert info["method"] == "gradcam++" and info["model_version"] == "1.2.0"
    assert info["model_name"] == "brain-lesion-3d"
    assert info["source"] == "corrected_saliency" and info["result_known"] is True and info["task"] == "gradcampp"
    assert info["user"] is None and info["auth"] == "token" and info["saved_at"] != "1999-01-01"
    assert info["note"] == "rim included"  # the client's own notes are kept


def test_manual_and_unknown_results():
    assert stamp({}, image_id="c", result=None, user="ann", auth=True)["source"] == "manual"
    info = stamp({"result_id": "gone"}, image_id="c", result=None, user=None, auth=False)
    assert info["result_known"] is False and info["source"] == "corrected_saliency" and "method" not in info
    assert info["auth"] == "none"


def test_bad_provenance_requests():
    with pytest.raises(BadInput, match="computed for image 'case1'"):
        stamp({"result_id": "r1"}, image_id="other", result=RESULT, user=None, auth=False)
    with pytest.raises(BadInput, match="string id"):
        stamp({"result_id": ["x"]}, image_id="case1", result=None, user=None, auth=False)
    with pytest.raises(BadInput, match="at most 16 note"):
        stamp({f"k{i}": i for i in range(20)}, image_id="c", result=None, user=None, auth=False)
    with pytest.raises(BadInput, match="longer than"):
        stamp({"note": "x" * 5000}, image_id="c", result=None, user=None, auth=False)
