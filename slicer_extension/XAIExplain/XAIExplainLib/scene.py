"""Scene logic: server results → MRML nodes (heatmap layer, editable segments) → label file for upload.

Works on any ``vtkMRMLScene`` with the Segmentations (and Volumes) module logic: the running Slicer
application passes its own (``slicer.mrmlScene``, ``slicer.modules.segmentations.logic()`` ...), the
tests pass a headless slicer-core scene (:mod:`.headless`). No Qt and no ``slicer.app`` here.

Geometry
--------
Slicer nodes place voxels with an IJK→RAS matrix; the server's files are NIfTI read and written by ITK
in LPS. Files are read and written only through Slicer's own volume storage
(``vtkMRMLVolumeArchetypeStorageNode``, ITK I/O), which converts LPS↔RAS exactly the way the Slicer
application does when a user loads the same file. :func:`ras_from_lps_geometry` spells the conversion
out (``IJKToRAS = diag(-1, -1, 1, 1) · [direction · diag(spacing) | origin]``) so tests can check
the storage path against it. Arrays are indexed ``[k, j, i]`` like ``slicer.util.arrayFromVolume``.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .report import check, explanation_title, level_segment_names, mask_segment_name

__all__ = [
    "HEAT_COLOR_NODE_NAME",
    "PLANE_TOLERANCE_DEG",
    "ExplanationNodes",
    "ObliqueSliceError",
    "SlicePosition",
    "XAIScene",
    "find_slice_node",
    "heat_rgb",
    "level_rgb",
    "lps_to_ras",
    "ras_from_lps_geometry",
    "slice_position",
]

HEAT_COLOR_NODE_NAME = "XAI Heat"
#: Inferno sampled at 0, 1/8, ..., 1: perceptually ordered, dark = low, readable over grey MR.
_HEAT_STOPS = np.array([
    (0.001, 0.000, 0.014), (0.129, 0.047, 0.291), (0.342, 0.062, 0.429), (0.541, 0.135, 0.415),
    (0.736, 0.216, 0.330), (0.894, 0.353, 0.194), (0.978, 0.558, 0.035), (0.975, 0.798, 0.206),
    (0.988, 0.998, 0.645)])
MASK_COLOR = (0.0, 0.85, 1.0)  # cyan: the editable mask must not be mistaken for a level
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def heat_rgb(t: float) -> tuple[float, float, float]:
    """Colour of saliency ``t`` (0..1) on the module's heat ramp."""
    t = float(np.clip(t, 0.0, 1.0)) * (len(_HEAT_STOPS) - 1)
    i = min(int(t), len(_HEAT_STOPS) - 2)
    c = _HEAT_STOPS[i] + (t - i) * (_HEAT_STOPS[i + 1] - _HEAT_STOPS[i])
    return float(c[0]), float(c[1]), float(c[2])


def level_rgb(level: int, n_levels: int) -> tuple[float, float, float]:
    """Colour of saliency level ``level`` of ``n_levels`` (1 = widest): along the heat ramp from dark
    red (least salient) to yellow (most salient), so the outlines read like the heatmap under them.
    The ramp starts at 0.3, not 0: the darkest heat colours vanish over a dark image."""
    return heat_rgb(0.3 + 0.7 * level / max(n_levels, 1))


def lps_to_ras(affine_lps: np.ndarray) -> np.ndarray:
    """IJK→RAS of an ITK/LPS IJK→LPS affine (4 x 4)."""
    return _LPS_TO_RAS @ np.asarray(affine_lps, dtype=float)


def ras_from_lps_geometry(spacing: Sequence[float], origin: Sequence[float],
                          direction: Sequence[float]) -> np.ndarray:
    """IJK→RAS of an ITK geometry (spacing/origin in i, j, k order; direction row-major, columns = axes)."""
    a = np.eye(4)
    a[:3, :3] = np.asarray(direction, dtype=float).reshape(3, 3) * np.asarray(spacing, dtype=float)[None, :]
    a[:3, 3] = origin
    return lps_to_ras(a)


# ----------------------------------------------------------------------------- slice views

