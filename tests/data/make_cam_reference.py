"""Write ``cam_reference.npz``: CAM maps of the contract before issue 11 (commit d28d95e), so that
tests/test_explain_contract.py can show the maps are unchanged under the new contract.

Run from a checkout of that commit: ``PYTHONPATH=<old checkout> python tests/data/make_cam_reference.py``.
Inputs are seeded and rebuilt by the test; maps are stored every 4th voxel (every 2nd in 2-D).
After a new shipped model, copy its weights and card into the old checkout's weights folder and rerun
(done for brain-lesion-3d 1.3.0; the hand-built models' maps came out bit for bit the same).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def reference_inputs() -> dict[str, torch.Tensor]:
    """Seeded inputs: a smooth random volume on the 64^3 model grid and the GatedNet scenes."""
    g = torch.Generator().manual_seed(7)
    coarse = torch.rand(1, 1, 8, 8, 8, generator=g)
    vol = torch.nn.functional.interpolate(coarse, size=(64, 64, 64), mode="trilinear", align_corners=False)
    return {"default": (vol * 1.5).contiguous()}


def main() -> None:
    from xai_core.explain import get_explainer
    from xai_core.models import load

    spec = importlib.util.spec_from_file_location("cam_tests", HERE.parent / "test_explain_cam.py")
    cam_tests = importlib.util.module_from_spec(spec)
    sys.modules["cam_tests"] = cam_tests
    spec.loader.exec_module(cam_tests)
    model = load("brain-lesion-3d", device="cpu")
    x = reference_inputs()["default"]
    out = {}
    for method in ("gradcam", "gradcam++", "scorecam"):
        maps = get_explainer(method)(model.net).attribute(x, target="all")
        out[f"default/{method}"] = maps[..., ::4, ::4, ::4].numpy()
        for dims in (2, 3):
            net = cam_tests.GatedNet(dims)
            m = get_explainer(method)(net).attribute(cam_tests.scene(dims), target="all")
            out[f"gated{dims}/{method}"] = (m[..., ::2, ::2] if dims == 2 else m).numpy()
    np.savez_compressed(HERE / "cam_reference.npz", **out)
    print({k: v.shape for k, v in out.items()})


if __name__ == "__main__":
    main()
