"""Cohort throughput of the engines: studies per second with the local engine and with 1 and 2 Ray workers.

    .venv/bin/python bench/ray_throughput.py --data data/heldout --n 8 --methods gradcam++ --jsonl runs/ray_tp.jsonl

Each configuration explains the same ``n`` studies (prepare, predict, attribute, mask; no files written,
no scoring) with ``xai_core.engines``. Ray runs start a local instance with one CPU per worker and one
torch thread per worker (``Settings.ray_cpus_per_worker = 1``); the start-up of the instance and of the
actors (model loading) is measured apart from the steady-state wall time. The numbers of the Ray and
local runs are compared, too (they must be identical).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default="data/heldout")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--methods", nargs="+", default=["gradcam++"])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--jsonl", default="runs/ray_throughput.jsonl")
    a = ap.parse_args()

    import ray

    from xai_core.engines import Task, find_studies, run_local, run_ray
    from xai_core.settings import Settings

    rows = [{k: r[k] for k in ("study_id", "image", "format")} for r in find_studies(a.data)][: a.n]
    task = Task(methods=a.methods, localisation=False, faithfulness=False, target=None)
    out = Path(a.jsonl)
    out.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]

    def numbers(rs):
        return [(r["study_id"], r["method"], r["predicted"], r["mask_voxels"]) for r in rs if r["table"] == "cases"]

    records = []

    def emit(rec: dict) -> None:
        # One line as soon as a configuration is done: a later failure keeps the earlier figures.
        rec.update(methods=a.methods, data=a.data, cpus=os.cpu_count())
        records.append(rec)
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)

    cfg = Settings(num_threads=1, ray_cpus_per_worker=1.0)
    t = time.perf_counter()
    local = run_local(rows, task, cfg)
    wall = time.perf_counter() - t
    emit({"engine": "local", "workers": 1, "threads": 1, "n": len(rows), "wall_s": wall,
                    "studies_per_s": len(rows) / wall, "load_avg_1min": load})
    for w in a.workers:
        t0 = time.perf_counter()
        ray.init(num_cpus=w, include_dashboard=False, log_to_driver=False, object_store_memory=128 * 1024 ** 2,
                 _node_ip_address="127.0.0.1")
        init_s = time.perf_counter() - t0
        stats: dict = {}
        try:
            t = time.perf_counter()
            got = run_ray(rows, task, cfg, workers=w, stats=stats)
            total = time.perf_counter() - t
        finally:
            ray.shutdown()
        emit({"engine": "ray", "workers": w, "threads": 1, "n": len(rows), "ray_init_s": init_s,
                        "actors_and_run_s": total, "wall_s": stats["wall_s"],
                        "studies_per_s": len(rows) / stats["wall_s"],
                        "mean_study_s": sum(stats["study_s"]) / len(stats["study_s"]),
                        "identical_to_local": numbers(got) == numbers(local), "load_avg_1min": os.getloadavg()[0]})


if __name__ == "__main__":
    main()
