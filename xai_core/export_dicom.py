"""DICOM out: the explanation as objects a hospital archive takes (highdicom 0.22).

When the input is a DICOM series, :func:`write_dicom_outputs` writes beside the NIfTI files:

* ``mask.seg.dcm``: DICOM Segmentation of the adaptive explanation mask (one segment);
* ``levels.seg.dcm``: DICOM Segmentation of the nested saliency levels (one segment per level,
  segment ``n`` = top ``p_n`` % of brain voxels, overlapping);
* ``saliency.pm.dcm``: DICOM Parametric Map of the 0..1 display saliency, float32, with a real-world
  value mapping whose quantity is the method's DICOM CID 217 concept.

:func:`export_label` writes a corrected label from the viewer the same way (``xai export-seg``).

What viewers need (highdicom's advice and dcmqi's reader, see docs/dicom.md): BINARY segmentation,
uncompressed (Explicit VR Little Endian), one frame per source image and segment (empty frames
kept), frame ``i`` of a segment derived from source image ``i`` with its position, and a non-empty
derivation image sequence per frame. The source datasets are re-read from the series folder and
ordered along the slice normal, the order in which :func:`xai_core.io.read_image` stacks them;
:func:`source_series` then checks that the image lies on exactly that grid (positions to 1e-3 mm,
orientation to 1e-4), so a frame can never be put on the wrong slice.

Codes come from :mod:`xai_core.codes` only.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from . import __version__
from . import codes as C
from .io import Image

if TYPE_CHECKING:
    import pydicom

    from .pipeline import Explanation
    from .registration import RegistrationResult
    from .settings import Settings

__all__ = ["Segment", "AlgorithmInfo", "source_series", "write_seg", "write_parametric_map",
           "write_dicom_outputs", "export_label", "algorithm_of", "SERIES_NUMBERS"]

# Series numbers of the derived objects (the source's own number is usually small).
SERIES_NUMBERS = {"mask": 901, "levels": 902, "saliency": 903, "label": 904}
POSITION_TOL_MM = 1e-3  # DS strings hold 16 characters: positions survive to ~1e-10 mm
ORIENTATION_TOL = 1e-4


@dataclass(frozen=True)
class Segment:
    """One segment of a SEG: the voxels with ``min_value <= value <= max_value`` (no upper bound
    when ``max_value`` is None), so nested levels are ``Segment(..., min_value=n)`` and a label value
    ``n`` alone is ``Segment(..., min_value=n, max_value=n)``.

    Attributes:
        label: Segment Label (at most 64 characters, ASCII).
        coding: the segment's codes (:func:`xai_core.codes.segment_coding`).
        min_value, max_value: the voxel values inside.
        description: Segment Description (optional, at most 64 characters).
    """

    label: str
    coding: C.SegmentCoding
    min_value: int = 1
    max_value: int | None = None
    description: str | None = None

    def select(self, array: np.ndarray) -> np.ndarray:
        inside = array >= self.min_value
        return inside & (array <= self.max_value) if self.max_value is not None else inside


@dataclass(frozen=True)
class AlgorithmInfo:
    """What made the object, for Algorithm Identification and the equipment fields.

    Attributes:
        name: algorithm name (the explanation method, e.g. ``gradcam++``).
        version: the model's version.
        model: the model's name (Manufacturer's Model Name).
        weights_sha256: the model weights' digest (its first 16 hex digits become the Device
            Serial Number: the "device" that made the object is the model).
        parameters: recorded as Algorithm Parameters (values as text).
        kind: Segment Algorithm Type: ``AUTOMATIC`` for the model's output, ``SEMIAUTOMATIC`` for a
            label a reader corrected.
    """

    name: str
    version: str
    model: str
    weights_sha256: str = ""
    parameters: dict[str, str] = field(default_factory=dict)
    kind: Literal["AUTOMATIC", "SEMIAUTOMATIC", "MANUAL"] = "AUTOMATIC"

    def sequence(self):
        import highdicom as hd

        return hd.AlgorithmIdentificationSequence(
            name=_lo(self.name), family=C.ARTIFICIAL_INTELLIGENCE.to_highdicom(), version=_lo(self.version),
            source=_lo(f"xai_core {__version__}, model {self.model}"),
            parameters={k: _lo(str(v)) for k, v in self.parameters.items()} or None)

    def equipment(self) -> dict[str, str]:
        return {"manufacturer": "xai_core", "manufacturer_model_name": _lo(f"{self.model} {self.version}"),
                "software_versions": f"xai_core {__version__}",
                "device_serial_number": self.weights_sha256[:16] or "unknown"}


def _lo(text: str, n: int = 64) -> str:
    """A DICOM LO value: ASCII (no Specific Character Set is needed), at most ``n`` characters, cut
    at a word boundary when it is longer (a segment label ending in half a word reads as a typo)."""
    text = text.encode("ascii", "replace").decode("ascii")
    if len(text) <= n:
        return text
    head = text[:n + 1]
    cut = head.rsplit(" ", 1)[0].rstrip(" -") if " " in head else ""
    return cut if len(cut) >= n // 2 else text[:n]  # a first word that long: cut it instead


# --- the source series -------------------------------------------------------------------------


def _normal(ds) -> np.ndarray:
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=float)
    return np.cross(iop[:3], iop[3:])


def _read_series(folder: Path) -> list[pydicom.Dataset]:
    """Headers of the largest image series in ``folder`` (the series :func:`xai_core.io.read_image`
    reads), ordered by position along the slice normal (row x column direction)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    series: dict[str, list] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.upper() == "DICOMDIR":
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue  # not DICOM (a README, a NIfTI beside it); io.read_image refuses broken DICOM itself
        if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds and "SeriesInstanceUID" in ds:
            series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    if not series:
        raise ValueError(f"{folder}: holds no DICOM image series with patient positions")
    datasets = max(series.values(), key=len)
    normal = _normal(datasets[0])
    return sorted(datasets, key=lambda ds: float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)))


