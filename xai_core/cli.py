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
    from .data.brain import make_brain_studies, options_from_cli

    try:
        options = options_from_cli(a.realistic, a.templates, a.skull, a.contrasts, a.crop_fov, a.max_slice_mm,
                                   a.min_slice_mm)
    except ValueError as e:  # a user error: one line, exit code 2
        print(f"xai data make-brain: {e}", file=sys.stderr)
        return 2
    path = make_brain_studies(a.n, a.seed, a.out, workers=a.workers, progress=_progress("studies"),
                              options=options)
    print(f"wrote {a.n} studies and {path}")
    return 0


def _cmd_make_vqa(a: argparse.Namespace) -> int:
    """SLAKE-layout VQA set from existing studies (``--data``) or ``--n`` new ones (docs/vqa.md)."""
    from .data.vqa import VQAOptions, make_vqa

    if (a.data is None) == (a.n is None):  # a user error: one line, exit code 2
        print("xai data make-vqa: give either --data DIR (studies with manifest.csv) or --n N", file=sys.stderr)
        return 2
    if a.data is not None and not (Path(a.data) / "manifest.csv").is_file():
        print(f"xai data make-vqa: {a.data} has no manifest.csv", file=sys.stderr)
        return 2
    if a.n is not None and a.n < 1:
        print(f"xai data make-vqa: --n must be at least 1, got {a.n}", file=sys.stderr)
        return 2
    data = a.data
    if data is None:
        from .data.brain import make_brain_studies

        data = Path(a.out) / "studies"
        make_brain_studies(a.n, a.seed, data, workers=a.workers, progress=_progress("studies"))
    options = VQAOptions(lesion_slices=a.lesion_slices, free_slices=a.free_slices, normal_slices=a.normal_slices)
    counts = make_vqa(a.out, data, seed=a.seed, options=options, workers=a.workers, progress=_progress("slices"))
    print(f"wrote {counts['images']} slices, {counts['train']} / {counts['validation']} / {counts['test']} "
          f"train / validation / test questions to {a.out}")
    return 0


