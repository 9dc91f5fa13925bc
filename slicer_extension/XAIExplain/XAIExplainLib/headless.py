"""A scene with the module logics the Slicer application would provide, for slicer-core (no Qt).

Used by the tests and by batch scripts; inside Slicer, :class:`~.scene.XAIScene` gets the
application's own scene and logics instead.
"""

from __future__ import annotations

import slicer

from .scene import XAIScene

__all__ = ["headless_scene"]


def headless_scene() -> XAIScene:
    """A fresh ``vtkMRMLScene`` with application, colour, volumes and segmentations logics attached,
    plus the three slice composite nodes (Red, Yellow, Green) the views would create."""
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLApplicationLogic(app)
    colors.SetMRMLScene(scene)
    app.SetColorLogic(colors)
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLApplicationLogic(app)
    volumes.SetMRMLScene(scene)
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLApplicationLogic(app)
    segmentations.SetMRMLScene(scene)
    app.SetModuleLogic("Volumes", volumes)
    app.SetModuleLogic("Segmentations", segmentations)
    app.SetModuleLogic("Colors", colors)
    for view in ("Red", "Yellow", "Green"):
        comp = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        comp.SetLayoutName(view)
    xs = XAIScene(scene, segmentations, volumes, app)
    xs.keep_alive = (colors,)  # only the application logic references it otherwise
    return xs
