"""Atlas labelling from native space, measured on held-out generated studies.

For every lesion study of a generated set (``xai_core.data.brain``; axial NIfTI and oblique,
anisotropic NRRD / DICOM inputs), registers the input to MNI152 (:mod:`xai_core.registration`),
labels the ground-truth mask (:mod:`xai_core.atlas`) and compares with the manifest, whose
``top_structure`` and ``hemisphere`` were computed on the template where the atlas is exact:

* top structure: the labelling's largest structure equals the manifest's ``top_structure``;
* hemisphere: equal to the manifest's ``hemisphere``;
* registration: seconds, NCC, Dice, how many were flagged ``likely_failed``.

With ``--methods`` (needs the trained model ``brain-lesion-3d``), the same two figures for each
method's adaptive saliency mask from :func:`xai_core.pipeline.explain`, explaining the predicted
class (``--target true``: the study's true class).

Usage::

    python bench/atlas_labelling.py --n 40 --seed 5151 --data /tmp/bench5151 [--bspline]
        [--methods gradcam++] [--target predicted|true] [--weights-dir DIR] [--out results.json]

The studies are generated into ``--data`` unless a manifest with at least ``--n`` rows is there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xai_core.atlas import label_region  # noqa: E402
from xai_core.data.brain import make_brain_studies, read_manifest  # noqa: E402
from xai_core.io import read_image  # noqa: E402
from xai_core.registration import register_to_mni  # noqa: E402
from xai_core.settings import Settings  # noqa: E402


def _studies(data: Path, n: int, seed: int) -> list[dict]:
    if not (data / "manifest.csv").exists() or len(read_manifest(data)) < n:
        make_brain_studies(n, seed, data)
    rows = [r for r in read_manifest(data)[:n] if r["label"] != "none"]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=40, help="studies to generate/use (about 40 %% have a lesion)")
    p.add_argument("--seed", type=int, default=5151)
    p.add_argument("--data", default="/tmp/bench5151")
    p.add_argument("--bspline", action="store_true", help="add the deformable registration stage")
    p.add_argument("--methods", nargs="*", default=[], help="explanation methods whose masks to label too")
    p.add_argument("--weights-dir", default=None, help="model weights folder (default: the shipped ones)")
    p.add_argument("--target", choices=["predicted", "true"], default="predicted",
                   help="explain the predicted class (what a user sees) or the study's true class")
    p.add_argument("--out", default=None, help="JSON file for per-study results")
    a = p.parse_args(argv)

    cfg = Settings()
    rows = _studies(Path(a.data), a.n, a.seed)
    model = None
    if a.methods:
        from xai_core.models import load

        weights = Path(a.weights_dir) if a.weights_dir else cfg.weights_dir
        model = load("brain-lesion-3d", weights_dir=weights, settings=cfg)
    results = []
    for r in rows:
        image, gt = read_image(r["image"]), read_image(r["mask"])
        reg = register_to_mni(image, bspline=a.bspline, settings=cfg)
        t = time.perf_counter()
        lab = label_region(gt, reg, settings=cfg)
        label_s = time.perf_counter() - t
        res = {"study": r["study_id"], "label": r["label"], "format": r["format"],
               "truth_top": r["top_structure"], "truth_hemisphere": r["hemisphere"],
               "registration": reg.quality(), "label_seconds": round(label_s, 2),
               "gt": {"top": lab.top_structure, "hemisphere": lab.hemisphere,
                      "top_ok": lab.top_structure == r["top_structure"],
                      "hemisphere_ok": lab.hemisphere == r["hemisphere"]}}
        for method in a.methods:
            from xai_core.pipeline import explain

            exp = explain(image, method, model=model, target=r["label"] if a.target == "true" else None,
                          settings=cfg)
            ml = label_region(exp.mask_image(), reg, exp.primary, settings=cfg)
            res[method] = {"predicted": exp.prediction.label, "top": ml.top_structure, "hemisphere": ml.hemisphere,
                           "top_ok": ml.top_structure == r["top_structure"],
                           "hemisphere_ok": ml.hemisphere == r["hemisphere"],
                           "peak_structure": ml.peak_structure, "empty": exp.mask.empty}
        results.append(res)
        print(f"{r['study_id']} {r['label']:<10} {r['format']:<5} reg {reg.seconds:4.1f}s ncc {reg.ncc:.2f} "
              f"dice {reg.dice:.2f}{' FAILED' if reg.likely_failed else ''} | truth {r['top_structure']} "
              f"({r['hemisphere']}) | gt-mask {lab.top_structure} ({lab.hemisphere})"
              + "".join(f" | {m} {res[m]['top']} ({res[m]['hemisphere']})" for m in a.methods), flush=True)

    def rate(key: str, field: str) -> str:
        ok = [x[key][field] for x in results]
        return f"{sum(ok)}/{len(ok)} = {100 * np.mean(ok):.0f} %" if ok else "n/a"

    secs = [x["registration"]["seconds"] for x in results]
    print(f"\nlesion studies: {len(results)} (of {a.n}, seed {a.seed}); registration "
          f"{'affine+bspline' if a.bspline else 'affine'}: median {np.median(secs):.1f} s, max {max(secs):.1f} s, "
          f"likely_failed {sum(x['registration']['likely_failed'] for x in results)}")
    print(f"ground-truth mask: top structure {rate('gt', 'top_ok')}, hemisphere {rate('gt', 'hemisphere_ok')}")
    for m in a.methods:
        print(f"{m} mask: top structure {rate(m, 'top_ok')}, hemisphere {rate(m, 'hemisphere_ok')}")
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