def _cmd_train(a: argparse.Namespace) -> int:
    a.minutes_set = a.minutes is not None
    if a.model == "brain-vqa":  # the Med-VQA model (xai_core/train_vqa.py, docs/vqa.md)
        return _train_vqa(a)
    if a.model == "mae-3d":  # MedLIME's generative in-filler (xai_core/mae.py, docs/medlime.md)
        from .mae import train_mae

        cmd = " ".join(["xai", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("xai") else ""
        path = train_mae(a.data, a.out, val=a.val, minutes=a.minutes if a.minutes is not None else 12.0, seed=a.seed,
                         lr=a.lr if a.lr is not None else 1e-3, version=a.version, command=cmd,
                         init=a.init)
        print(f"wrote {path} and its card {path.with_name(path.stem + '.card.json')}")
        return 0
    from .train import train

    train(a.model, Path(a.data), val_dir=Path(a.val) if a.val else None, out_dir=Path(a.out),
          epochs=a.epochs, seed=a.seed, resume=a.resume, lr=a.lr if a.lr is not None else 3e-3,
          init=Path(a.init) if a.init else None, version=a.version)
    return 0


def _train_vqa(a: argparse.Namespace) -> int:
    from .train_vqa import VQATrainSettings, train_brain_vqa

    cfg = VQATrainSettings(seed=a.seed, **({"lr": a.lr} if a.lr is not None else {}))
    if a.minutes_set:  # scale the three stage budgets to the total asked for
        total = cfg.mlm_minutes + cfg.clip_minutes + cfg.vqa_minutes
        k = a.minutes / total
        cfg.mlm_minutes, cfg.clip_minutes, cfg.vqa_minutes = (cfg.mlm_minutes * k, cfg.clip_minutes * k,
                                                              cfg.vqa_minutes * k)
    for d in (a.vision_model, a.text_model):
        if d is not None and not Path(d).is_dir():
            print(f"xai train: checkpoint folder {d} does not exist", file=sys.stderr)
            return 2
    cmd = " ".join(["xai", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("xai") else ""
    path = train_brain_vqa(a.data, a.out, cfg, version=a.version, resume=a.resume, vision_dir=a.vision_model,
                           text_dir=a.text_model, weights_dir=a.weights_out, command=cmd)
    print(f"wrote {path}")
    return 0


def _method_params(pairs: list[str] | None) -> dict:
    """``KEY=VALUE`` pairs; values are read as JSON when they parse (numbers, booleans), else text."""
    import json

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--param wants KEY=VALUE with a Python name as KEY, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _cmd_explain(a: argparse.Namespace) -> int:
    from .io import read_image
    from .models import load
    from .pipeline import explain, write_explanation
    from .settings import Settings

    def progress(stage: str, frac: float) -> None:
        print(f"\r[{int(frac * 100):3d}%] {stage:<10}", end="\n" if frac >= 1 else "", file=sys.stderr, flush=True)

    settings = Settings()
    image = read_image(a.image, untrusted=a.untrusted, settings=settings)
    model = load(a.model, settings=settings)
    exp = explain(image, a.method, target=a.target, model=model, method_kwargs=_method_params(a.param),
                  progress=progress, settings=settings)
    files = write_explanation(exp, a.out)
    if a.report or a.llm:
        from .report import write_report

        files.update(write_report(exp, a.out, llm_dir=a.llm))
    if Path(a.image).is_dir():  # a DICOM series in: SEG and Parametric Map out too (docs/dicom.md)
        files.update(_dicom_outputs(exp, a.image, a.out, findings=files.get("findings")))
    p = exp.prediction
    print(f"predicted {p.label} (p = {float(p.probabilities.max()):.3f}); mask "
          f"{'empty: ' + str(exp.mask.reason) if exp.mask.empty else str(int(exp.mask.mask.sum())) + ' voxels'}")
    for name, path in files.items():
        print(f"  {name:<20} {path}")
    return 0


def _cmd_ask(a: argparse.Namespace) -> int:
    """A question about one slice (``xai_core.ask``): answer.json, saliency.nii.gz, tokens.json, overlay.png."""
    from .ask import ask, check_request, write_answer
    from .io import read_image
    from .models import load
    from .settings import Settings

    # Plane, method and slice position are checked here rather than by argparse so that a bad value is
    # one line (argparse prints its usage too); the cheap checks run before the model is loaded.
    check_request(a.question, a.plane, a.slice_mm, a.method)
    settings = Settings()
    image = read_image(a.image, untrusted=a.untrusted, settings=settings)
    check_request(a.question, a.plane, a.slice_mm, a.method, image)
    model = load(a.model, settings=settings)
    res = ask(image, a.question, plane=a.plane, slice_mm=a.slice_mm, method=a.method, model=model,
              method_kwargs=_method_params(a.param), settings=settings)
    files = write_answer(res, a.out)
    ans = res.answer
    print(f"{ans.answer} (p = {ans.confidence:.3f}, {ans.answer_type}); {ans.slice.plane} slice at "
          f"{ans.slice.axis} = {ans.slice.position_mm:.1f} mm; {ans.method}")
    for name, path in files.items():
        print(f"  {name:<10} {path}")
    return 0


def _dicom_outputs(exp, source: str, out: str, findings: Path | None) -> dict[str, Path]:
    """``mask.seg.dcm``, ``levels.seg.dcm``, ``saliency.pm.dcm``; anatomy from ``findings.json``
    when ``--report`` wrote one (no extra registration otherwise: the region is then the brain)."""
    from .export_dicom import write_dicom_outputs

    return write_dicom_outputs(exp, source, out, findings=findings, anatomy=False)


def _cmd_export_seg(a: argparse.Namespace) -> int:
    """A label (the corrected mask from the viewer) on a DICOM series' grid -> DICOM SEG."""
    import json

    from .export_dicom import export_label
    from .io import read_image

    result = json.loads(Path(a.result).read_text()) if a.result else {}
    findings = json.loads(Path(a.findings).read_text()) if a.findings else {}
    model = result.get("model") or {}
    method = a.method or result.get("method") or "gradcam++"
    label_class = a.label_class or (result.get("targets") or ["none"])[0]
    structure = a.structure or (findings.get("location") or {}).get("top_structure")
    label = read_image(a.label, dtype=None)
    path = export_label(label, a.source, a.out, label_class=label_class, method=method,
                        model=a.model or model.get("name") or "brain-lesion-3d",
                        model_version=model.get("version") or "unknown",
                        weights_sha256=model.get("weights_sha256") or "",
                        structure=structure, corrected=not a.uncorrected,
                        parameters={"user": a.user} if a.user else None)
    print(f"wrote {path} ({label_class}, {method}{', ' + structure if structure else ''})")
    return 0


def _evaluate_vqa(a: argparse.Namespace) -> int:
    """``xai evaluate --task vqa``: accuracy on a SLAKE-layout split and AOPC of each method, with
    bootstrap CIs and the Wilcoxon test (``xai_core.vqa_faithfulness``, docs/vqa.md)."""
    import shlex

    from .models import load
    from .settings import Settings
    from .vqa_faithfulness import AOPCSettings, evaluate_vqa, summary_table, write_vqa_results

    if not Path(a.data).is_dir():
        raise FileNotFoundError(f"{a.data} is not a folder (a SLAKE-layout folder from xai data make-vqa)")
    try:
        fill = a.aopc_fill if a.aopc_fill == "mean" else float(a.aopc_fill)
    except ValueError:
        raise ValueError(f"--aopc-fill must be a number or 'mean', got {a.aopc_fill!r}") from None
    aopc = AOPCSettings(patch=a.aopc_patch, steps=a.aopc_steps, fraction=a.aopc_fraction, fill=fill,
                        rank=a.aopc_rank)
    settings = Settings()
    model = load(a.model or "brain-vqa", weights_dir=Path(a.weights_dir) if a.weights_dir else None,
                 settings=settings)
    res = evaluate_vqa(model, a.data, a.methods or ["relig", "ig"], split=a.split, cases=a.cases, settings=aopc,
                       params=_method_params(a.param), config=settings, seed=a.seed, progress=_progress("cases"),
                       accuracy_progress=_progress("questions"))
    command = "xai " + " ".join(shlex.quote(v) for v in sys.argv[1:]) if a.command_line is None else a.command_line
    paths = write_vqa_results(res, a.out or "runs/evaluate_vqa", command=command)
    print(summary_table(res), end="")
    for name, path in paths.items():
        print(f"  {name:<10} {path}")
    return 0


def _cmd_evaluate(a: argparse.Namespace) -> int:
    import shlex

    from .eval_report import write_report
    from .evaluate import evaluate_cohort, write_results
    from .settings import Settings

    if a.task == "vqa":  # Med-VQA: accuracy and AOPC on a SLAKE-layout split
        return _evaluate_vqa(a)
    a.methods = a.methods or ["gradcam", "gradcam++", "scorecam"]
    a.out = a.out or "runs/evaluate"
    settings = Settings()
    kwargs = {m: _method_params(a.param) for m in a.methods} if a.param else None
    res = evaluate_cohort(a.methods, a.data, limit=a.limit, engine=a.engine, address=a.address, workers=a.workers,
                          faithfulness=not a.no_faithfulness, insertion=a.insertion, sanity_studies=a.sanity_studies,
                          examples=a.examples, method_kwargs=kwargs, progress=_progress("studies"), settings=settings,
                          **({"model": a.model} if a.model else {}))
    keep = ("study_id", "label", "format", "method", "predicted", "dice", "iou", "auprc", "pointing_game",
            "mask_empty", "seconds")
    write_results([{k: c[k] for k in keep} for c in res["cases"]], a.out)
    command = "xai " + " ".join(shlex.quote(v) for v in sys.argv[1:]) if a.command_line is None else a.command_line
    paths = write_report(res, a.out, command=command, data=str(a.data), settings=settings)
    from .eval_report import headline_markdown, headline_rows

    print(headline_markdown(headline_rows(res["cases"], res["sanity"])))
    for name, path in paths.items():
        print(f"  {name:<16} {path}")
    return 0


def _cmd_sanity(a: argparse.Namespace) -> int:
    from .evaluate import cohort_rows
    from .io import read_image
    from .models import load
    from .sanity import cascade, write_sanity
    from .settings import Settings

    settings = Settings()
    model = load(a.model, settings=settings)
    if (a.image is None) == (a.data is None):
        raise ValueError("give one IMAGE or --data DIR")
    if a.image is not None:
        items = [(Path(a.image).name, a.image, a.target)]
    else:
        items = [(r["study_id"], r["image"], r["label"] if a.target is None else a.target)
                 for r in cohort_rows(a.data, a.limit)]
    results = []
    report = _progress("sanity")
    for n, (sid, path, target) in enumerate(items):
        image = read_image(path)
        for method in a.methods:
            results.append(cascade(model, image, method, target=target, settings=settings, study_id=sid,
                                   method_kwargs=_method_params(a.param) or None))
        report(n + 1, len(items))
    paths = write_sanity(results, a.out, settings=settings)
    print(paths["markdown"].read_text())
    for name, path in paths.items():
        print(f"  {name:<10} {path}")
    return 0


def _cmd_explain_batch(a: argparse.Namespace) -> int:
    import csv
    import json

    from .engines import Task, find_studies, run, tables
    from .settings import Settings

    settings = Settings()
    # Labels and masks are not used here: explain-batch explains, it does not score.
    rows = [{k: r[k] for k in ("study_id", "image", "format") if k in r} for r in find_studies(a.folder)][:a.limit]
    if not rows:
        raise ValueError(f"no images in {a.folder}")
    task = Task(methods=a.methods, model=a.model, target=a.target, localisation=False, faithfulness=False,
                method_kwargs={m: _method_params(a.param) for m in a.methods} if a.param else {}, out_dir=a.out)
    stats: dict = {}
    cases = tables(run(rows, task, settings, engine=a.engine, address=a.address, workers=a.workers,
                       progress=_progress("studies"), stats=stats))["cases"]
    out = Path(a.out)
    with open(out / "batch.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(cases[0]))
        w.writeheader()
        w.writerows(cases)
    (out / "batch.json").write_text(json.dumps({k: v for k, v in stats.items() if k != "study_s"}, indent=2))
    print(f"explained {len(rows)} studies x {len(a.methods)} methods on {a.engine} ({stats.get('workers')} "
          f"worker(s)) in {stats.get('wall_s', 0):.0f} s: {out / 'batch.csv'}")
    return 0


def _cmd_model_eval(a: argparse.Namespace) -> int:
    import json

    from .evaluate import model_accuracy
    from .models import load

    model = load(a.model)
    res = model_accuracy(a.data, model, limit=a.limit)
    summary = {k: v for k, v in res.items() if k != "per_study"}
    print(json.dumps(summary, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))
    if a.card:
        # Held-out figures belong in the card that ships with the weights; the caller names the card
        # (a training run's), so evaluation never edits the shipped folder behind anyone's back.
        card_path = Path(a.card)
        card = json.loads(card_path.read_text())
        entry = {"data": a.card_data or str(a.data),
                 "command": " ".join(["xai", "model-eval", a.model, "--data", str(a.data)]), **summary}
        if a.condition:
            # Per-condition held-out figures (skull, contrast, slice thickness...) sit beside the
            # historic held-out set, which stays the regression reference.
            card.setdefault("metrics", {}).setdefault("heldout_conditions", {})[a.condition] = entry
        else:
            card.setdefault("metrics", {})["heldout"] = entry
        tmp = card_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(card, indent=2))
        tmp.replace(card_path)
    return 0


def _cmd_ood_fit(a: argparse.Namespace) -> int:
    import shlex

    from .models import load
    from .ood import fit_from_folder

    model = load(a.model)
    # From the parsed options, not sys.argv: main(argv) may be called from Python.
    command = f"xai ood fit --model {shlex.quote(a.model)} --data {shlex.quote(str(a.data))}" + (
        f" --limit {a.limit}" if a.limit else "") + (f" --out {shlex.quote(str(a.out))}" if a.out else "")
    path, stats = fit_from_folder(model, a.data, out=a.out, limit=a.limit, command=command,
                                  progress=_progress("studies"))
    print(f"wrote {path}: {len(stats.features)} studies, {len(stats.features[0])} features, threshold "
          f"{stats.threshold:.2f} ({stats.percentile:g}th percentile of leave-one-out distances)")
    return 0


def _serve_module():
    """``monai_app.serve``; the app sits beside ``xai_core`` in the repository and is not installed,
    so it is imported from there (None when this is not a repository checkout)."""
    from .settings import REPO_ROOT

    if not (REPO_ROOT / "monai_app" / "serve.py").is_file():
        return None
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import monai_app.serve

    return monai_app.serve


def _cmd_evidence_build(a: argparse.Namespace) -> int:
    from .evidence import build_library
    from .models import load
    from .settings import Settings

    model = load(a.model, settings=Settings())
    cmd = " ".join(["xai", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("xai") else ""
    lib = build_library(model, a.data, a.out, patch=a.patch, maps=a.maps, samples=a.samples, limit=a.limit,
                        progress=_progress("cases"), command=cmd)
    n_abn = sum(lab != "none" for lab in lib.labels)
    print(f"wrote {a.out}: {len(lib)} cases ({n_abn} abnormal), {lib.features.shape[1]} features, "
          f"{lib.maps.shape[1]} units of {a.patch}^3 voxels, maps: {a.maps}")
    return 0


def _cmd_serve(a: argparse.Namespace) -> int:
    return _serve_module().run(a)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xai", description=__doc__)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="make sample data").add_subparsers(dest="what", required=True)
    mb = data.add_parser("make-brain", help="synthetic brain MR studies with known lesions")
    mb.add_argument("--n", type=int, required=True, help="number of studies")
    mb.add_argument("--seed", type=int, required=True)
    mb.add_argument("--out", required=True, help="output folder (studies, labels/, manifest.csv)")
    mb.add_argument("--workers", type=int, default=None, help="processes (default: up to 2)")
    # Realism (docs/data.md). Unset options keep today's studies bit for bit, or the preset's value.
    mb.add_argument("--realistic", action="store_true",
                    help="preset: every template, skull mix, every contrast, --crop-fov 0.3, --max-slice-mm 6")
    mb.add_argument("--templates", default=None, help="comma list of mni152,icbm09c,icbm09a or all (default mni152)")
    mb.add_argument("--skull", choices=("off", "on", "mix"), default=None, help="skull and scalp (default off)")
    mb.add_argument("--contrasts", default=None, help="comma list of t1,t2,flair,random or mix (default t1)")
    mb.add_argument("--crop-fov", type=float, default=None, metavar="P", help="probability of a cut field of view")
    mb.add_argument("--max-slice-mm", type=float, default=None, help="thick slices: thickness drawn up to this")
    mb.add_argument("--min-slice-mm", type=float, default=None, help="lower end of the thickness draw")
    mb.set_defaults(func=_cmd_make_brain)

    mv = data.add_parser("make-vqa", help="SLAKE-layout VQA slices and questions from generated studies")
    mv.add_argument("--out", required=True, help="output folder (imgs/, train.json, validation.json, test.json)")
    mv.add_argument("--data", default=None, help="existing studies folder (with manifest.csv)")
    mv.add_argument("--n", type=int, default=None, help="or generate this many studies into OUT/studies")
    mv.add_argument("--seed", type=int, default=0, help="generator seed (with --n), splits and questions")
    mv.add_argument("--workers", type=int, default=None, help="processes (default: up to 2)")
    mv.add_argument("--lesion-slices", type=int, default=2, help="slices through the lesion per plane")
    mv.add_argument("--free-slices", type=int, default=1, help="lesion-free slices of a lesion study per plane")
    mv.add_argument("--normal-slices", type=int, default=2, help="slices of a lesion-free study per plane")
    mv.set_defaults(func=_cmd_make_vqa)

    tr = sub.add_parser("train", help="train a model on generated studies")
    tr.add_argument("model", help="model name, e.g. brain-lesion-3d")
    tr.add_argument("--data", required=True, help="training studies folder (with manifest.csv)")
    tr.add_argument("--val", default=None, help="validation studies folder (calibration, model card)")
    tr.add_argument("--out", default="runs/train", help="checkpoints and logs")
    tr.add_argument("--epochs", type=int, default=30)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    tr.add_argument("--lr", type=float, default=None, help="peak learning rate (one-cycle schedule; default 3e-3, "
                                                          "mae-3d: 1e-3)")
    tr.add_argument("--init", default=None, help="start from these weights (.pt of an earlier run)")
    tr.add_argument("--version", default="1.0.0", help="model version written into the card")
    tr.add_argument("--minutes", type=float, default=None,
                    help="wall-time budget: mae-3d (default 12), brain-vqa (all stages; default 47)")
    tr.add_argument("--vision-model", default=None, help="brain-vqa: a local CLIP vision checkpoint folder "
                                                         "(PubMedCLIP layout) instead of CLIP pretraining")
    tr.add_argument("--text-model", default=None, help="brain-vqa: a local BERT checkpoint folder (BioLinkBERT "
                                                       "layout) instead of the project's tokenizer and MLM")
    tr.add_argument("--weights-out", default=None, help="brain-vqa: where the card, weights and tokenizer go "
                                                        "(default --out)")
    tr.set_defaults(func=_cmd_train)

    me = sub.add_parser("model-eval", help="accuracy and segmentation Dice of a model on studies")
    me.add_argument("model", help="model name, e.g. brain-lesion-3d")
    me.add_argument("--data", required=True)
    me.add_argument("--limit", type=int, default=None)
    me.add_argument("--out", default=None, help="JSON file for the per-study results")
    me.add_argument("--card", default=None, help="write the figures into this model card JSON as metrics.heldout")
    me.add_argument("--card-data", default=None, help="how the studies were made, for the card")
    me.add_argument("--condition", default=None,
                    help="with --card: write into metrics.heldout_conditions[NAME] instead (e.g. skull_on_t2)")
    me.set_defaults(func=_cmd_model_eval)

    from .explain import available_methods

    ex = sub.add_parser("explain", help="explain a model's decision on one image")
    ex.add_argument("image", help="NIfTI/NRRD file, DICOM file or DICOM series folder")
    ex.add_argument("--model", default="brain-lesion-3d", help="model name (its card names its kind)")
    ex.add_argument("--method", default="gradcam++", choices=available_methods(),
                    help="explanation method (it must fit the model's kind)")
    ex.add_argument("--param", action="append", metavar="KEY=VALUE",
                    help="method parameter, e.g. --param n_samples=4 --param layer=down1 (repeatable)")
    ex.add_argument("--untrusted", action="store_true",
                    help="read the image as the server reads uploads: no detached data files, no non-image "
                         "DICOM, finite positive spacing, memory budget (docs/security.md)")
    ex.add_argument("--target", default=None, help="class name or index, 'all', or the predicted class (default)")
    ex.add_argument("--out", required=True, help="output folder")
    ex.add_argument("--report", action="store_true", help="also write findings.json and report.md")
    ex.add_argument("--llm", default=None, metavar="DIR",
                    help="a local causal language model folder drafts the report's impression, guarded "
                         "against the findings (implies --report)")
    ex.set_defaults(func=_cmd_explain)

    ak = sub.add_parser("ask", help="ask a vqa model a question about one slice of a volume (docs/vqa.md)")
    ak.add_argument("image", help="NIfTI/NRRD file, DICOM file or DICOM series folder")
    ak.add_argument("question", help="the question, e.g. \"Is there a lesion?\"")
    ak.add_argument("--plane", default="axial", help="patient plane: axial, coronal or sagittal (default axial)")
    ak.add_argument("--slice-mm", default=None, metavar="POS",
                    help="the slice's LPS coordinate along the plane's axis (S, P or L), mm (default: the "
                         "volume's centre)")
    ak.add_argument("--method", default="relig", help="explanation: relig (image and question tokens), ig (pixels) "
                                                      "or none (default relig)")
    ak.add_argument("--model", default="brain-vqa", help="vqa model name")
    ak.add_argument("--param", action="append", metavar="KEY=VALUE",
                    help="method parameter, e.g. --param n_samples=4 --param n_steps=8 (repeatable)")
    ak.add_argument("--untrusted", action="store_true", help="read the image as the server reads uploads")
    ak.add_argument("--out", required=True, help="output folder")
    ak.set_defaults(func=_cmd_ask)

    es = sub.add_parser("export-seg", help="a label on a DICOM series' grid as DICOM SEG (docs/dicom.md)")
    es.add_argument("label", help="label file (NIfTI/NRRD) on the series' grid, e.g. the corrected mask")
    es.add_argument("--source", required=True, help="the DICOM series folder the label was drawn on")
    es.add_argument("--out", required=True, help="the SEG file to write, e.g. label.seg.dcm")
    es.add_argument("--result", default=None, help="result.json of the explanation: method, class and model")
    es.add_argument("--findings", default=None, help="findings.json: the top structure codes the anatomy")
    es.add_argument("--method", default=None, help="explanation method (default: from --result, else gradcam++)")
    es.add_argument("--label-class", default=None,
                    help="class the label shows, e.g. glioma (default: from --result, else none)")
    es.add_argument("--structure", default=None, help="Harvard-Oxford structure, e.g. Left_Thalamus")
    es.add_argument("--model", default=None, help="model name (default: from --result)")
    es.add_argument("--user", default=None, help="who corrected the label (recorded as a parameter)")
    es.add_argument("--uncorrected", action="store_true", help="the model's own mask, not a reader's correction")
    es.set_defaults(func=_cmd_export_seg)

    ev = sub.add_parser("evaluate", help="score methods: localisation, faithfulness, sanity; writes report.md")
    ev.add_argument("--task", choices=["volume", "vqa"], default="volume",
                    help="volume: lesion studies (default); vqa: accuracy and AOPC on a SLAKE-layout split")
    ev.add_argument("--methods", nargs="+", default=None, choices=available_methods(),
                    help="default gradcam gradcam++ scorecam (volume) or relig ig (vqa: the first is compared "
                         "with the second)")
    ev.add_argument("--data", required=True, help="studies folder with manifest.csv (vqa: a SLAKE-layout folder)")
    ev.add_argument("--out", default=None, help="output folder (default runs/evaluate, vqa: runs/evaluate_vqa)")
    ev.add_argument("--model", default=None, help="model name (default brain-lesion-3d, vqa: brain-vqa)")
    ev.add_argument("--limit", type=int, default=None, help="at most this many lesion studies")
    ev.add_argument("--param", action="append", metavar="KEY=VALUE",
                    help="parameter given to every method that takes it (repeatable)")
    ev.add_argument("--engine", choices=["local", "ray"], default="local",
                    help="where studies run (docs/evaluation.md)")
    ev.add_argument("--address", default=None, help="Ray cluster address (ray start --head prints it); "
                                                    "default: a local Ray instance")
    ev.add_argument("--workers", type=int, default=None, help="Ray workers, one model each")
    ev.add_argument("--sanity-studies", type=int, default=3, help="studies that get the randomisation cascade")
    ev.add_argument("--examples", type=int, default=3, help="studies shown in the overlay grid")
    ev.add_argument("--no-faithfulness", action="store_true", help="skip the deletion curves")
    ev.add_argument("--insertion", action="store_true", help="also the insertion curves (twice the forwards)")
    ev.add_argument("--command-line", default=None, help=argparse.SUPPRESS)
    # --task vqa (docs/vqa.md, "Faithfulness (AOPC)")
    ev.add_argument("--split", default="test", choices=["train", "validation", "test"], help="vqa: the split")
    ev.add_argument("--cases", type=int, default=200,
                    help="vqa: questions explained, the first N of a seeded permutation of the split (default 200)")
    ev.add_argument("--seed", type=int, default=0, help="vqa: case sample, random-control orders, bootstrap")
    ev.add_argument("--weights-dir", default=None, help="vqa: folder holding the model's card and weights")
    ev.add_argument("--aopc-patch", type=int, default=8, help="vqa: deleted patch side, model-image pixels (8)")
    ev.add_argument("--aopc-steps", type=int, default=49, help="vqa: deletion steps L (49)")
    ev.add_argument("--aopc-fraction", type=float, default=0.25, help="vqa: share of patches deleted at step L")
    ev.add_argument("--aopc-fill", default="0", help="vqa: value of deleted pixels (0..1) or 'mean' (default 0)")
    ev.add_argument("--aopc-rank", choices=["signed", "absolute"], default="signed",
                    help="vqa: rank patches by the signed (default) or absolute attribution sum")
    ev.set_defaults(func=_cmd_evaluate)

    sa = sub.add_parser("sanity", help="cascading model randomisation: does the map depend on the model?")
    sa.add_argument("image", nargs="?", default=None, help="one image (or use --data)")
    sa.add_argument("--data", default=None, help="studies folder with manifest.csv (lesion studies)")
    sa.add_argument("--methods", nargs="+", default=["gradcam", "gradcam++", "scorecam"], choices=available_methods())
    sa.add_argument("--model", default="brain-lesion-3d")
    sa.add_argument("--target", default=None, help="class name (default: the study's label, or the prediction)")
    sa.add_argument("--limit", type=int, default=None)
    sa.add_argument("--param", action="append", metavar="KEY=VALUE")
    sa.add_argument("--out", default="runs/sanity", help="table, cascade plot, verdicts.json")
    sa.set_defaults(func=_cmd_sanity)

    eb = sub.add_parser("explain-batch", help="explain every image of a folder (locally or on Ray)")
    eb.add_argument("folder", help="folder of images (or studies with manifest.csv)")
    eb.add_argument("--out", required=True, help="output folder: <study>/<method>/ files, batch.csv")
    eb.add_argument("--methods", nargs="+", default=["gradcam++"], choices=available_methods())
    eb.add_argument("--model", default="brain-lesion-3d")
    eb.add_argument("--target", default=None, help="class name or index, 'all', or the predicted class (default)")
    eb.add_argument("--param", action="append", metavar="KEY=VALUE")
    eb.add_argument("--engine", choices=["local", "ray"], default="local")
    eb.add_argument("--address", default=None, help="Ray cluster address; default: a local Ray instance")
    eb.add_argument("--workers", type=int, default=None, help="Ray workers, one model each")
    eb.add_argument("--limit", type=int, default=None)
    eb.set_defaults(func=_cmd_explain_batch)

    ood = sub.add_parser("ood", help="out-of-distribution guard (docs/ood.md)").add_subparsers(dest="what",
                                                                                               required=True)
    of = ood.add_parser("fit", help="fit the feature statistics on in-distribution studies")
    of.add_argument("--model", default="brain-lesion-3d", help="model name")
    of.add_argument("--data", required=True, help="in-distribution studies, e.g. data/val")
    of.add_argument("--out", default=None, help="JSON to write (default: <model>.ood.json beside the weights)")
    of.add_argument("--limit", type=int, default=None)
    of.set_defaults(func=_cmd_ood_fit)

    evd = sub.add_parser("evidence", help="MedLIME's evidence library (docs/medlime.md)").add_subparsers(
        dest="what", required=True)
    eb_ = evd.add_parser("build", help="features and patch-weight maps of training cases, for MedLIME's EBR")
    eb_.add_argument("--model", default="brain-lesion-3d", help="model name (its grid and, for --maps lime, "
                                                                 "its forward)")
    eb_.add_argument("--data", required=True, help="training studies folder with manifest.csv")
    eb_.add_argument("--out", required=True, help="library file to write (.npz)")
    eb_.add_argument("--maps", choices=("lesion", "lime"), default="lesion",
                     help="unit maps: ground-truth lesion fraction (default) or plain-LIME weights")
    eb_.add_argument("--patch", type=int, default=8, help="unit side in model-grid voxels (MedLIME's patch)")
    eb_.add_argument("--samples", type=int, default=256, help="LIME samples per case (--maps lime)")
    eb_.add_argument("--limit", type=int, default=None)
    eb_.set_defaults(func=_cmd_evidence_build)

    serve = _serve_module()
    if serve is not None:
        sv = sub.add_parser("serve", help="run the MONAI Label explanation server (docs/server.md)")
        serve.add_arguments(sv)
        sv.set_defaults(func=_cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run a sub-command. Bad input (an unreadable image, an unknown target, method or model) is one
    line on stderr and exit code 2; ``--debug`` (or ``XAI_DEBUG=1``) shows the traceback instead."""
    import os

    from .explain import TargetError
    from .io import ImageError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ImageError, TargetError, ValueError, KeyError, FileNotFoundError) as exc:
        if args.debug or os.environ.get("XAI_DEBUG"):
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"xai {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