#: Largest tilt (degrees) between a slice view's normal and a patient axis for the view to count as
#: that patient plane. 0.5 degrees moves the plane by under 0.9 mm at 100 mm from the view's centre,
#: less than a voxel of the studies the model reads; a more tilted view is a reformat that no
#: axial/coronal/sagittal slice reproduces, so it is refused rather than answered about another slice.
PLANE_TOLERANCE_DEG = 0.5
#: Patient plane held constant along each RAS axis: (plane, LPS axis name, RAS -> LPS sign). LPS is
#: RAS with the first two axes negated, so L = -R, P = -A, S = S.
_PLANE_OF_RAS_AXIS = (("sagittal", "L", -1.0), ("coronal", "P", -1.0), ("axial", "S", 1.0))


class ObliqueSliceError(ValueError):
    """A slice view that is not an axial, coronal or sagittal patient plane (a reformatted view)."""


@dataclass(frozen=True)
class SlicePosition:
    """Where a slice view is, in the terms of the server's ``vqa`` task.

    Attributes:
        plane: ``axial``, ``coronal`` or ``sagittal`` (patient planes).
        axis: the LPS axis the plane holds constant: ``S``, ``P`` or ``L``.
        slice_mm: the plane's LPS coordinate along ``axis`` (mm), taken at the view's centre.
        tilt_deg: angle between the view's normal and ``axis`` (at most :data:`PLANE_TOLERANCE_DEG`).
    """

    plane: str
    axis: str
    slice_mm: float
    tilt_deg: float = 0.0

    def describe(self) -> str:
        """"axial slice at S = 12.5 mm"."""
        return f"{self.plane} slice at {self.axis} = {self.slice_mm:.1f} mm"


def _matrix(m: Any) -> np.ndarray:
    """A 4 x 4 numpy array from a vtkMatrix4x4 or anything array-like."""
    if isinstance(m, vtk.vtkMatrix4x4):
        return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    a = np.asarray(m, dtype=float)
    if a.shape != (4, 4):
        raise ValueError(f"expected a 4 x 4 matrix, got shape {a.shape}")
    return a


def slice_position(slice_node_or_matrix: Any, tolerance_deg: float = PLANE_TOLERANCE_DEG,
                   view: str = "Red") -> SlicePosition:
    """The patient plane and LPS position of a slice view (a ``vtkMRMLSliceNode``, or its SliceToRAS).

    Read from the SliceToRAS matrix, not from the orientation preset's name or ``GetSliceOffset()``:
    the offset is measured along the view's normal, whose sign depends on the preset (Slicer 5.12's
    sagittal normal points to the patient's left, its coronal one anteriorly), and a view rotated by
    hand keeps its preset name in older scenes. Column 2 of SliceToRAS is the normal and column 3
    the view's centre in RAS; the plane's coordinate along the patient axis is read at that centre
    and converted to LPS (axial: S = S; coronal: P = -A; sagittal: L = -R).

    Raises:
        ObliqueSliceError: the normal is more than ``tolerance_deg`` off every patient axis; the
            message says how far, and how to get an axial, coronal or sagittal view back.
    """
    node = slice_node_or_matrix
    m = _matrix(node.GetSliceToRAS() if hasattr(node, "GetSliceToRAS") else node)
    normal = m[:3, 2]
    length = float(np.linalg.norm(normal))
    if not np.isfinite(length) or length < 1e-9:
        raise ObliqueSliceError(f"the {view} view's orientation matrix is degenerate (no slice normal)")
    n = normal / length
    axis = int(np.argmax(np.abs(n)))
    tilt = float(np.degrees(np.arccos(min(1.0, abs(float(n[axis]))))))
    plane, axis_name, sign = _PLANE_OF_RAS_AXIS[axis]
    if tilt > tolerance_deg:
        raise ObliqueSliceError(
            f"the {view} view is oblique: its slice is tilted {tilt:.1f}° from the nearest patient plane "
            f"({plane}). Questions are asked about axial, coronal or sagittal slices: set the {view} view's "
            "orientation to Axial, Coronal or Sagittal (slice view menu) and ask again.")
    position = sign * float(m[axis, 3])
    return SlicePosition(plane, axis_name, position + 0.0, tilt)  # + 0.0: no "-0.0 mm" in the text


