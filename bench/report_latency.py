"""Added latency of ``report: true``: findings (registration, atlas labels of the mask and of each level,
counterfactual) and the drafted report, on top of the explanation itself.

The server registers an image once (``RegistrationCache``): the first method on an image pays for the
registration, later methods and requests on the same image do not. Both are measured, per study:

    explain            the explanation alone (what a request without report costs)
    report_first       findings + report with a registration (first request on the image)
    report_cached      findings + report with the cached registration (every later request)
    registration       the registration alone (part of report_first)

Usage: ``.venv/bin/python bench/report_latency.py --data data/heldout --n 8 [--method gradcam++]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xai_core.data.brain import read_manifest  # noqa: E402
from xai_core.findings import build_findings  # noqa: E402
from xai_core.io import read_image  # noqa: E402
from xai_core.models import load  # noqa: E402
from xai_core.pipeline import explain  # noqa: E402
from xai_core.registration import RegistrationCache  # noqa: E402
from xai_core.report import draft_report  # noqa: E402
from xai_core.settings import Settings  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--method", default="gradcam++")
    a = p.parse_args()
    cfg = Settings()
    model = load("brain-lesion-3d", settings=cfg)
    rows = [r for r in read_manifest(a.data) if r["label"] != "none"][:a.n]
    cols: dict[str, list[float]] = {"explain": [], "registration": [], "report_first": [], "report_cached": []}
    for r in rows:
        image = read_image(r["image"])
        cache = RegistrationCache()
        t = time.perf_counter()
        exp = explain(image, a.method, model=model, settings=cfg)
        cols["explain"].append(time.perf_counter() - t)
        for key in ("report_first", "report_cached"):
            t = time.perf_counter()
            t_reg = time.perf_counter()
            reg = cache.get(image, cfg)
            if key == "report_first":
                cols["registration"].append(time.perf_counter() - t_reg)
            findings = build_findings(exp, model=model, registration=reg, with_levels=True, settings=cfg)
            draft_report(findings, settings=cfg)
            cols[key].append(time.perf_counter() - t)
    print(f"{len(rows)} lesion studies of {a.data}, method {a.method}, seconds (median [min, max]):")
    print("| stage | median | min | max |\n|---|---|---|---|")
    for k, v in cols.items():
        print(f"| {k} | {statistics.median(v):.2f} | {min(v):.2f} | {max(v):.2f} |")


if __name__ == "__main__":
    main()
