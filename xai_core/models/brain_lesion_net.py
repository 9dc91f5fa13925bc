"""``BrainLesionNet``: a small dual-output (classification + segmentation) network from MONAI blocks.

Shapes (3-D, default channels ``(8, 16, 32, 64)``, input ``(B, 1, 64, 64, 64)``)::

    stem    Convolution             (B,  8, 64, 64, 64)
    down1   ResidualUnit stride 2   (B, 16, 32, 32, 32)
    down2   ResidualUnit stride 2   (B, 32, 16, 16, 16)
    encoder_out  ResidualUnit dil 2 (B, 64, 16, 16, 16)   <- last encoder stage, default CAM layer
                 (lesion_gate=True: encoder_body is the ResidualUnit, encoder_out = its output times the
                 lesion probability of encoder_seg, see LesionGate)
    classifier   avg+max pool, linear  -> class logits (B, num_classes)
    encoder_seg  1x1 conv (lesion_gate only) -> coarse lesion logits (B, 2, 16, 16, 16)
    dec2 (16^3) -> up -> dec1 (32^3) -> up -> 1x1 head with stem features
                                    -> segmentation logits (B, seg_channels, 64, 64, 64)

The last encoder stage ends in a ReLU and keeps 1/4 resolution (dilated instead of strided) so that class activation
maps have 16^3 cells on the model grid (12 mm at 3 mm spacing), fine enough for lesion masks.
Works for ``spatial_dims`` 2 or 3 (MONAI convention, channel-first).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from monai.networks.blocks import Convolution, ResidualUnit, UpSample
from torch import nn


class LesionOutput(NamedTuple):
    class_logits: torch.Tensor  # (B, num_classes)
    seg_logits: torch.Tensor  # (B, seg_channels, *spatial)
    # (B, seg_channels, *spatial / 4): the lesion gate's coarse map (None without the gate)
    encoder_seg_logits: torch.Tensor | None = None


class BrainLesionNet(nn.Module):
    default_cam_layer = "encoder_out"

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, num_classes: int = 4,
                 seg_channels: int = 2, channels: tuple[int, int, int, int] = (8, 16, 32, 64),
                 norm: str = "BATCH", act: str | tuple = ("LEAKYRELU", {"negative_slope": 0.01}),
                 dropout: float = 0.1, lesion_gate: bool = False, gate_floor: float = 0.1):
        super().__init__()
        c0, c1, c2, c3 = channels
        sd = spatial_dims
        self.spatial_dims = spatial_dims
        self.num_classes = num_classes
        # Full resolution gets one convolution only: it dominates the cost of a 64^3 volume.
        self.stem = Convolution(sd, in_channels, c0, norm=norm, act=act)
        self.down1 = ResidualUnit(sd, c0, c1, strides=2, norm=norm, act=act)
        self.down2 = ResidualUnit(sd, c1, c2, strides=2, norm=norm, act=act)
        # Post-activation ReLU: CAM methods (Grad-CAM++ above all) assume non-negative activations,
        # and a residual sum alone can go negative.
        body = nn.Sequential(
            ResidualUnit(sd, c2, c3, strides=1, norm=norm, act=act, dilation=2, subunits=1), nn.ReLU())
        self.lesion_gate = lesion_gate
        if lesion_gate:
            self.encoder_body = body
            self.encoder_out = LesionGate(gate_floor)
        else:
            self.encoder_out = body
        pool = nn.AdaptiveAvgPool3d(1) if sd == 3 else nn.AdaptiveAvgPool2d(1)
        mpool = nn.AdaptiveMaxPool3d(1) if sd == 3 else nn.AdaptiveMaxPool2d(1)
        self.avg_pool, self.max_pool = pool, mpool
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * c3, num_classes))
        self.dec2 = Convolution(sd, c3 + c2, c1, norm=norm, act=act)
        self.up1 = UpSample(sd, scale_factor=2, mode="nontrainable", interp_mode="linear" if sd == 1 else
                            ("trilinear" if sd == 3 else "bilinear"))
        self.dec1 = Convolution(sd, 2 * c1, c0, norm=norm, act=act)
        self.up0 = UpSample(sd, scale_factor=2, mode="nontrainable", interp_mode="trilinear" if sd == 3
                            else "bilinear")
        self.seg_head = nn.Sequential(Convolution(sd, 2 * c0, c0, kernel_size=1, norm=norm, act=act),
                                      Convolution(sd, c0, seg_channels, kernel_size=1, conv_only=True))
        # The gate's coarse lesion map, trained against the ground truth (deep supervision). Without
        # it the skip connections let the decoder localise alone, and the stage CAM methods read
        # carries lesion evidence smeared over the volume.
        self.encoder_seg = (Convolution(sd, c3, seg_channels, kernel_size=1, conv_only=True)
                            if lesion_gate else None)

    @property
    def cascade_order(self) -> list[str]:
        """Modules on the path to the class logits, output first (cascading randomisation)."""
        if self.lesion_gate:
            return ["classifier", "encoder_seg", "encoder_body", "down2", "down1", "stem"]
        return ["classifier", "encoder_out", "down2", "down1", "stem"]

    def _tail(self, e2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """From the ``down2`` output to ``(class logits, ungated last-stage features, lesion logits)``."""
        if self.lesion_gate:
            h = self.encoder_body(e2)
            lesion = self.encoder_seg(h)
            e3 = self.encoder_out(h, lesion)
        else:
            h = e3 = self.encoder_out(e2)
            lesion = None
        pooled = torch.cat([self.avg_pool(e3).flatten(1), self.max_pool(e3).flatten(1)], dim=1)
        return self.classifier(pooled), h, lesion

    # Encoder stages whose output forward_from can continue from.
    sequential_stages = ("stem", "down1", "down2")

    def forward_from(self, layer: str, h: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)`` from the output ``h`` of encoder stage ``layer`` (one of
        :attr:`sequential_stages`): the rest of the class path, without recomputing the stages
        before it. Path methods that attribute at an early layer call this for every step."""
        stages = self.sequential_stages
        if layer not in stages:
            raise ValueError(f"forward_from continues from {stages}, not {layer!r}")
        for name in stages[stages.index(layer) + 1:]:
            h = getattr(self, name)(h)
        return self._tail(h)[0]

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)`` only: the encoder and classifier, no decoder (about half
        the cost of :meth:`forward`; what black-box and path methods call)."""
        return self.forward_from("stem", self.stem(x))

    def forward(self, x: torch.Tensor) -> LesionOutput:
        e0 = self.stem(x)
        e1 = self.down1(e0)
        e2 = self.down2(e1)
        logits, h, lesion = self._tail(e2)
        # The decoder reads the ungated features: segmentation keeps the whole context.
        d2 = self.dec2(torch.cat([h, e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        seg = self.seg_head(torch.cat([self.up0(d1), e0], dim=1))
        return LesionOutput(logits, seg, lesion)


class LesionGate(nn.Module):
    """``features (B, C, *S) * (floor + (1 - floor) * p_lesion (B, 1, *S))``, with ``p_lesion`` the
    softmax lesion probability of the coarse lesion logits ``(B, 2, *S)``: the classifier sees evidence
    inside the lesion map at full weight and elsewhere at ``floor`` (as in attention branch networks,
    Fukui et al., CVPR 2019). Its output is the default CAM layer, so class activation maps are
    concentrated where the model found a lesion. The floor keeps a gradient flowing to the features
    everywhere: without it the stage died during training (classification loss back to ln 4)."""

    def __init__(self, floor: float = 0.1):
        super().__init__()
        self.floor = floor

    def forward(self, features: torch.Tensor, lesion_logits: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(lesion_logits, dim=1)[:, 1:]
        return features * (self.floor + (1.0 - self.floor) * p)


class ClassLogits(nn.Module):
    """View of a multi-output model that returns only its class logits ``(B, num_classes)``.

    Explainers (captum, MONAI CAM) need a forward that returns one tensor; this shares the
    wrapped model's parameters and hooks.
    """

    def __init__(self, model: nn.Module, index: int = 0):
        super().__init__()
        self.model = model
        self.index = index
        inner = getattr(model, "default_cam_layer", None)
        if inner:
            self.default_cam_layer = f"model.{inner}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out[self.index] if isinstance(out, tuple | list) else out
