"""Med-VQA data (issue 12, item 1): patient-plane slices, ``xai data make-vqa``, the SLAKE loader.

Studies here are tiny hand-made volumes (an ellipsoid "brain" with ball lesions at known LPS points,
axis-aligned and oblique) written with a manifest in the brain generator's columns: the real
generator takes minutes per study on a loaded 2-core machine and these tests need exact truth.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image as PILImage
from scipy import ndimage

from xai_core.data.slake import load_slake, read_split
from xai_core.data.vqa import HELD_OUT_PER_TYPE, MIN_LESION_AREA_MM2, PHRASINGS, size_band
from xai_core.io import Image, write_image
from xai_core.slices import pixel_to_physical, sample_slice, slice_geometry_from_json, slice_to_volume


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    ax, ay, az = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _grid(size_ijk, spacing, direction: np.ndarray, centre) -> Image:
    """An empty float32 volume of ``size_ijk`` voxels centred on LPS point ``centre``."""
    size, sp = np.asarray(size_ijk), np.asarray(spacing, float)
    origin = np.asarray(centre, float) - direction @ (sp * (size - 1) / 2)
    return Image(np.zeros(tuple(size[::-1]), np.float32), tuple(sp), tuple(origin), tuple(direction.flatten()))


def _centres(img: Image) -> np.ndarray:
    """LPS mm of every voxel centre, shape ``(K, J, I, 3)``."""
    k, j, i = np.meshgrid(*[np.arange(s) for s in img.array.shape], indexing="ij")
    return img.index_to_physical(np.stack([i, j, k], -1).astype(float))


OBLIQUE = _rotation(20, -15, 25)
BALL = np.array([12.0, -8.0, 6.0])  # LPS mm
R_BALL = 5.0


@pytest.fixture(scope="module")
def oblique_volume() -> tuple[Image, dict[str, np.ndarray]]:
    """Oblique anisotropic volume with 5 mm balls at BALL and 20 mm from it along +L, +P and +S."""
    img = _grid((56, 52, 22), (1.3, 1.5, 3.2), OBLIQUE, (0.0, 0.0, 0.0))
    pts = _centres(img)
    balls = {"A": BALL, "L": BALL + [20, 0, 0], "P": BALL + [0, 20, 0], "S": BALL + [0, 0, 20]}
    arr = np.zeros(img.array.shape, np.float32) + 10
    for c in balls.values():
        arr[np.linalg.norm(pts - c, axis=-1) <= R_BALL] = 1000.0
    return img.with_array(arr), balls


def _blob_centres(sl) -> list[np.ndarray]:
    lab, n = ndimage.label(sl.array > 500)
    rc = ndimage.center_of_mass(sl.array > 500, lab, range(1, n + 1))
    return [pixel_to_physical(sl.geometry, np.array(c)) for c in rc]


def test_axis_aligned_slices_are_the_array_in_display_order():
    img = _grid((7, 6, 5), (2.0, 2.0, 2.0), np.eye(3), (1.0, 2.0, 3.0))
    img = img.with_array(np.arange(img.array.size, dtype=np.float32).reshape(img.array.shape))
    k, j, i = 3, 2, 4
    p = img.index_to_physical([i, j, k])
    ax = sample_slice(img, "axial", p[2])
    np.testing.assert_allclose(ax.array, img.array[k], atol=1e-3)  # rows +P, columns +L
    co = sample_slice(img, "coronal", p[1])
    np.testing.assert_allclose(co.array, img.array[::-1, j, :], atol=1e-3)  # head at the top
    sa = sample_slice(img, "sagittal", p[0])
    np.testing.assert_allclose(sa.array, img.array[::-1, :, i], atol=1e-3)  # anterior on the left
    # Default position: the volume centre along the plane's axis.
    assert sample_slice(img, "axial").position_mm == pytest.approx(3.0)


def test_oblique_slices_put_known_points_at_the_right_pixels(oblique_volume):
    img, balls = oblique_volume
    for plane, axis, other, check in (("axial", 2, "L", lambda a, b: b[1] - a[1] > 10 and abs(b[0] - a[0]) < 2),
                                      ("coronal", 1, "S", lambda a, b: a[0] - b[0] > 10 and abs(b[1] - a[1]) < 2),
                                      ("sagittal", 0, "P", lambda a, b: b[1] - a[1] > 10 and abs(b[0] - a[0]) < 2)):
        sl = sample_slice(img, plane, BALL[axis])
        assert sl.position_mm == pytest.approx(BALL[axis])
        # Every pixel of the slice lies on the plane, whatever the volume's direction.
        corners = pixel_to_physical(sl.geometry, np.array([[0, 0], [sl.array.shape[0] - 1, sl.array.shape[1] - 1]]))
        np.testing.assert_allclose(corners[:, axis], BALL[axis], atol=1e-6)
        found = _blob_centres(sl)
        for name in ("A", other):
            d = [np.linalg.norm(f - balls[name]) for f in found]
            assert min(d) < 1.0, (plane, name, d)  # the ball's centre, to well under a voxel
        # Display orientation: +L to the right (axial), +S up (coronal), +P to the right (sagittal).
        rc = {n: sl.geometry.physical_to_index(balls[n])[[1, 0]] for n in ("A", other)}
        assert check(rc["A"], rc[other]), (plane, rc)


def test_slice_to_volume_puts_slice_values_back_at_the_right_voxels(oblique_volume):
    img, balls = oblique_volume
    mask = img.with_array((img.array > 500).astype(np.uint8))
    sl = sample_slice(mask, "axial", BALL[2], label=True)
    assert sl.array.dtype == np.uint8 and sl.thickness_mm > 3.0  # one oblique voxel along S
    back = slice_to_volume(sl.array, sl, mask, label=True)
    assert back.same_geometry(mask) and back.array.dtype == np.uint8
    pts = _centres(img)
    on = back.array > 0
    # The voxel holding the ball's centre is set, and only voxels in the slab around S = 6 mm, inside
    # one of the three balls on that plane (plus half a voxel), are.
    i, j, k = np.rint(img.physical_to_index(BALL)).astype(int)
    assert on[k, j, i]
    assert np.all(np.abs(pts[on][:, 2] - BALL[2]) <= sl.thickness_mm / 2 + 1e-6)
    near = np.min([np.linalg.norm(pts[on] - balls[n], axis=-1) for n in ("A", "L", "P")], axis=0)
    assert np.all(near <= R_BALL + 2.0)
    assert on.sum() >= 10
    # A linear map: a ramp of the column index comes back as each voxel's projected column.
    ramp = np.tile(np.arange(sl.array.shape[1], dtype=np.float32), (sl.array.shape[0], 1))
    lin = slice_to_volume(ramp, sl.geometry, img)
    band = lin.array != 0
    cols = sl.geometry.physical_to_index(pts[band])[:, 0]
    np.testing.assert_allclose(lin.array[band], cols, atol=1e-3)
    with pytest.raises(ValueError):
        slice_to_volume(ramp[:, :-1], sl, img)


# ------------------------------------------------------------------------------ make-vqa

BRAIN_AXES = np.array([55.0, 65.0, 50.0])  # ellipsoid semi-axes, LPS mm, centred on the origin
STUDIES = [  # id, label, lesion centres (LPS mm), radius, hemisphere, top structure, direction
    ("t_0000", "glioma", [[28.0, -10.0, 12.0]], 11.0, "left", "Left_Middle_Frontal_Gyrus", np.eye(3)),
    ("t_0001", "meningioma", [[-30.0, 15.0, 5.0]], 9.0, "right", "Right_Angular_Gyrus", _rotation(15, 10, -20)),
    ("t_0002", "metastasis", [[-28.0, 0.0, 0.0], [30.0, 5.0, 10.0]], 7.0, "bilateral",
     "Left_Insular_Cortex", np.eye(3)),
    ("t_0003", "none", [], 0.0, "none", "", np.eye(3)),
    ("t_0004", "none", [], 0.0, "none", "", _rotation(-10, 20, 5)),
    ("t_0005", "glioma", [[-20.0, -25.0, 20.0]], 13.0, "right", "Right_Precentral_Gyrus", np.eye(3)),
]


def _write_studies(folder) -> dict[str, dict]:
    """Tiny studies at 3 mm with a manifest in the generator's columns; returns truth per study."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(exist_ok=True)
    (folder / "brain").mkdir(exist_ok=True)
    rows, truth = [], {}
    rng = np.random.default_rng(0)
    for sid, label, centres, radius, hemi, top, direction in STUDIES:
        img = _grid((42, 48, 38), (3.0, 3.0, 3.0), direction, (0.0, 0.0, 0.0))
        pts = _centres(img)
        brain = np.sum((pts / BRAIN_AXES) ** 2, axis=-1) <= 1.0
        lesion = np.zeros(brain.shape, bool)
        for c in centres:
            lesion |= np.linalg.norm(pts - np.asarray(c), axis=-1) <= radius
        lesion &= brain
        arr = np.where(brain, 500.0, 0.0) + np.where(lesion, 400.0, 0.0) + rng.normal(0, 5, brain.shape) * brain
        write_image(img.with_array(arr.astype(np.float32)), folder / f"{sid}.nii.gz")
        write_image(img.with_array(lesion.astype(np.uint8)), folder / "labels" / f"{sid}.nii.gz")
        write_image(img.with_array(brain.astype(np.uint8)), folder / "brain" / f"{sid}.nii.gz")
        vol = round(float(lesion.sum()) * 27 / 1000, 3)
        structures = [[top, 0.6]] if top else []
        if label == "metastasis":
            structures.append(["Right_Insular_Cortex", 0.4])
        rows.append(dict(study_id=sid, label=label, label_index=0, image=f"{sid}.nii.gz", mask=f"labels/{sid}.nii.gz",
                         format="nifti", top_structure=top, structures=json.dumps(structures), hemisphere=hemi,
                         volume_ml=vol, n_lesions=len(centres), size=json.dumps(list(img.size)),
                         spacing=json.dumps(list(img.spacing)), origin=json.dumps(list(img.origin)),
                         direction=json.dumps(list(img.direction)), seed=0, index=len(rows),
                         brain_mask=f"brain/{sid}.nii.gz"))
        truth[sid] = dict(label=label, volume_ml=vol, structures=structures)
    with open(folder / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return truth


@pytest.fixture(scope="module")
def vqa_set(tmp_path_factory):
    from xai_core.cli import main

    root = tmp_path_factory.mktemp("vqa")
    truth = _write_studies(root / "studies")
    assert main(["data", "make-vqa", "--data", str(root / "studies"), "--out", str(root / "a"), "--seed", "3",
                 "--workers", "1"]) == 0
    return root, truth


def _records(out) -> dict[str, list[dict]]:
    return {s: json.loads((out / f"{s}.json").read_text()) for s in ("train", "validation", "test")}


def test_make_vqa_layout_splits_and_phrasings(vqa_set):
    root, truth = vqa_set
    out = root / "a"
    recs = _records(out)
    fields = {"img_id", "img_name", "question", "answer", "answer_type", "content_type", "location", "modality",
              "q_lang", "qid", "phrasing_held_out"}
    every = [r for rs in recs.values() for r in rs]
    assert all(fields <= set(r) for r in every)
    assert len({r["qid"] for r in every}) == len(every)
    assert {r["q_lang"] for r in every} == {"en"} and {r["answer_type"] for r in every} == {"OPEN", "CLOSED"}
    # Splits by study: no study in two splits, every study somewhere.
    studies = {s: {r["study_id"] for r in rs} for s, rs in recs.items()}
    assert all(studies[s] for s in studies)
    assert not (studies["train"] & studies["validation"]) and not (studies["train"] & studies["test"])
    assert not (studies["validation"] & studies["test"])
    assert set().union(*studies.values()) == set(truth)
    # Held-out phrasings: never in train or validation; in test, every question once seen and once held out.
    held = {p for q, ps in PHRASINGS.items() for p in ps[-HELD_OUT_PER_TYPE:]}
    seen_text = {p for q, ps in PHRASINGS.items() for p in ps[:-HELD_OUT_PER_TYPE]}
    for s in ("train", "validation"):
        assert not any(r["phrasing_held_out"] for r in recs[s])
        assert not any(r["question"] in held or "{" in r["question"] for r in recs[s])
    test = recs["test"]
    assert sum(r["phrasing_held_out"] for r in test) * 2 == len(test)
    for r in test:
        assert r["phrasing_held_out"] == (r["phrasing"] >= len(PHRASINGS[r["question_type"]]) - HELD_OUT_PER_TYPE)
    assert all(len(ps) >= 4 and len(set(ps)) == len(ps) for ps in PHRASINGS.values())
    assert not held & seen_text
    # Slices in all three planes, through lesions, lesion-free slices of lesion studies, and of normal studies.
    metas = {p.parent.name: json.loads(p.read_text()) for p in (out / "imgs").glob("*/slice.json")}
    assert {m["plane"] for m in metas.values()} == {"axial", "coronal", "sagittal"}
    for plane in ("axial", "coronal", "sagittal"):
        ms = [m for m in metas.values() if m["plane"] == plane]
        assert any(m["has_lesion"] for m in ms)
        assert any(not m["has_lesion"] and m["label"] != "none" for m in ms)
        assert any(m["label"] == "none" for m in ms)
    answers = json.loads((out / "answers.json").read_text())["answers"]
    assert {r["answer"] for r in every} == set(answers)


def test_make_vqa_answers_agree_with_the_slice(vqa_set):
    from xai_core.atlas import lobe_of, readable_name
    from xai_core.io import read_image

    root, truth = vqa_set
    out = root / "a"
    recs = [r for rs in _records(out).values() for r in rs]
    checked = set()
    for r in recs:
        folder = out / "imgs" / r["img_name"].split("/")[0]
        meta = json.loads((folder / "slice.json").read_text())
        m = np.array(PILImage.open(folder / "mask.png")) > 0
        area = m.sum() * meta["spacing"][0] * meta["spacing"][1]
        present = area >= MIN_LESION_AREA_MM2
        assert area == 0 or present  # no slice with a sliver of lesion is asked about
        t = truth[r["study_id"]]
        q, a = r["question_type"], r["answer"]
        if q == "presence":
            assert a == ("yes" if present else "no")
        elif q == "normality":
            assert a == ("abnormal" if present else "normal")
        elif q == "plane":
            assert a == meta["plane"] == r["plane"]
        elif q == "kind":
            assert present and a == t["label"]
        elif q == "size":
            assert present and a == size_band(t["volume_ml"])
        elif q == "is_class":
            cls = next(c for c in ("glioma", "meningioma", "metastasis") if c in r["question"])
            assert a == ("yes" if present and cls == t["label"] else "no")
        elif q in ("side_open", "side_closed"):
            # Side from the LPS L coordinate of the lesion pixels on this slice (brain centred on L = 0).
            geom = slice_geometry_from_json(meta)
            x = pixel_to_physical(geom, np.argwhere(m).astype(float))[:, 0]
            side = "both" if x.min() < 0 < x.max() else ("left" if x.min() > 0 else "right")
            if q == "side_open":
                assert a == side
            else:
                asked = "left" if "left" in r["question"] else "right"
                assert a == ("yes" if asked == side else "no")
        elif q in ("structure", "lobe"):
            names = [n for n, _ in t["structures"]]
            expect = readable_name(meta["structure"]) if q == "structure" else lobe_of(meta["structure"])
            assert meta["structure"] in names and a == expect
        checked.add(q)
    assert checked == set(PHRASINGS)
    # source.png is the windowed slice of the study at the recorded plane and position.
    r = next(r for r in recs if r["question_type"] == "kind")
    meta = json.loads((out / "imgs" / r["img_name"].split("/")[0] / "slice.json").read_text())
    sl = sample_slice(read_image(root / "studies" / f"{r['study_id']}.nii.gz"), meta["plane"], meta["position_mm"])
    lo, hi = meta["window"]
    png = np.array(PILImage.open(out / "imgs" / r["img_name"])).astype(float)
    np.testing.assert_allclose(png, np.clip((sl.array - lo) / (hi - lo), 0, 1) * 255, atol=1.5)
    np.testing.assert_allclose(meta["origin"], sl.geometry.origin, atol=1e-3)


def test_make_vqa_is_deterministic_and_cli_errors(vqa_set, tmp_path, capsys):
    from xai_core.cli import main

    root, _ = vqa_set
    assert main(["data", "make-vqa", "--data", str(root / "studies"), "--out", str(tmp_path / "b"), "--seed", "3",
                 "--workers", "1"]) == 0
    assert _records(tmp_path / "b") == _records(root / "a")
    capsys.readouterr()  # the progress lines
    assert main(["data", "make-vqa", "--out", str(tmp_path / "c")]) == 2
    assert main(["data", "make-vqa", "--data", str(tmp_path), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("xai data make-vqa: ") for e in err)


def test_slake_loader_reads_our_output(vqa_set):
    root, _ = vqa_set
    data = load_slake(root / "a")
    raw = _records(root / "a")
    assert {s: len(v) for s, v in data.items()} == {s: len(v) for s, v in raw.items()}
    rec = data["test"][0]
    assert rec.image_path.is_file() and rec.image_path.name == "source.png"
    assert rec.answer == raw["test"][0]["answer"] and "phrasing_held_out" in rec.extra


# --------------------------------------------------------------------------- SLAKE loader

def test_slake_loader_reads_the_real_layout(tmp_path):
    for n in (0, 1):
        (tmp_path / "imgs" / f"xmlab{n}").mkdir(parents=True)
        PILImage.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "imgs" / f"xmlab{n}" / "source.jpg")
    base = dict(location="Brain", modality="MRI", base_type="vqa", content_type="Abnormality")
    train = [
        dict(img_id=0, img_name="xmlab0/source.jpg", question="Is this a normal image?", answer="No",
             answer_type="CLOSED", q_lang="en", qid=11, triple=["vhead", "_", "_"], **base),
        dict(img_id=0, img_name="xmlab0/source.jpg", question="这张图片正常吗?", answer="否",
             answer_type="CLOSED", q_lang="zh", qid=12, triple=["vhead", "_", "_"], **base),
        dict(img_id=1, img_name="xmlab1/source.jpg", question="How many lesions are there?", answer=2,
             answer_type="OPEN", q_lang="en", qid=13, triple=["vhead", "_", "_"], **base),
    ]
    (tmp_path / "train.json").write_text(json.dumps(train, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "validate.json").write_text(json.dumps([dict(train[0], qid=21, answer_type="closed")]))
    (tmp_path / "test.json").write_text(json.dumps([dict(train[2], qid=31, answer=3.5)]))
    data = load_slake(tmp_path)
    assert [r.qid for r in data["train"]] == [11, 13]  # the zh record is skipped
    assert data["train"][1].answer == "2" and data["test"][0].answer == "3.5"
    assert data["validation"][0].qid == 21 and data["validation"][0].answer_type == "CLOSED"
    r = data["train"][0]
    assert r.image_path == tmp_path / "imgs" / "xmlab0" / "source.jpg" and r.image_path.is_file()
    assert r.img_id == 0 and r.base_type == "vqa" and r.triple == ("vhead", "_", "_") and r.split == "train"
    assert len(read_split(tmp_path, "train", lang=None)) == 3
    (tmp_path / "imgs" / "xmlab1" / "source.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="xmlab1"):
        read_split(tmp_path, "test")
    (tmp_path / "validate.json").rename(tmp_path / "validation.json")
    assert len(read_split(tmp_path, "validation")) == 1
