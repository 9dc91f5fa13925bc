"""Launcher behind ``xai serve`` and ``make serve``: prepare a datastore, print how to call it, start.

The source studies folder is never written to. Its studies (NIfTI, NRRD, DICOM series folders;
``manifest.csv`` names them when present) are copied or converted to NIfTI, geometry kept, into the
datastore folder, which MONAI Label's local datastore can list (it lists top-level NIfTI/NRRD
files only, not DICOM folders). Studies already in the datastore are left alone, so labels and
uploads survive restarts. Then this process becomes ``monailabel start_server`` with this app.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import sys
from pathlib import Path

from xai_core.io import ImageError, read_image, write_image
from xai_core.settings import REPO_ROOT, get_settings

# lib.options.STATE_DIR and AppOptions.dicom_dir: lib is MONAI Label's top-level package, which this
# launcher does not import.
STATE_DIR = ".xai"

APP_DIR = Path(__file__).resolve().parent
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".dcm")
COPY_AS_IS = (".nii.gz", ".nii")
WILDCARD_HOSTS = {"0.0.0.0", "::", "[::]", ""}


def _study_id(name: str) -> str:
    stem = name
    for s in IMAGE_SUFFIXES:
        if stem.lower().endswith(s):
            stem = stem[: -len(s)]
            break
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem).strip("._-") or "study"


def find_studies(src: Path) -> list[tuple[str, Path]]:
    """``[(id, path)]`` of the studies in ``src``: the manifest's rows, else top-level images and folders."""
    manifest = src / "manifest.csv"
    if manifest.is_file():
        with open(manifest, newline="") as f:
            return [(_study_id(r["study_id"]), src / r["image"]) for r in csv.DictReader(f)]
    out = []
    for p in sorted(src.iterdir()):
        if p.name.startswith(".") or p.name == "labels":
            continue
        if (p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)) or p.is_dir():
            out.append((_study_id(p.name), p))
    return out


def prepare_datastore(src: Path, dst: Path, log=print) -> list[str]:
    """Copy/convert the studies of ``src`` into ``dst`` (NIfTI); returns the ids now in ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    ids = []
    for sid, path in find_studies(src):
        present = [dst / f"{sid}{s}" for s in (".nii.gz", ".nii", ".nrrd")]
        if any(p.exists() for p in present):
            ids.append(sid)
            continue
        name = path.name.lower()
        try:
            if path.is_file() and name.endswith(COPY_AS_IS):
                read_image(path)  # refuse a broken file here rather than at the first request
                suffix = ".nii.gz" if name.endswith(".nii.gz") else ".nii"
                tmp = dst / f".{sid}.tmp{suffix}"
                shutil.copyfile(path, tmp)
                os.replace(tmp, dst / f"{sid}{suffix}")
            else:
                write_image(read_image(path), dst / f"{sid}.nii.gz")
                if path.is_dir():
                    # The series' own files, so that results and labels of this study can go back to
                    # PACS as DICOM SEG / Parametric Map referencing its instances (docs/dicom.md).
                    keep = dst / STATE_DIR / "dicom" / sid
                    shutil.rmtree(keep, ignore_errors=True)
                    shutil.copytree(path, keep)
        except ImageError as e:
            log(f"  skipped {path}: {e.problem}")
            continue
        ids.append(sid)
    return ids


def examples(url: str, image_id: str, token: bool) -> str:
    auth = ' -H "Authorization: Bearer $XAI_TOKEN"' if token else ""
    return "\n".join([
        f"  curl -s{auth} {url}/info/",
        f"  curl -s{auth} '{url}/datastore/?output=all'",
        f"  curl -s{auth} -X POST '{url}/infer/gradcampp?image={image_id}&output=json' "
        "-H 'Content-Type: application/json' -d '{\"target\": \"predicted\"}'",
        f"  curl -s{auth} -o heatmap.nii.gz -X POST '{url}/infer/gradcam?image={image_id}&output=image'",
        f"  curl -s{auth} -X POST '{url}/xai/explain/scorecam?image={image_id}'    # -> job_id",
        f"  curl -s{auth} {url}/xai/jobs/JOB_ID                                  # status, progress, result",
        f"  curl -s{auth} -X PUT '{url}/datastore/label?image={image_id}&tag=final' -F label=@mask.nii.gz "
        "-F 'params={\"result_id\": \"RESULT_ID\"}'",
    ])


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``xai serve`` (also used by ``python -m monai_app.serve``)."""
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; never 0.0.0.0)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--studies", default=str(get_settings().samples_dir), help="source studies folder (read only)")
    p.add_argument("--datastore", default=None,
                   help="datastore folder the server uses (default runs/server/<studies folder name>)")
    p.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="app option (model, device, max_upload_mb, ...), see docs/server.md")
    p.add_argument("--prepare-only", action="store_true", help="prepare the datastore and exit")


def run(a: argparse.Namespace) -> int:
    """Prepare the datastore, print the URL and example calls, then exec the server (does not return)."""
    if a.host.strip() in WILDCARD_HOSTS:
        print(f"refusing to bind {a.host!r} (every interface); give a specific address such as 127.0.0.1",
              file=sys.stderr)
        return 2
    src = Path(a.studies).resolve()
    if not src.is_dir():
        print(f"studies folder {src} does not exist (make samples generates data/samples)", file=sys.stderr)
        return 2
    dst = Path(a.datastore).resolve() if a.datastore else REPO_ROOT / "runs" / "server" / src.name
    ids = prepare_datastore(src, dst)
    print(f"datastore {dst}: {len(ids)} studies")
    if a.prepare_only:
        return 0

    conf = {k: v for k, v in a.conf}
    token = bool(conf.get("token") or get_settings().token)
    host = f"[{a.host}]" if ":" in a.host else a.host
    url = f"http://{host}:{a.port}"
    print(f"\nXAI explanation server (MONAI Label) starting on {url}  (ready in ~15-30 s; Ctrl-C stops it)")
    print(f"API docs: {url}/docs   contract: docs/http_api.md   guide: docs/server.md")
    print(examples(url, ids[0] if ids else "IMAGE_ID", token) + "\n", flush=True)

    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR), "--studies", str(dst),
           "--host", a.host, "--port", str(a.port), "--uvicorn_app", "monai_app.asgi:app"]
    for k, v in conf.items():
        cmd += ["--conf", k, v]
    env = dict(os.environ)
    # monai_app must be importable for --uvicorn_app; the folder watcher is off (see lib/datastore.py).
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if x)
    env["MONAI_LABEL_DATASTORE_AUTO_RELOAD"] = "false"
    os.chdir(REPO_ROOT)
    os.execve(sys.executable, cmd, env)  # this process becomes the server: signals reach it directly
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m monai_app.serve", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
