"""How well can any explainer whose map is constant on fixed cubes rank the lesion voxels? (issue 13)

Each cube of ``--patch`` model-grid voxels is scored by the true lesion fraction inside it: the best
ranking a LIME-family map on those units can give. Its AUPRC against the lesion mask (model grid,
brain voxels, as ``bench/medlime.py --ablation`` scores the methods) bounds LIME and MedLIME from
above; no shipped weights are read beyond the model's grid. Usage::

    python bench/unit_ceiling.py --data data/heldout --studies 8 --patches 8 4 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from xai_core.data.brain import read_manifest
    from xai_core.explain.lime import patch_units
    from xai_core.io import read_image
    from xai_core.metrics import auprc
    from xai_core.models import load

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT / "data" / "heldout"))
    p.add_argument("--studies", type=int, default=8, help="first lesion studies of the manifest")
    p.add_argument("--patches", type=int, nargs="+", default=[8, 4, 2])
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    model = load("brain-lesion-3d", device="cpu")
    rows = [r for r in read_manifest(a.data) if r["label"] != "none"][:a.studies]
    cases = []
    for row in rows:
        x = model.prepare(read_image(row["image"])).tensor
        truth = model.grid.to_model(read_image(row["mask"]))[0] > 0.5
        brain = x[0, 0].numpy() > 0.1  # the ablation's brain voxels
        case = {"study": row["study_id"]}
        for patch in a.patches:
            lab = patch_units(x.shape[2:], patch, x[0]).labels.numpy().ravel()
            frac = np.bincount(lab, weights=truth.ravel()) / np.maximum(np.bincount(lab), 1)
            case[str(patch)] = auprc(frac[lab].reshape(truth.shape), truth, within=brain)
        cases.append(case)
    out = {"what": "AUPRC of the lesion-fraction-per-cube map (the ceiling of cube-unit explainers)",
           "data": a.data, "studies": len(rows),
           "ceiling": {str(q): round(float(np.mean([c[str(q)] for c in cases])), 4) for q in a.patches},
           "cases": cases}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
