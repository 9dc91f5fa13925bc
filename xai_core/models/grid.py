"""The model grid: where every model sees its input, and how outputs return to the input grid.

The model grid is an axis-aligned LPS cube of ``size^3`` voxels at ``spacing`` mm, centred on the
physical centre of the input volume. Any input geometry (oblique, anisotropic, DICOM) maps onto it
by one linear resampling with the identity transform, and model outputs map back the same way, so
physical positions are kept exactly and nothing assumes MNI space.

Tensor layout on the model grid: ``(B, C, K, J, I)``, the ``[k, j, i]`` array order of
:mod:`xai_core.io` with batch and channel in front.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from ..io import Image

_INTERP = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}


@dataclass(frozen=True)
class ModelGrid:
    size: int = 64
    spacing: float = 3.0

    def reference_for(self, image: Image) -> sitk.Image:
        """The model-grid reference image (geometry only) for ``image``."""
        centre_index = (np.asarray(image.size, float) - 1) / 2.0
        centre = image.index_to_physical(centre_index)
        half = self.spacing * (self.size - 1) / 2.0
        ref = sitk.Image([self.size] * 3, sitk.sitkFloat32)
        ref.SetSpacing([self.spacing] * 3)
        ref.SetOrigin((centre - half).tolist())
        return ref

    def to_model(self, image: Image, interpolator: str = "linear") -> tuple[np.ndarray, sitk.Image]:
        """Resample ``image`` onto its model grid. Returns the float32 ``[k, j, i]`` array and grid."""
        ref = self.reference_for(image)
        out = sitk.Resample(image.to_sitk(), ref, sitk.Transform(), _INTERP[interpolator], 0.0, sitk.sitkFloat32)
        return sitk.GetArrayFromImage(out), ref

    @staticmethod
    def to_input(array: np.ndarray, ref: sitk.Image, image: Image, interpolator: str = "linear",
                 default: float = 0.0) -> np.ndarray:
        """Resample a model-grid ``[k, j, i]`` array back onto ``image``'s grid (float32)."""
        src = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
        src.CopyInformation(ref)
        out = sitk.Resample(src, image.reference(), sitk.Transform(), _INTERP[interpolator],
                            float(default), sitk.sitkFloat32)
        return sitk.GetArrayFromImage(out)


def normalise_intensity(array: np.ndarray) -> np.ndarray:
    """Scale an MR volume so that its bright tissue is near 1: divide by the 99.5th percentile of
    the foreground (voxels above 5 % of the maximum), then clip to [0, 2]."""
    a = np.asarray(array, dtype=np.float32)
    a = a - min(0.0, float(a.min()))
    fg = a[a > 0.05 * float(a.max())]
    scale = float(np.percentile(fg, 99.5)) if fg.size else float(a.max())
    return np.clip(a / max(scale, 1e-6), 0.0, 2.0).astype(np.float32)


def to_tensor(array: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[k, j, i]`` array -> ``(1, 1, K, J, I)`` float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None].to(device)
