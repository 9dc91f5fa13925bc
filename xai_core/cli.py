"""``xai`` command line: data generation, training, explanation and evaluation.

Each sub-command is a thin front end over a library function; no logic lives here.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _progress(label: str):
    start = time.time()

    def report(done: int, total: int) -> None:
        el = time.time() - start
        eta = el / max(done, 1) * (total - done)
        print(f"\r{label}: {done}/{total}  {el:6.0f}s elapsed, ~{eta:5.0f}s left", end="", file=sys.stderr,
              flush=True)
        if done == total:
            print(file=sys.stderr)

    return report


def _cmd_make_brain(a: argparse.Namespace) -> int:
    from .data.brain import make_brain_studies

    path = make_brain_studies(a.n, a.seed, a.out, workers=a.workers, progress=_progress("studies"))
    print(f"wrote {a.n} studies and {path}")
    return 0


def _cmd_train(a: argparse.Namespace) -> int:
    from .train import train

    train(a.model, Path(a.data), val_dir=Path(a.val) if a.val else None, out_dir=Path(a.out),
          epochs=a.epochs, seed=a.seed, resume=a.resume)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xai", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="make sample data").add_subparsers(dest="what", required=True)
    mb = data.add_parser("make-brain", help="synthetic brain MR studies with known lesions")
    mb.add_argument("--n", type=int, required=True, help="number of studies")
    mb.add_argument("--seed", type=int, required=True)
    mb.add_argument("--out", required=True, help="output folder (studies, labels/, manifest.csv)")
    mb.add_argument("--workers", type=int, default=None, help="processes (default: up to 2)")
    mb.set_defaults(func=_cmd_make_brain)

    tr = sub.add_parser("train", help="train a model on generated studies")
    tr.add_argument("model", help="model name, e.g. brain-lesion-3d")
    tr.add_argument("--data", required=True, help="training studies folder (with manifest.csv)")
    tr.add_argument("--val", default=None, help="validation studies folder (calibration, model card)")
    tr.add_argument("--out", default="runs/train", help="checkpoints and logs")
    tr.add_argument("--epochs", type=int, default=30)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    tr.set_defaults(func=_cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
