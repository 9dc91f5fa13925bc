"""The ``vqa`` task: a question about one patient-plane slice of the volume, answered and explained.

It calls :func:`xai_core.ask.ask` and writes its parts with :func:`xai_core.ask.write_answer` into the
result folder (``answer.json``, ``saliency.nii.gz``, ``tokens.json``). ``overlay.png`` is listed among
the artifacts but drawn only when a client downloads it (:func:`xai_core.ask.draw_overlay`, from the
slice and heatmap kept in the folder): the Slicer module never downloads it, and drawing it with every
answer cost ~0.65 s on 2 CPU cores. The reply's
JSON is the :class:`~xai_core.schema.VQAAnswer` with the result id and artifact URLs; its one file is
the float32 heatmap on the input grid (the map on the slice's one-voxel slab, zero elsewhere), as the
explanation tasks return theirs. With ``method: none`` the reply is JSON only.

Parameters (JSON body or the form field ``params``): ``question`` (required), ``plane`` (axial |
coronal | sagittal, default axial), ``slice_mm`` (the slice's LPS coordinate along the plane's axis,
default the volume's centre), ``method`` (relig | ig | none, default relig) and ``method_params``
(bounded, as for the explanation tasks). Bad values are refused before the job is queued (422); a
slice outside the volume is refused once the image is read (422 too).
"""

from __future__ import annotations

from typing import Any

from xai_core.ask import METHODS, AskError, ask, check_request, write_answer, write_overlay_source
from xai_core.explain import get_explainer
from xai_core.explain.base import check_method_params
from xai_core.schema import VQAAnswer

from ..errors import BadInput
from ..runtime import XAIRuntime
from .base import IMAGE_KEY, Progress, XAIInferTask

VQA_TYPE = "vqa"  # not one of MONAI Label's InferType values: stock viewers skip it


def _one(value: Any) -> Any:
    """A form field sent as a one-element list is that element."""
    if isinstance(value, list | tuple) and len(value) == 1:
        return value[0]
    return value


class VQATask(XAIInferTask):
    """Answer ``question`` about a slice; the response file is the float32 heatmap (input grid)."""

    response_artifact = "saliency.nii.gz"

    def __init__(self, runtime: XAIRuntime, name: str, model: str):
        super().__init__(runtime, name, VQA_TYPE, labels=[],
                         description="Answer a question about one slice (plane, slice_mm in LPS mm) with the "
                                     "answer's confidence, top 5 and token scores; float32 heatmap 0..1 on the "
                                     f"slice's slab, input grid; params: question, plane, slice_mm, method "
                                     f"({' | '.join(METHODS)})",
                         config={"question": "", "plane": "axial", "slice_mm": None, "method": "relig"},
                         model=model)

    def is_valid(self) -> bool:
        # Listed only while a vqa model's weights are there (they may land while the server runs).
        return self.cache.available() and self.cache.kind() == "vqa"

    def request(self, params: dict[str, Any]) -> tuple[str, str, float | None, str, dict[str, Any]]:
        """``(question, plane, slice_mm, method, method_params)`` of a request, checked (BadInput)."""
        try:
            question, plane, slice_mm, method = check_request(
                _one(params.get("question")), _one(params.get("plane")), _one(params.get("slice_mm")),
                _one(params.get("method")))
            kwargs = ({} if method == "none"
                      else check_method_params(get_explainer(method), params.get("method_params")))
        except ValueError as e:
            raise BadInput(str(e)) from None
        return question, plane, slice_mm, method, kwargs

    def check_params(self, params: dict[str, Any]) -> None:
        # Not the base check: a vqa request has no class target.
        self.request(params)

    def compute(self, data: dict[str, Any], progress: Progress) -> None:
        question, plane, slice_mm, method, kwargs = self.request(data)
        progress("load", 0.0)
        model = self.cache.get()
        try:
            res = ask(data[IMAGE_KEY], question, plane=plane, slice_mm=slice_mm, method=method, model=model,
                      method_kwargs=kwargs, overlay=False, progress=progress, settings=self.runtime.settings)
        except AskError as e:  # the request does not fit this volume (a slice outside it): the client's
            raise BadInput(str(e)) from None
        progress("write", 0.9)
        result_id, folder = self.runtime.results.create()
        write_answer(res, folder)
        write_overlay_source(res, folder)  # the overlay is drawn from it on its first download
        # The answer's own server fields are empty (it was made outside a request): the request's win.
        result = {**res.answer.model_dump(mode="json", exclude={"files"}), **self.base_json(data, result_id)}
        self.finish(data, result_id, VQAAnswer.model_validate(result).model_dump(mode="json"),
                    self.response_artifact if res.saliency is not None else None)
