"""Static pictures of an explanation: three orthogonal planes through the saliency peak."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .io import Image


def overlay_png(image: Image, saliency: Image, path: str | Path, title: str = "",
                mask: Image | None = None, alpha: float = 0.45) -> Path:
    """Write a PNG with the image, the heatmap over it and a colour bar, on the three voxel planes
    (k, j and i) through the saliency maximum. Pixels are drawn with the voxel aspect ratio so that
    anisotropic volumes are not distorted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, s = image.array.astype(np.float32), saliency.array.astype(np.float32)
    peak = np.unravel_index(int(np.argmax(s)), s.shape)  # (k, j, i)
    lo, hi = np.percentile(a, [1, 99.5])
    sx, sy, sz = image.spacing
    # (title, image plane, heat plane, mask plane, pixel aspect, flip rows so k (superior) is up)
    planes = [
        (f"k = {peak[0]}", a[peak[0]], s[peak[0]], None if mask is None else mask.array[peak[0]], sy / sx, False),
        (f"j = {peak[1]}", a[:, peak[1]], s[:, peak[1]], None if mask is None else mask.array[:, peak[1]], sz / sx,
         True),
        (f"i = {peak[2]}", a[:, :, peak[2]], s[:, :, peak[2]], None if mask is None else mask.array[:, :, peak[2]],
         sz / sy, True),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
    im = None
    for ax, (name, sl, hs, mk, aspect, flip) in zip(axes, planes, strict=True):
        # Rows of the j and i planes run along k; flipping puts the superior side up, as radiologists
        # expect. Rows of the k plane run along j (anterior first in LPS) and stay as they are.
        if flip:
            sl, hs = sl[::-1], hs[::-1]
            mk = None if mk is None else mk[::-1]
        ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        im = ax.imshow(np.ma.masked_less(hs, 0.05), cmap="inferno", vmin=0, vmax=1, alpha=alpha, aspect=aspect,
                       interpolation="nearest")
        if mk is not None and mk.any():
            ax.contour(mk > 0, levels=[0.5], colors="cyan", linewidths=0.8)
        ax.set_title(name)
        ax.axis("off")
    fig.colorbar(im, ax=axes, fraction=0.025, pad=0.02, label="saliency (0..1)")
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path