def find_slice_node(scene: Any, layout_name: str = "Red") -> Any | None:
    """The slice node of view ``layout_name`` (``Red``, ``Yellow``, ``Green``); None when the scene
    has no such view (a headless scene without views)."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLSliceNode")
        if node.GetLayoutName() == layout_name:
            return node
    return None


def _vtk_matrix(m: np.ndarray) -> vtk.vtkMatrix4x4:
    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r, c]))
    return out


@dataclass
class ExplanationNodes:
    """Nodes made from one explanation result."""

    heatmap: Any | None = None  # vtkMRMLScalarVolumeNode
    segmentation: Any | None = None  # vtkMRMLSegmentationNode
    level_segment_ids: list[str] = field(default_factory=list)
    mask_segment_id: str | None = None


class XAIScene:
    """Explanation results in a scene.

    Args:
        scene: the ``vtkMRMLScene``.
        segmentations_logic: ``vtkSlicerSegmentationsModuleLogic`` attached to ``scene``.
        volumes_logic: ``vtkSlicerVolumesLogic`` (optional: files are then read with a bare storage node).
        application_logic: ``vtkMRMLApplicationLogic``; needed only for Segment Editor logic edits.
    """

    def __init__(self, scene: Any, segmentations_logic: Any, volumes_logic: Any | None = None,
                 application_logic: Any | None = None):
        self.scene = scene
        self.segmentations_logic = segmentations_logic
        self.volumes_logic = volumes_logic
        self.application_logic = application_logic
        self._editor_logic: Any | None = None
        self.keep_alive: tuple[Any, ...] = ()  # Python references to logics the caller wants kept

    # ------------------------------------------------------------------ arrays and geometry
    @staticmethod
    def ijk_to_ras(node: Any) -> np.ndarray:
        m = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(m)
        return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])

    @staticmethod
    def array(node: Any) -> np.ndarray:
        """A copy of a volume node's voxels, ``[k, j, i]``."""
        img = node.GetImageData()
        if img is None or img.GetPointData().GetScalars() is None:
            raise ValueError(f"volume {node.GetName()!r} has no voxels")
        dims = img.GetDimensions()
        return numpy_support.vtk_to_numpy(img.GetPointData().GetScalars()).reshape(dims[::-1]).copy()

    @staticmethod
    def image_data(array: np.ndarray) -> vtk.vtkImageData:
        """vtkImageData holding a ``[k, j, i]`` array (deep copy)."""
        a = np.ascontiguousarray(array)
        if a.ndim != 3:
            raise ValueError(f"expected a 3-D [k, j, i] array, got shape {a.shape}")
        img = vtk.vtkImageData()
        img.SetDimensions(a.shape[2], a.shape[1], a.shape[0])
        img.GetPointData().SetScalars(numpy_support.numpy_to_vtk(
            a.ravel(), deep=True, array_type=numpy_support.get_vtk_array_type(a.dtype)))
        return img

    def add_volume(self, array: np.ndarray, ijk_to_ras: np.ndarray, name: str, labelmap: bool = False) -> Any:
        """A new scalar (or labelmap) volume node from a ``[k, j, i]`` array and an IJK→RAS matrix."""
        cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
        node = self.scene.AddNewNodeByClass(cls, name)
        node.SetAndObserveImageData(self.image_data(array))
        node.SetIJKToRASMatrix(_vtk_matrix(np.asarray(ijk_to_ras, dtype=float)))
        node.CreateDefaultDisplayNodes()
        return node

    @staticmethod
    def same_grid(a: Any, b: Any, tol: float = 1e-4) -> bool:
        """Same voxel grid: dimensions and IJK→RAS within ``tol`` (mm)."""
        return (a.GetImageData().GetDimensions() == b.GetImageData().GetDimensions()
                and bool(np.allclose(XAIScene.ijk_to_ras(a), XAIScene.ijk_to_ras(b), atol=tol, rtol=0)))

    def content_id(self, node: Any, prefix: str = "slicer") -> str:
        """Datastore id of a volume's content: its name plus a hash of voxels, type and geometry.

        The server never replaces an image id, so an edited volume must get a new id, and an unchanged
        one the same id (no second upload, also after a Slicer restart)."""
        a = self.array(node)
        h = hashlib.sha256()
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
        h.update(np.round(self.ijk_to_ras(node), 6).tobytes())
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", node.GetName() or "").strip("._-")[:60] or "volume"
        return f"{prefix}_{safe}_{h.hexdigest()[:12]}"

    # ------------------------------------------------------------------ files
    def load_volume(self, path: str | os.PathLike, name: str, labelmap: bool = False) -> Any:
        """Read a volume file (NIfTI, NRRD ...) into a new node, as Slicer's "Add data" would."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        node = None
        if self.volumes_logic is not None:
            # Bit 0 of the loading options: load as labelmap. Centering stays off: geometry must be kept.
            node = self.volumes_logic.AddArchetypeVolume(str(path), name, 1 if labelmap else 0)
        else:
            node = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else
                                                "vtkMRMLScalarVolumeNode", name)
            storage = self.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
            storage.SetFileName(str(path))
            storage.SetSingleFile(True)  # never pull in sibling files as a series
            if not storage.ReadData(node):
                self.scene.RemoveNode(storage)
                self.scene.RemoveNode(node)
                node = None
            else:
                node.SetAndObserveStorageNodeID(storage.GetID())
                node.CreateDefaultDisplayNodes()
        if node is None or node.GetImageData() is None:
            raise OSError(f"{path}: Slicer could not read this volume file")
        return node

    def write_volume(self, node: Any, path: str | os.PathLike) -> Path:
        """Write a volume node to a file (type from the suffix, e.g. ``.nii.gz``) with a temporary storage node."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        storage = self.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        try:
            storage.SetFileName(str(path))
            storage.SetUseCompression(True)
            if not storage.WriteData(node) or not path.is_file():
                raise OSError(f"{path}: could not write volume {node.GetName()!r}")
        finally:
            self.scene.RemoveNode(storage)
        return path

    # ------------------------------------------------------------------ heatmap display
    def heat_color_node(self) -> Any:
        """The module's heat colour table (made once per scene): dark purple → yellow, 256 entries.

        Built here rather than taken from Slicer's colour files (Inferno ...), which headless builds
        do not ship; the same ramp colours the saliency level segments.
        """
        existing = self.scene.GetNodesByClassByName("vtkMRMLColorTableNode", HEAT_COLOR_NODE_NAME)
        if existing.GetNumberOfItems():
            return existing.GetItemAsObject(0)
        node = self.scene.CreateNodeByClass("vtkMRMLColorTableNode")
        node.SetName(HEAT_COLOR_NODE_NAME)
        node.SetTypeToUser()
        node.SetNumberOfColors(256)
        node.SetAttribute("Category", "XAI")
        for i in range(256):
            r, g, b = heat_rgb(i / 255.0)
            node.SetColor(i, f"{i / 255.0:.3f}", r, g, b, 1.0)
        self.scene.AddNode(node)
        node.UnRegister(None)  # CreateNodeByClass hands over a reference; the scene keeps its own
        return self.scene.GetNodesByClassByName("vtkMRMLColorTableNode", HEAT_COLOR_NODE_NAME).GetItemAsObject(0)

    def style_heatmap(self, heat_node: Any, threshold: float = 0.2) -> None:
        """Heat colours over a fixed 0..1 window (saliency is normalised: the colours mean the same on
        every map) and voxels below ``threshold`` transparent."""
        heat_node.CreateDefaultDisplayNodes()
        dn = heat_node.GetDisplayNode()
        dn.SetAndObserveColorNodeID(self.heat_color_node().GetID())
        dn.AutoWindowLevelOff()
        dn.SetWindowLevelMinMax(0.0, 1.0)
        dn.AutoThresholdOff()
        dn.SetApplyThreshold(1)
        self.set_threshold(heat_node, threshold)

    @staticmethod
    def set_threshold(heat_node: Any, threshold: float) -> None:
        dn = heat_node.GetDisplayNode()
        dn.SetLowerThreshold(float(threshold))
        dn.SetUpperThreshold(max(1.0, float(threshold)))

    def composite_nodes(self, views: Iterable[str] | None = None) -> list[Any]:
        """The slice views' composite nodes (layers), all or those of the views named (``Red`` ...)."""
        n = self.scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")
        nodes = [self.scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode") for i in range(n)]
        if views is None:
            return nodes
        wanted = set(views)
        return [c for c in nodes if c.GetLayoutName() in wanted]

    def show_heatmap(self, heat_node: Any, background: Any | None = None, opacity: float = 0.5,
                     threshold: float = 0.2, views: Iterable[str] | None = None) -> None:
        """Heatmap as the foreground layer of every slice view (or of the ``views`` named), over
        ``background`` (what ``slicer.util.setSliceViewerLayers`` does, without the application)."""
        self.style_heatmap(heat_node, threshold)
        for comp in self.composite_nodes(views):
            if background is not None:
                comp.SetBackgroundVolumeID(background.GetID())
            comp.SetForegroundVolumeID(heat_node.GetID())
            comp.SetForegroundOpacity(float(opacity))

    def set_opacity(self, opacity: float) -> None:
        for comp in self.composite_nodes():
            comp.SetForegroundOpacity(float(opacity))

    # ------------------------------------------------------------------ answers (vqa)
    def import_answer_heatmap(self, path: str | os.PathLike, reference: Any, name: str, view: str = "Red",
                              opacity: float = 0.5, threshold: float = 0.2) -> ExplanationNodes:
        """Load the heatmap of a question's answer and show it in the slice view the question was about.

        The server's file is on ``reference``'s grid and zero except on the slice asked about, so it is
        shown in that view only (``view``): the other views keep their layers (an explanation's heatmap
        shown there stays). The file is checked to lie on the input's grid like any explanation file
        (:meth:`conform_to_reference`); a file off the grid leaves no node behind.
        """
        heat = self.load_volume(path, name)
        try:
            self.conform_to_reference(heat, reference, "answer heatmap")
        except Exception:
            self.scene.RemoveNode(heat)
            raise
        self.show_heatmap(heat, reference, opacity, threshold, views=[view])
        return ExplanationNodes(heatmap=heat)

    @staticmethod
    def set_slice_to_ras(slice_node: Any, slice_to_ras: Any) -> None:
        """Put a slice view back where it was (a SliceToRAS matrix kept when the question was asked),
        so that the answer's heatmap is on screen even if the user scrolled while the server worked."""
        m = _vtk_matrix(_matrix(slice_to_ras))
        if np.allclose(_matrix(slice_node.GetSliceToRAS()), _matrix(m), atol=1e-6):
            return
        slice_node.GetSliceToRAS().DeepCopy(m)
        slice_node.UpdateMatrices()

    # ------------------------------------------------------------------ segments
    def new_segmentation(self, name: str, reference: Any) -> Any:
        """A segmentation on ``reference``'s grid, so segments stay voxel-aligned with the image."""
        seg = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        seg.CreateDefaultDisplayNodes()
        seg.SetReferenceImageGeometryParameterFromVolumeNode(reference)
        return seg

    def add_binary_segment(self, seg_node: Any, mask: np.ndarray, reference: Any, name: str,
                           color: Sequence[float]) -> str:
        """Add ``mask`` (``[k, j, i]`` on ``reference``'s grid, nonzero = inside) as one new segment.

        Each import gets its own labelmap layer, so nested or overlapping segments stay intact.
        """
        if tuple(mask.shape) != tuple(reference.GetImageData().GetDimensions()[::-1]):
            raise ValueError(f"mask shape {mask.shape} is not the reference grid "
                             f"{reference.GetImageData().GetDimensions()[::-1]}")
        tmp = self.add_volume((np.asarray(mask) != 0).astype(np.uint8), self.ijk_to_ras(reference),
                              "__xai_tmp_labelmap__", labelmap=True)
        try:
            before = set(seg_node.GetSegmentation().GetSegmentIDs())
            if not self.segmentations_logic.ImportLabelmapToSegmentationNode(tmp, seg_node, ""):
                raise RuntimeError(f"could not import segment {name!r}")
            new = [s for s in seg_node.GetSegmentation().GetSegmentIDs() if s not in before]
        finally:
            self.scene.RemoveNode(tmp)
        if not new:
            # An empty mask imports as no segment; the user still gets one to paint into.
            sid = seg_node.GetSegmentation().AddEmptySegment("", name, list(color))
        else:
            sid = new[0]
        segment = seg_node.GetSegmentation().GetSegment(sid)
        segment.SetName(name)
        segment.SetColor(*[float(c) for c in color])
        return sid

    def import_explanation(self, result: Mapping[str, Any], files: Mapping[str, str | os.PathLike],
                           reference: Any, name: str | None = None, opacity: float = 0.5,
                           threshold: float = 0.2) -> ExplanationNodes:
        """Load an explanation's files into the scene.

        ``files`` maps artifact names to local paths: ``saliency`` (float 0..1) becomes the heatmap
        layer; ``levels`` (uint8, nested, highest = most salient) becomes one segment per level
        (``levels >= n``, named by level and anatomy, coloured along the heat ramp), ``mask`` (0/1) the
        editable "Salient region" segment. ``result`` is the reply (checked against the result schema
        when segments are made). All files are checked to lie on ``reference``'s grid
        (:meth:`conform_to_reference`), so the heatmap and the segments line up with the input voxel
        for voxel.
        """
        levels = mask = None
        level_names: list[str] = []
        if "levels" in files or "mask" in files:
            # Segment names come from the reply: check it, and read the files, before any node is made,
            # so that a reply of another schema (or a file off the input grid) fails with what is wrong
            # instead of leaving half an explanation in the scene.
            check(result)
            if "levels" in files:
                levels = self._load_array(files["levels"], reference, "levels")
                level_names = level_segment_names(result, int(levels.max()))
            if "mask" in files:
                mask = self._load_array(files["mask"], reference, "mask")
        title = name or explanation_title(result)
        out = ExplanationNodes()
        if "saliency" in files:
            out.heatmap = self.load_volume(files["saliency"], f"{title} saliency")
            self.conform_to_reference(out.heatmap, reference, "saliency")
            self.show_heatmap(out.heatmap, reference, opacity, threshold)
        if levels is not None or mask is not None:
            out.segmentation = self.new_segmentation(f"{title} segments", reference)
        for n, level_name in enumerate(level_names, start=1):
            out.level_segment_ids.append(self.add_binary_segment(
                out.segmentation, levels >= n, reference, level_name, level_rgb(n, len(level_names))))
        if mask is not None:
            out.mask_segment_id = self.add_binary_segment(out.segmentation, mask > 0, reference,
                                                          mask_segment_name(result), MASK_COLOR)
        if out.segmentation is not None:
            dn = out.segmentation.GetDisplayNode()
            # Levels as outlines, the mask filled: the mask is what the user corrects.
            for sid in out.level_segment_ids:
                dn.SetSegmentOpacity2DFill(sid, 0.0)
            if out.mask_segment_id:
                dn.SetSegmentOpacity2DFill(out.mask_segment_id, 0.4)
        return out

    def _load_array(self, path: str | os.PathLike, reference: Any, what: str) -> np.ndarray:
        node = self.load_volume(path, f"__xai_{what}__", labelmap=True)
        try:
            self.conform_to_reference(node, reference, what)
            return self.array(node)
        finally:
            self.scene.RemoveNode(node)

    def conform_to_reference(self, node: Any, reference: Any, what: str = "volume") -> None:
        """Put ``node``'s voxels in ``reference``'s index order, exactly, or raise.

        A result file holds the input's grid, but Slicer's reader makes a left-handed grid right-handed
        by reversing k (same voxels in space, other index order); axis flips and permutations like that
        are undone here by reindexing, never by interpolation. Anything else (another spacing, a shift,
        a rotation) means the server changed the geometry, and every correction made on it would land on
        the wrong voxels: that raises ValueError.
        """
        if self.same_grid(node, reference):
            return
        ref_dims = reference.GetImageData().GetDimensions()  # (i, j, k)
        node_dims = node.GetImageData().GetDimensions()
        # node index -> reference index
        t = np.linalg.inv(self.ijk_to_ras(reference)) @ self.ijk_to_ras(node)
        rot, shift = t[:3, :3], t[:3, 3]
        perm = np.round(rot)
        ok = (np.abs(rot - perm).max() < 1e-4 and all(np.count_nonzero(perm[r]) == 1 for r in range(3))
              and all(np.count_nonzero(perm[:, c]) == 1 for c in range(3)))
        if ok:
            arr = self.array(node)  # [k, j, i]
            src_axis_of = [int(np.flatnonzero(perm[a])[0]) for a in range(3)]  # ref axis a <- node axis b
            signs = [int(perm[a, src_axis_of[a]]) for a in range(3)]
            for a in range(3):
                b, s = src_axis_of[a], signs[a]
                want = 0.0 if s > 0 else node_dims[b] - 1.0
                ok = ok and node_dims[b] == ref_dims[a] and abs(shift[a] - want) < 1e-3
        if not ok:
            raise ValueError(f"the server's {what} volume is not on the input image's grid (dimensions "
                             f"{node_dims} vs {ref_dims}, or IJK-to-RAS differs beyond an axis flip)")
        # numpy axes are (k, j, i) = index axes (2, 1, 0)
        out = np.transpose(arr, [2 - src_axis_of[2 - n] for n in range(3)])
        flips = tuple(n for n in range(3) if signs[2 - n] < 0)
        if flips:
            out = np.flip(out, axis=flips)
        node.SetAndObserveImageData(self.image_data(np.ascontiguousarray(out)))
        node.SetIJKToRASMatrix(_vtk_matrix(self.ijk_to_ras(reference)))

    # ------------------------------------------------------------------ editing
    def editor_logic(self) -> Any:
        """A C++ Segment Editor logic on this scene (edits with undo, as the Segment Editor does)."""
        if self._editor_logic is None:
            if self.application_logic is None:
                raise RuntimeError("Segment Editor logic needs the application logic; pass application_logic")
            logic = slicer.vtkSlicerSegmentEditorLogic()
            logic.SetMRMLApplicationLogic(self.application_logic)
            logic.SetMRMLScene(self.scene)
            logic.SetSegmentEditorNode(self.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode", "XAI editor"))
            self._editor_logic = logic
        return self._editor_logic

    def edit_segment(self, seg_node: Any, segment_id: str, modifier: np.ndarray, reference: Any,
                     mode: str = "add") -> None:
        """Paint (``add``), erase (``remove``) or replace (``set``) a segment with a ``[k, j, i]`` mask on
        ``reference``'s grid, through the Segment Editor logic (undoable with ``editor_logic().Undo()``)."""
        logic = self.editor_logic()
        modes = {"add": logic.ModificationModeAdd, "remove": logic.ModificationModeRemove,
                 "set": logic.ModificationModeSet}
        if mode not in modes:
            raise ValueError(f"mode must be one of {sorted(modes)}, got {mode!r}")
        logic.SetSegmentationNode(seg_node)
        logic.SetSourceVolumeNode(reference)
        logic.SetCurrentSegmentID(segment_id)
        tmp = self.add_volume((np.asarray(modifier) != 0).astype(np.uint8), self.ijk_to_ras(reference),
                              "__xai_tmp_modifier__", labelmap=True)
        try:
            oriented = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(tmp)
        finally:
            self.scene.RemoveNode(tmp)
        logic.SaveStateForUndo()
        logic.ModifySegmentByLabelmap(seg_node, segment_id, oriented, modes[mode], True, True)

    # ------------------------------------------------------------------ export
    def segment_array(self, seg_node: Any, segment_id: str, reference: Any) -> np.ndarray:
        """One segment as a 0/1 uint8 ``[k, j, i]`` array on ``reference``'s grid."""
        node = self.export_label(seg_node, [segment_id], reference, name="__xai_export__")
        try:
            return self.array(node)
        finally:
            self.scene.RemoveNode(node)

    def export_label(self, seg_node: Any, segment_ids: Iterable[str], reference: Any,
                     name: str = "XAI corrected label") -> Any:
        """The union of ``segment_ids`` as a 0/1 uint8 labelmap node on ``reference``'s grid.

        Segments are exported one at a time and merged: Slicer's multi-segment export writes later
        segments over earlier ones with distinct values, which would turn nested levels into rings.
        """
        ids = list(segment_ids)
        if not ids:
            raise ValueError("no segment chosen to export")
        union = None
        for sid in ids:
            if seg_node.GetSegmentation().GetSegment(sid) is None:
                raise KeyError(f"segmentation {seg_node.GetName()!r} has no segment {sid!r}")
            tmp = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__xai_tmp_export__")
            try:
                arr_ids = vtk.vtkStringArray()
                arr_ids.InsertNextValue(sid)
                if not self.segmentations_logic.ExportSegmentsToLabelmapNode(seg_node, arr_ids, tmp, reference):
                    raise RuntimeError(f"could not export segment {sid!r}")
                a = self.array(tmp) != 0
            finally:
                self.scene.RemoveNode(tmp)
            union = a if union is None else union | a
        return self.add_volume(union.astype(np.uint8), self.ijk_to_ras(reference), name, labelmap=True)