def source_series(source: str | os.PathLike | Sequence[pydicom.Dataset], image: Image | None = None
                  ) -> list[pydicom.Dataset]:
    """The source series' datasets in slice order (slice ``k`` of ``image`` is dataset ``k``).

    Args:
        source: the series folder (headers are read with pydicom, no pixel data), or datasets.
        image: when given, checked to lie on the series' grid: size, slice positions and orientation.

    Raises:
        ValueError: no series, or ``image`` is not on the series' grid (resampled, another series).
    """
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.is_dir():
            raise ValueError(f"{folder}: DICOM output needs the source series folder")
        datasets = _read_series(folder)
    else:
        datasets = list(source)
        normal = _normal(datasets[0])
        datasets.sort(key=lambda ds: float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)))
    if image is not None:
        _check_grid(image, datasets)
    return datasets


def _check_grid(image: Image, datasets: Sequence[pydicom.Dataset]) -> None:
    if image.ndim != 3:
        raise ValueError(f"DICOM output needs a 3-D image, got {image.ndim}-D")
    ni, nj, nk = image.size
    if len(datasets) != nk or any((int(ds.Rows), int(ds.Columns)) != (nj, ni) for ds in datasets):
        raise ValueError(f"the image ({ni} x {nj} x {nk}) is not on the source series' grid "
                         f"({int(datasets[0].Columns)} x {int(datasets[0].Rows)} x {len(datasets)})")
    d = image.direction_matrix
    iop = np.asarray([float(v) for v in datasets[0].ImageOrientationPatient])
    if np.abs(iop - np.concatenate([d[:, 0], d[:, 1]])).max() > ORIENTATION_TOL:
        raise ValueError("the image's orientation differs from the source series' Image Orientation (Patient)")
    want = image.index_to_physical(np.stack([np.zeros(nk), np.zeros(nk), np.arange(nk)], axis=1))
    have = np.asarray([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    err = float(np.abs(want - have).max())
    if err > POSITION_TOL_MM:
        raise ValueError(f"the image's slices are not at the source series' positions (off by up to {err:.3g} mm)")


# --- writers -----------------------------------------------------------------------------------


def _save(ds, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        ds.save_as(tmp, write_like_original=False)
        os.replace(tmp, out)  # atomic: a reader never sees half an object
    finally:
        tmp.unlink(missing_ok=True)
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """highdicom warns about every single-component person name it copies from the source
    ("Anonymous" in generated series); the name is copied unchanged either way."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name.*")
        yield


def write_seg(image: Image, source: str | os.PathLike | Sequence[pydicom.Dataset], out: str | os.PathLike, *,
              segments: Sequence[Segment], algorithm: AlgorithmInfo, series_number: int = SERIES_NUMBERS["mask"],
              series_description: str = "XAI segmentation", content_label: str = "XAI",
              content_description: str | None = None) -> Path:
    """Write a DICOM SEG (BINARY, uncompressed) of ``image`` (a mask or a label/level map on the
    source grid) with one segment per entry of ``segments``, frame-aligned with the source series.

    Args:
        image: integer-valued volume on the source series' grid (``source_series`` checks it).
        source: the series folder or its datasets.
        out: the file to write (e.g. ``mask.seg.dcm``).
        segments: what each segment holds and how it is coded (segment numbers 1, 2, ... in order).
        algorithm: Algorithm Identification (family "Artificial Intelligence") and equipment fields.
        series_number, series_description, content_label, content_description: the new series'
            identification (Content Label: upper case, at most 16 characters).

    Returns:
        ``out``.
    """
    import highdicom as hd

    if not segments:
        raise ValueError("a SEG needs at least one segment")
    datasets = source_series(source, image)
    a = np.asarray(image.array)
    if not np.issubdtype(a.dtype, np.integer) and not np.array_equal(a, np.round(a)):
        raise ValueError("a SEG is written from a mask or label map (integer values), not a float map")
    algo = algorithm.sequence()
    descriptions = []
    for n, seg in enumerate(segments, start=1):
        c = seg.coding
        desc = hd.seg.SegmentDescription(
            segment_number=n, segment_label=_lo(seg.label), segmented_property_category=c.category.to_highdicom(),
            segmented_property_type=c.type.to_highdicom(), algorithm_type=algorithm.kind,
            algorithm_identification=algo,
            anatomic_regions=[c.anatomic_region.to_highdicom()] if c.anatomic_region is not None else None)
        if c.anatomic_region is not None and c.laterality is not None:
            desc.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [c.laterality.to_highdicom()]
        if seg.description:
            desc.SegmentDescription = _lo(seg.description)
        descriptions.append(desc)
    # (frames, rows, columns, segments): frame k is source image k; segments may overlap (levels).
    pixels = np.stack([s.select(a) for s in segments], axis=-1).astype(np.uint8)
    with _quiet():
        obj = hd.seg.Segmentation(
            source_images=datasets, pixel_array=pixels if len(segments) > 1 else pixels[..., 0],
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
            series_instance_uid=hd.UID(), series_number=series_number, sop_instance_uid=hd.UID(),
            instance_number=1, **algorithm.equipment(), omit_empty_frames=False,
            content_label=_lo(content_label.upper().replace(" ", "_"), 16),
            content_description=_lo(content_description) if content_description else None,
            series_description=_lo(series_description))
    return _save(obj, Path(out))


def write_parametric_map(saliency: Image, source: str | os.PathLike | Sequence[pydicom.Dataset],
                         out: str | os.PathLike, method: str, *, algorithm: AlgorithmInfo | None = None,
                         target: str | None = None, series_number: int = SERIES_NUMBERS["saliency"]) -> Path:
    """Write the float32 saliency map as a DICOM Parametric Map, frame-aligned with the source
    series, with a real-world value mapping (identity, 0..1, no units) whose quantity is the CID 217
    concept of ``method`` (:func:`xai_core.codes.method_code`).

    Args:
        saliency: 0..1 map on the source series' grid.
        source: the series folder or its datasets.
        out: the file to write (e.g. ``saliency.pm.dcm``).
        method: the explanation method's registry name.
        algorithm: equipment fields (default: the method with an unknown model).
        target: the explained class, for the descriptions.
        series_number: the new series' number.
    """
    import highdicom as hd

    quantity = C.method_code(method)
    datasets = source_series(source, saliency)
    a = np.asarray(saliency.array, dtype=np.float32)
    if not np.isfinite(a).all():
        raise ValueError("the saliency map holds NaN or infinite values")
    lo, hi = float(min(a.min(), 0.0)), float(max(a.max(), 1.0))
    what = f"{method} saliency" + (f" for {target}" if target else "")
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="SALIENCY", lut_explanation=_lo(f"{what}, 0..1, 1 = most important"),
        unit=hd.sr.CodedConcept(C.NO_UNITS.value, C.NO_UNITS.scheme, C.NO_UNITS.meaning),
        value_range=(lo, hi), slope=1.0, intercept=0.0, quantity_definition=quantity.to_highdicom())
    algorithm = algorithm or AlgorithmInfo(name=method, version="unknown", model="unknown")
    with _quiet():
        obj = hd.pm.ParametricMap(
            source_images=datasets, pixel_array=a, series_instance_uid=hd.UID(), series_number=series_number,
            sop_instance_uid=hd.UID(), instance_number=1, **algorithm.equipment(),
            contains_recognizable_visual_features=False, real_world_value_mappings=[mapping],
            window_center=0.5, window_width=1.0, content_label="SALIENCY",
            content_description=_lo(what), series_description=_lo(f"XAI {what}"))
    return _save(obj, Path(out))


# --- from an explanation -----------------------------------------------------------------------


def algorithm_of(exp: Explanation) -> AlgorithmInfo:
    """Algorithm identification of an explanation: method, model, version and the parameters."""
    card = exp.model_card
    params = {"method": exp.method, "target": ",".join(exp.targets), "model": str(card.get("name", "")),
              **{k: json.dumps(v) if not isinstance(v, str) else v for k, v in exp.params.items()
                 if k not in ("target", "target_classes")}}
    return AlgorithmInfo(name=exp.method, version=str(card.get("version", "unknown")),
                         model=str(card.get("name", "unknown")), weights_sha256=str(card.get("weights_sha256", "")),
                         parameters=params)


def _findings_dict(findings: Mapping[str, Any] | str | os.PathLike | None) -> Mapping[str, Any] | None:
    if findings is None or isinstance(findings, Mapping):
        return findings
    return json.loads(Path(findings).read_text())


def _region_name(name: str | None) -> str:
    from .atlas import readable_name

    return f" - {readable_name(name)}" if name else ""


def write_dicom_outputs(exp: Explanation, source: str | os.PathLike | Sequence[pydicom.Dataset] | None,
                        out: str | os.PathLike, *, findings: Mapping[str, Any] | str | os.PathLike | None = None,
                        registration: RegistrationResult | None = None, anatomy: bool = True,
                        settings: Settings | None = None) -> dict[str, Path]:
    """Write ``mask.seg.dcm``, ``levels.seg.dcm`` and ``saliency.pm.dcm`` for an explanation of a
    DICOM series into ``out``.

    Anatomy (the segments' anatomic region) comes from ``findings`` (the dict of
    :func:`~xai_core.findings.build_findings`, or the path of ``findings.json``): the top structure
    for the mask, each level's own top structure when the findings label the levels. Without
    findings the mask is labelled here with ``registration`` (registering the image when that is
    None too, a few seconds); ``anatomy=False`` skips that and codes the region as the brain.

    Args:
        exp: the explanation (its image must be the series as read by :func:`xai_core.io.read_image`).
        source: the series folder (default: ``exp.image.source``) or its datasets.
        out: output folder.
        findings, registration, anatomy, settings: see above.

    Returns:
        ``{"mask_seg": ..., "levels_seg": ..., "saliency_pm": ...}`` paths.
    """
    if source is None:
        source = exp.image.source
        if source is None or not Path(source).is_dir():
            raise ValueError("the explanation's image was not read from a DICOM series folder; pass source")
    datasets = source_series(source, exp.image)  # read and checked once for all three objects
    out = Path(out)
    f = _findings_dict(findings)
    top: str | None = None
    level_tops: dict[int, str | None] = {}
    if f is not None:
        top = (f.get("location") or {}).get("top_structure")
        level_tops = {int(lv["level"]): lv.get("top_structure") for lv in f.get("levels") or []}
    elif anatomy and exp.mask.mask.any():
        from .atlas import label_region
        from .registration import register_to_mni

        reg = registration if registration is not None else register_to_mni(exp.image, settings=settings)
        top = label_region(exp.mask_image(), reg, settings=settings).top_structure

    algo = algorithm_of(exp)
    target = exp.targets[0]
    title = (exp.title or exp.method).split(" (")[0]  # "Grad-CAM++", without the reference in brackets
    files = {}
    files["mask_seg"] = write_seg(
        exp.mask_image(), datasets, out / "mask.seg.dcm", algorithm=algo, series_number=SERIES_NUMBERS["mask"],
        segments=[Segment(label=f"{title} mask{_region_name(top)}",
                          coding=C.segment_coding(target, exp.method, top),
                          description=f"adaptive saliency mask for {target}")],
        series_description=f"XAI {exp.method} mask for {target}", content_label="MASK",
        content_description=f"{exp.method} explanation mask for {target}")
    percents = sorted(exp.mask.level_thresholds, reverse=True)  # level n = top percents[n-1] %
    level_segments = []
    for n, pct in enumerate(percents, start=1):
        where = level_tops.get(n, top)
        level_segments.append(Segment(label=f"Saliency top {pct:g} %{_region_name(where)}",
                                      coding=C.segment_coding(target, exp.method, where), min_value=n,
                                      description=f"top {pct:g} % of brain voxels of the {exp.method} map"))
    if level_segments:
        files["levels_seg"] = write_seg(
            exp.levels_image(), datasets, out / "levels.seg.dcm", algorithm=algo, segments=level_segments,
            series_number=SERIES_NUMBERS["levels"], series_description=f"XAI {exp.method} levels for {target}",
            content_label="LEVELS", content_description=f"nested {exp.method} saliency levels for {target}")
    files["saliency_pm"] = write_parametric_map(exp.primary, datasets, out / "saliency.pm.dcm", exp.method,
                                                algorithm=algo, target=target)
    return files


def export_label(label: Image, source: str | os.PathLike | Sequence[pydicom.Dataset], out: str | os.PathLike, *,
                 label_class: str, method: str, model: str = "brain-lesion-3d", model_version: str = "unknown",
                 weights_sha256: str = "", structure: str | None = None, corrected: bool = True,
                 parameters: Mapping[str, str] | None = None) -> Path:
    """Write a label (a corrected saliency mask from the viewer, or any label map on the source
    grid) as a DICOM SEG: one segment per distinct non-zero value.

    Args:
        label: integer label map on the source series' grid (0 = background).
        source: the series folder or its datasets.
        out: the file to write.
        label_class: the class the label shows (codes the segment type), e.g. ``glioma``.
        method: the explanation method whose mask was corrected (algorithm name; codes the type for
            class ``none``).
        model, model_version, weights_sha256: the model behind it.
        structure: Harvard-Oxford name of the anatomic region (e.g. the findings' top structure).
        corrected: a reader edited it (Segment Algorithm Type SEMIAUTOMATIC) rather than the model
            alone (AUTOMATIC).
        parameters: more provenance (user, time, result id), recorded as algorithm parameters.
    """
    a = np.asarray(label.array)
    if not np.array_equal(a, np.round(a)) or (a < 0).any():
        raise ValueError("a label map holds non-negative integers")
    values = [int(v) for v in np.unique(a) if v > 0] or [1]  # an all-zero label is one empty segment
    coding = C.segment_coding(label_class, method, structure)
    what = "corrected saliency mask" if corrected else "saliency mask"
    segments = [Segment(label=f"{what.capitalize()}{_region_name(structure)}" if len(values) == 1
                        else f"Label {v}{_region_name(structure)}",
                        coding=coding, min_value=v, max_value=v, description=f"{what} for {label_class} ({method})")
                for v in values]
    algo = AlgorithmInfo(name=method, version=model_version, model=model, weights_sha256=weights_sha256,
                         parameters={"method": method, "target": label_class, "model": model,
                                     **({"provenance": "corrected saliency"} if corrected else {}),
                                     **{k: str(v) for k, v in (parameters or {}).items()}},
                         kind="SEMIAUTOMATIC" if corrected else "AUTOMATIC")
    return write_seg(label.with_array(a.astype(np.uint8 if a.max() < 256 else np.uint16)), source, out,
                     segments=segments, algorithm=algo, series_number=SERIES_NUMBERS["label"],
                     series_description=f"XAI {what} for {label_class}", content_label="LABEL",
                     content_description=f"{what} for {label_class} ({method})")
