"""XAI Explain: explanations from the explanation server in 3D Slicer.

The heatmap is shown over the image, the saliency levels and mask become segments that the user
corrects with the Segment Editor, and the corrected label is stored back on the server with its
provenance. Network work runs on worker threads (``XAIExplainLib.jobs``) polled by a QTimer; the
scene and HTTP logic live in ``XAIExplainLib`` (no Qt), which the tests run without Slicer.
"""

import html
import logging
import shutil
import tempfile
import time
from pathlib import Path

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from XAIExplainLib import __version__, report
from XAIExplainLib.client import VQA_METHODS, VQA_TASK, XAIClient, XAIClientError, vqa_params
from XAIExplainLib.jobs import BackgroundCall, ExplanationRun, upload_image
from XAIExplainLib.scene import ObliqueSliceError, XAIScene, find_slice_node, slice_position
from XAIExplainLib.schema import ReplyError, server_schema_problems

SETTINGS_URL_KEY = "XAIExplain/serverUrl"
#: Parameter node key: ask for findings and report (``"true"``/``"false"``; default true).
REPORT_PARAMETER = "Report"
#: Parameter node key: how the server explains an answer (one of ``VQA_METHODS``; default relig).
VQA_METHOD_PARAMETER = "VqaMethod"
#: The slice view a question is about. The Red view is the one users scroll through by default.
QUESTION_VIEW = "Red"
VQA_METHOD_LABELS = {"relig": "RE-LIG (image and question)", "ig": "Integrated gradients (image only)",
                     "none": "None (answer only)"}
EDITOR_NODE_TAG = "XAIExplainSegmentEditor"
POLL_MS = 150


#
# XAIExplain
#


class XAIExplain(ScriptedLoadableModule):
    """Module description (Slicer's scripted module convention)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "XAI Explain"
        self.parent.categories = ["Explainable AI"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["XAI medical imaging project"]
        self.parent.helpText = """
Shows why a model decided what it did: the explanation server's saliency map appears over the image,
its saliency levels and mask become segments you can correct with the Segment Editor, and the
corrected label is stored back on the server with its provenance.
See docs/slicer.md in the project for the steps.
"""
        self.parent.acknowledgementText = """
Built on 3D Slicer, MONAI Label and MONAI. Segment editing uses Slicer's Segment Editor.
"""


#
# XAIExplainLogic
#


class XAIExplainLogic(ScriptedLoadableModuleLogic):
    """What the widget does, callable without it (Python console, tests).

    Holds the client, the scene logic and the record of which volume was uploaded under which id.
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.xscene = XAIScene(slicer.mrmlScene, slicer.modules.segmentations.logic(),
                               slicer.modules.volumes.logic(), slicer.app.applicationLogic())
        self.client = None
        self.info = None
        self.workdir = Path(tempfile.mkdtemp(prefix="XAIExplain_"))
        self._uploaded = {}  # node ID -> (node and image MTime, image id on the server)

    def cleanup(self):
        shutil.rmtree(self.workdir, ignore_errors=True)

    # connection
    def makeClient(self, url, token):
        return XAIClient(url, token=token or None)

    @staticmethod
    def serverInfo(client):
        """``(info, schema problems)``, for a worker thread: the server's tasks, and what this module
        could not read in its replies by the schema it serves (``GET /xai/schema``): [] when it reads
        them all, None when the server does not serve its schema."""
        info = client.info()
        try:
            served = client.result_schema()
        except XAIClientError as e:  # the tasks still work, and every reply is checked when it comes
            logging.warning("could not read the server's result schema: %s", e)
            served = None
        return info, (None if served is None else server_schema_problems(served))

    def setConnection(self, client, info):
        self.client, self.info = client, info
        self._uploaded.clear()  # another server does not have our images

    def explanationTasks(self):
        return self.client.explanation_tasks(self.info) if self.client else []

    def hasVqa(self):
        return bool(self.client) and self.client.has_task(VQA_TASK, self.info)

    # upload
    def prepareUpload(self, volumeNode):
        """``(image id, file to upload or None)``. The file is written here on the GUI thread (MRML is
        not thread-safe); the worker uploads it. Unchanged volumes are not sent again."""
        stamp = (volumeNode.GetMTime(), volumeNode.GetImageData().GetMTime())
        known = self._uploaded.get(volumeNode.GetID())
        if known and known[0] == stamp:
            return known[1], None
        imageId = self.xscene.content_id(volumeNode)
        path = self.xscene.write_volume(volumeNode, self.workdir / "upload" / f"{imageId}.nii.gz")
        self._uploaded[volumeNode.GetID()] = (stamp, imageId)
        return imageId, path

    def forgetUpload(self, volumeNode):
        self._uploaded.pop(volumeNode.GetID(), None)

    # parameters
    def setDefaultParameters(self, parameterNode):
        """Findings and report are on unless the user turned them off (this scene remembers it); answers
        are explained with RE-LIG unless the user chose another method."""
        if not parameterNode.GetParameter(REPORT_PARAMETER):
            parameterNode.SetParameter(REPORT_PARAMETER, "true")
        if parameterNode.GetParameter(VQA_METHOD_PARAMETER) not in VQA_METHODS:
            parameterNode.SetParameter(VQA_METHOD_PARAMETER, VQA_METHODS[0])

    @staticmethod
    def vqaMethod(parameterNode):
        method = parameterNode.GetParameter(VQA_METHOD_PARAMETER) if parameterNode is not None else ""
        return method if method in VQA_METHODS else VQA_METHODS[0]

    @staticmethod
    def reportRequested(parameterNode):
        return parameterNode is None or parameterNode.GetParameter(REPORT_PARAMETER) != "false"

    @staticmethod
    def explanationParams(target, report):
        """Task parameters of an explanation: ``report`` asks the server for ``findings`` and ``report``
        (anatomy names for the segments, the findings table, the counterfactual and the drafted text)."""
        return {"target": target or "predicted", "report": bool(report)}

    # questions
    def questionSliceNode(self):
        """The slice node of the view questions are about (Red); None in a scene without views."""
        return find_slice_node(slicer.mrmlScene, QUESTION_VIEW)

    def questionSlice(self):
        """``(slice node, its SliceToRAS copy, SlicePosition)`` of the Red view, read on the GUI thread.

        Raises ObliqueSliceError (a reformatted Red view, or none at all) with a message for the user."""
        node = self.questionSliceNode()
        if node is None:
            raise ObliqueSliceError(f"there is no {QUESTION_VIEW} slice view to ask about")
        matrix = vtk.vtkMatrix4x4()
        matrix.DeepCopy(node.GetSliceToRAS())
        return node, matrix, slice_position(matrix, view=QUESTION_VIEW)

    @staticmethod
    def questionParams(question, position, method):
        """The ``vqa`` task's parameters for ``question`` about the slice at ``position``."""
        return vqa_params(question, position.plane, position.slice_mm, method)

    def showAnswerHeatmap(self, state, volumeNode, opacity, threshold, name):
        """The answer's heatmap in the Red view (None when the reply has none: method ``none``)."""
        path = state.files.get("saliency")
        if path is None:
            return None
        return self.xscene.import_answer_heatmap(path, volumeNode, name, view=QUESTION_VIEW, opacity=opacity,
                                                 threshold=threshold)

    # explanation
    def startRun(self, volumeNode, task, params, artifacts=None):
        imageId, path = self.prepareUpload(volumeNode)
        outDir = Path(tempfile.mkdtemp(prefix=f"{task}_", dir=self.workdir))
        kwargs = {"artifacts": artifacts} if artifacts else {}
        return ExplanationRun(self.client, task, params, outDir, image_id=imageId, image_path=path,
                              reuse_existing=True, **kwargs).start()

    def showResult(self, state, volumeNode, opacity, threshold, name=None, files=None):
        """Heatmap and segments of a finished run (the reply is checked against the result schema
        first: a reply the module cannot read raises ReplyError naming every missing field)."""
        files = {k: str(v) for k, v in (files if files is not None else state.files).items()}
        return self.xscene.import_explanation(state.result or {}, files, volumeNode, name=name,
                                              opacity=opacity, threshold=threshold)

    # saving
    def exportLabel(self, segmentationNode, segmentIds, volumeNode):
        """Label file (0/1 uint8 NIfTI on the input grid) of the union of ``segmentIds``."""
        labelNode = self.xscene.export_label(segmentationNode, segmentIds, volumeNode,
                                             name=f"{segmentationNode.GetName()} label")
        try:
            path = self.workdir / "labels" / f"label_{int(time.time() * 1000)}.nii.gz"
            return self.xscene.write_volume(labelNode, path)
        finally:
            slicer.mrmlScene.RemoveNode(labelNode)

    def clientDescription(self):
        return f"XAIExplain {__version__} (3D Slicer {slicer.app.applicationVersion})"


#
# XAIExplainWidget
#


class XAIExplainWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel. Qt lives here only."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.run = None  # ExplanationRun in flight
        self.runKind = None  # "explain" or "vqa"
        self.runVolume = None
        self.calls = []  # [(BackgroundCall, on_done)]
        self.nodes = None  # ExplanationNodes of the explanation shown
        self.overlayNodes = None  # ExplanationNodes of the last answer's heatmap
        self.askedSlice = None  # (slice node, SliceToRAS when asked, SlicePosition) of the question in flight
        self.lastResult = None
        self.lastTask = None
        self.lastImageId = None
        self.timer = None
        self.parameterNode = None
        self._parameterObserver = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/XAIExplain.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = XAIExplainLogic()

        self.ui.serverUrlLineEdit.text = qt.QSettings().value(SETTINGS_URL_KEY, "http://127.0.0.1:8000")
        self.ui.cancelButton.enabled = False
        self.ui.askButton.enabled = False

        self.ui.connectButton.connect("clicked(bool)", self.onConnect)
        self.ui.explainButton.connect("clicked(bool)", self.onExplain)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.askButton.connect("clicked(bool)", self.onAsk)
        self.ui.saveLabelButton.connect("clicked(bool)", self.onSaveLabel)
        self.ui.reportCheckBox.connect("toggled(bool)", self.onReportToggled)
        self.ui.opacitySliderWidget.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.thresholdSliderWidget.connect("valueChanged(double)", self.onThresholdChanged)
        for method in VQA_METHODS:
            self.ui.vqaMethodComboBox.addItem(VQA_METHOD_LABELS.get(method, method), method)
        self.ui.vqaMethodComboBox.connect("currentIndexChanged(int)", self.onVqaMethodChanged)
        self.ui.questionLineEdit.connect("returnPressed()", self.onAsk)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)

        self.ui.segmentEditorWidget.setMRMLScene(slicer.mrmlScene)
        self.ensureEditorNode()

        # The timer only reads the workers' state; the network never runs on this thread.
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.connect("timeout()", self.onTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        self.updateButtons()

    # ------------------------------------------------------------------ parameter node
    def initializeParameterNode(self):
        """The module's state lives in its parameter node (saved with the scene), not in the widget."""
        node = self.logic.getParameterNode()
        self.logic.setDefaultParameters(node)
        if self.parameterNode is not None and self._parameterObserver is not None:
            self.parameterNode.RemoveObserver(self._parameterObserver)
        self.parameterNode = node
        self._parameterObserver = node.AddObserver(vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, *unused):
        wasBlocked = self.ui.reportCheckBox.blockSignals(True)
        self.ui.reportCheckBox.checked = self.logic.reportRequested(self.parameterNode)
        self.ui.reportCheckBox.blockSignals(wasBlocked)
        wasBlocked = self.ui.vqaMethodComboBox.blockSignals(True)
        self.ui.vqaMethodComboBox.currentIndex = max(
            0, self.ui.vqaMethodComboBox.findData(self.logic.vqaMethod(self.parameterNode)))
        self.ui.vqaMethodComboBox.blockSignals(wasBlocked)

    def onReportToggled(self, checked):
        if self.parameterNode is not None:
            self.parameterNode.SetParameter(REPORT_PARAMETER, "true" if checked else "false")

    def onVqaMethodChanged(self, index):
        method = self.ui.vqaMethodComboBox.itemData(index)
        if self.parameterNode is not None and method in VQA_METHODS:
            self.parameterNode.SetParameter(VQA_METHOD_PARAMETER, method)

    def cleanup(self):
        if self.run:
            self.run.cancel()
        if self.timer:
            self.timer.stop()
        if self.parameterNode is not None and self._parameterObserver is not None:
            self.parameterNode.RemoveObserver(self._parameterObserver)
            self.parameterNode = self._parameterObserver = None
        self.removeObservers()
        if self.logic:
            self.logic.cleanup()

    def enter(self):
        self.ensureEditorNode()
        self.ui.segmentEditorWidget.installKeyboardShortcuts()
        self.ui.segmentEditorWidget.setupViewObservations()

    def exit(self):
        self.ui.segmentEditorWidget.setActiveEffect(None)
        self.ui.segmentEditorWidget.uninstallKeyboardShortcuts()
        self.ui.segmentEditorWidget.removeViewObservations()

    def onSceneStartClose(self, caller, event):
        if self.run:
            self.run.cancel()
        self.nodes = self.overlayNodes = self.askedSlice = None

    def onSceneEndClose(self, caller, event):
        # Closing the scene removed the parameter node: make (and observe) a fresh one.
        self.initializeParameterNode()
        if self.parent.isEntered:
            self.ensureEditorNode()
        self.updateButtons()

    def ensureEditorNode(self):
        node = slicer.mrmlScene.GetSingletonNode(EDITOR_NODE_TAG, "vtkMRMLSegmentEditorNode")
        if node is None:
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
            node.UnRegister(None)
            node.SetSingletonTag(EDITOR_NODE_TAG)
            node = slicer.mrmlScene.AddNode(node)
        self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(node)

    # ------------------------------------------------------------------ state
    def busy(self):
        return self.run is not None

    def pending(self, what):
        return any(call.what == what for call, _ in self.calls)

    def updateButtons(self, *unused):
        connected = self.logic is not None and self.logic.client is not None
        volume = self.ui.inputVolumeSelector.currentNode()
        self.ui.explainButton.enabled = (connected and volume is not None and not self.busy()
                                         and self.ui.methodComboBox.count > 0)
        self.ui.askButton.enabled = connected and volume is not None and not self.busy() and self.logic.hasVqa()
        self.ui.cancelButton.enabled = self.busy()
        self.ui.connectButton.enabled = not self.busy() and not self.pending("connect")
        self.ui.saveLabelButton.enabled = (connected and volume is not None and not self.pending("label upload")
                                           and self.ui.segmentEditorWidget.segmentationNode() is not None)

    def startCall(self, call, onDone):
        self.calls.append((call.start(), onDone))
        self.timer.start()
        self.updateButtons()

    def onTimer(self):
        # Python threads only run while this thread gives up the GIL; a short sleep makes sure the
        # workers get their turn whichever way PythonQt holds the lock while Qt is idle.
        time.sleep(0.002)
        for call, onDone in list(self.calls):
            if call.done:
                self.calls.remove((call, onDone))
                onDone(call)
        if self.run:
            state = self.run.snapshot()
            self.ui.progressBar.value = int(round(100 * state.progress))
            self.ui.statusLabel.text = state.stage
            if state.finished:
                self.run = None
                self.onRunFinished(state)
        if not self.calls and not self.run:
            self.timer.stop()
        self.updateButtons()

    # ------------------------------------------------------------------ connect
    def onConnect(self):
        url = self.ui.serverUrlLineEdit.text.strip()
        try:
            client = self.logic.makeClient(url, self.ui.tokenLineEdit.text.strip())
        except ValueError as e:
            self.ui.serverStatusLabel.text = str(e)
            return
        self.ui.serverStatusLabel.text = f"Connecting to {url} ..."
        self.startCall(BackgroundCall(lambda: self.logic.serverInfo(client), "connect"),
                       lambda call: self.onConnected(client, call))

    def onConnected(self, client, call):
        if call.error:
            self.logic.setConnection(None, None)
            self.ui.serverStatusLabel.text = call.error
            self.ui.methodComboBox.clear()
            return
        qt.QSettings().setValue(SETTINGS_URL_KEY, client.url)
        info, schemaProblems = call.value
        self.logic.setConnection(client, info)
        self.ui.methodComboBox.clear()
        for task in self.logic.explanationTasks():
            label = task.name + (f" ({task.type})" if task.type != "explanation" else "")
            self.ui.methodComboBox.addItem(label, task.name)
        self.ui.targetComboBox.clear()
        for target in ["predicted", "all"] + client.class_names(info):
            self.ui.targetComboBox.addItem(target)
        n = self.ui.methodComboBox.count
        self.ui.serverStatusLabel.text = (f"Connected to {info.get('name') or 'server'} at {client.url}: "
                                          f"{n} explanation method(s)." if n else
                                          f"Connected to {client.url}, but it offers no explanation task.")
        if schemaProblems:
            self.ui.serverStatusLabel.text += (" Warning: this module cannot read every reply of this server ("
                                               + "; ".join(schemaProblems[:3]) + "): update the module.")
        if self.logic.hasVqa():
            self.ui.vqaStatusLabel.text = (f"Ask a question about the selected volume, on the slice shown in the "
                                           f"{QUESTION_VIEW} view (axial, coronal or sagittal).")
        else:
            self.ui.vqaStatusLabel.text = "Question answering (vqa) is not available on this server."

    # ------------------------------------------------------------------ explain
    def currentTask(self):
        return self.ui.methodComboBox.itemData(self.ui.methodComboBox.currentIndex)

    def onExplain(self):
        volume = self.ui.inputVolumeSelector.currentNode()
        task = self.currentTask()
        if volume is None or not task:
            return
        params = self.logic.explanationParams(self.ui.targetComboBox.currentText,
                                              self.logic.reportRequested(self.parameterNode))
        self.startRun("explain", volume, task, params)

    def onAsk(self):
        volume = self.ui.inputVolumeSelector.currentNode()
        question = self.ui.questionLineEdit.text.strip()
        if volume is None or self.busy():
            return
        if not question:
            self.ui.answerTextBrowser.setPlainText("Type a question first.")
            return
        if not self.logic.hasVqa():
            self.ui.vqaStatusLabel.text = "Question answering (vqa) is not available on this server."
            return
        # The slice is read now, on the GUI thread: the answer is about what the user saw when asking.
        try:
            sliceNode, matrix, position = self.logic.questionSlice()
            params = self.logic.questionParams(question, position, self.logic.vqaMethod(self.parameterNode))
        except ValueError as e:  # ObliqueSliceError included: a clear word instead of a wrong answer
            self.ui.vqaStatusLabel.text = f"Not asked: {e}"
            return
        self.ui.vqaStatusLabel.text = f"Asking about the {QUESTION_VIEW} view's {position.describe()} ..."
        self.ui.answerTextBrowser.clear()
        self.askedSlice = (sliceNode, matrix, position)
        self.startRun("vqa", volume, VQA_TASK, params, artifacts=("saliency",))

    def startRun(self, kind, volume, task, params, artifacts=None):
        try:
            self.run = self.logic.startRun(volume, task, params, artifacts)
        except Exception as e:  # writing the upload file can fail (disk full, odd volume)
            logging.exception("could not start %s", task)
            self.ui.statusLabel.text = f"Could not start: {e}"
            return
        self.runKind, self.runVolume, self.lastTask = kind, volume, task
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = "starting"
        self.timer.start()
        self.updateButtons()

    def onCancel(self):
        if self.run:
            self.run.cancel()
            self.ui.statusLabel.text = "cancelling ..."

    def onRunFinished(self, state):
        if state.status in ("cancelled", "failed"):
            # The upload may not have happened or finished: offer it again next time (an id the server
            # already holds is reused, so this costs one request at most).
            self.logic.forgetUpload(self.runVolume)
            self.ui.statusLabel.text = "Cancelled." if state.status == "cancelled" else f"Failed: {state.error}"
            if self.runKind == "vqa":
                self.ui.vqaStatusLabel.text = ("Question cancelled." if state.status == "cancelled"
                                               else f"No answer: {state.error}")
            return
        try:
            if self.runKind == "vqa":
                self.showAnswer(state)
            else:
                self.showExplanation(state)
        except Exception as e:
            logging.exception("could not show the result")
            self.ui.statusLabel.text = f"Could not show the result: {e}"
            return
        # Warnings and errors of the findings (failed registration, weak counterfactual ...) must not
        # hide in the text box: the status line says that there are some.
        flags = [f for f in report.quality_flags(state.result) if f[0] in ("warning", "error")] \
            if self.runKind == "explain" else []
        self.ui.statusLabel.text = ("Done" + (" (server without job API: could not be cancelled)"
                                              if state.blocking_fallback else "") + "."
                                    + (f" {len(flags)} quality warning(s): {flags[0][2]}" if flags else ""))

    def showExplanation(self, state):
        volume = self.runVolume
        self.nodes = self.logic.showResult(state, volume, self.ui.opacitySliderWidget.value,
                                           self.ui.thresholdSliderWidget.value)
        self.lastResult, self.lastImageId = state.result, state.image_id
        self.ui.resultsTextBrowser.setHtml(report.summary_html(state.result))
        self.showFindingsTable(state.result)
        if self.nodes.segmentation is not None:
            editor = self.ui.segmentEditorWidget
            editor.setSegmentationNode(self.nodes.segmentation)
            editor.setSourceVolumeNode(volume)
            if self.nodes.mask_segment_id:
                editor.setCurrentSegmentID(self.nodes.mask_segment_id)

    def showAnswer(self, state):
        result = state.result or {}
        try:
            report.answer_check(result)
        except ReplyError as e:
            # What the server said still reaches the user; nothing goes into the scene, and the status
            # line says why (onRunFinished shows the error).
            self.ui.answerTextBrowser.setHtml(report.answer_html(result)
                                              + f"<p style='color:#c0392b'>{html.escape(str(e))}</p>")
            self.ui.vqaStatusLabel.text = "The answer could not be read completely (see below)."
            raise
        self.ui.answerTextBrowser.setHtml(report.answer_summary_html(result))
        sliceNode, matrix, position = self.askedSlice or (None, None, None)
        self.askedSlice = None
        heat = self.logic.showAnswerHeatmap(
            state, self.runVolume, self.ui.opacitySliderWidget.value, self.ui.thresholdSliderWidget.value,
            name=report.answer_title(result))
        if heat is not None:
            self.overlayNodes = heat
            if sliceNode is not None:  # the user may have scrolled while the server worked
                self.logic.xscene.set_slice_to_ras(sliceNode, matrix)
        asked = f"the {QUESTION_VIEW} view's {position.describe()}" if position else "the slice asked about"
        self.ui.vqaStatusLabel.text = f"Answered about {asked}: {report.answer_text(result)}."

    def showFindingsTable(self, result):
        columns, rows = report.findings_table(result)
        table = self.ui.findingsTableWidget
        table.clear()
        table.setColumnCount(len(columns))
        table.setHorizontalHeaderLabels(list(columns))
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, text in enumerate(row):
                table.setItem(r, c, qt.QTableWidgetItem(text))
        table.resizeColumnsToContents()
        table.visible = bool(rows)

    # ------------------------------------------------------------------ display
    def shownHeatmaps(self):
        return [n.heatmap for n in (self.nodes, self.overlayNodes) if n is not None and n.heatmap is not None]

    def onOpacityChanged(self, value):
        self.logic.xscene.set_opacity(value)

    def onThresholdChanged(self, value):
        for heat in self.shownHeatmaps():
            if heat.GetScene() is not None:
                self.logic.xscene.set_threshold(heat, value)

    # ------------------------------------------------------------------ save
    def chosenSegmentIds(self, segmentationNode):
        editor = self.ui.segmentEditorWidget
        if self.ui.mergeVisibleCheckBox.checked:
            ids = vtk.vtkStringArray()
            segmentationNode.GetDisplayNode().GetVisibleSegmentIDs(ids)
            return [ids.GetValue(i) for i in range(ids.GetNumberOfValues())]
        return [editor.currentSegmentID()] if editor.currentSegmentID() else []

    def onSaveLabel(self):
        segmentation = self.ui.segmentEditorWidget.segmentationNode()
        volume = self.ui.inputVolumeSelector.currentNode()
        if segmentation is None or volume is None:
            self.ui.saveStatusLabel.text = "Explain a volume first: there is no segmentation to save."
            return
        ids = self.chosenSegmentIds(segmentation)
        if not ids:
            self.ui.saveStatusLabel.text = "Select the segment to save in the Segment Editor."
            return
        tag = self.ui.labelTagLineEdit.text.strip() or "corrected_saliency"
        names = [segmentation.GetSegmentation().GetSegment(s).GetName() for s in ids]
        try:
            imageId, uploadPath = self.logic.prepareUpload(volume)
            labelPath = self.logic.exportLabel(segmentation, ids, volume)
        except Exception as e:
            logging.exception("label export failed")
            self.ui.saveStatusLabel.text = f"Could not export the label: {e}"
            return
        # The server stamps the provenance from the result id; a label drawn on another volume has none.
        result = self.lastResult if imageId == self.lastImageId else None
        params = report.label_params(result, names, self.ui.annotatorLineEdit.text.strip())
        client = self.logic.client.clone()

        def upload():
            if uploadPath is not None:  # the volume changed since the explanation: the label belongs to this one
                upload_image(client, uploadPath, imageId, reuse_existing=True)
            return client.upload_label(imageId, labelPath, tag, params)

        self.ui.saveStatusLabel.text = f"Saving {', '.join(names)} ..."
        self.startCall(BackgroundCall(upload, "label upload"), lambda call: self.onLabelSaved(call, tag))

    def onLabelSaved(self, call, tag):
        if call.error:
            self.ui.saveStatusLabel.text = f"Not saved: {call.error}"
            return
        answer = call.value or {}
        self.ui.saveStatusLabel.text = (f"Saved as label {answer.get('label', '?')} (tag {tag}) "
                                        f"for image {answer.get('image', '?')}.")


#
# XAIExplainTest
#


class XAIExplainTest(ScriptedLoadableModuleTest):
    """Runs the module logic on synthetic data in the running Slicer (no server needed): the same
    round trip the pytest suite runs on slicer-core."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_scene_round_trip()
        self.setUp()
        self.test_scene_round_trip_left_handed()
        self.setUp()
        self.test_text()

    def _roundTrip(self, leftHanded):
        from XAIExplainLib.selftest import run_scene_self_test

        logic = XAIExplainLogic()
        work = tempfile.mkdtemp(prefix="XAIExplainTest_")
        try:
            summary = run_scene_self_test(logic.xscene, work, left_handed=leftHanded)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            logic.cleanup()
        self.assertEqual(len(summary["segments"]), 5)
        return summary

    def test_scene_round_trip(self):
        self.delayDisplay("Heatmap, nested level segments, edit, export: oblique geometry")
        summary = self._roundTrip(False)
        self.assertEqual(summary["segments"][3], "Saliency top 1 % – Left insular cortex")
        self.delayDisplay("Test passed")

    def test_scene_round_trip_left_handed(self):
        self.delayDisplay("Same round trip on a left-handed grid")
        self._roundTrip(True)
        self.delayDisplay("Test passed")

    def test_text(self):
        from XAIExplainLib.schema import check_reply
        from XAIExplainLib.selftest import sample_result

        result = sample_result({"size": [4, 4, 4], "spacing": [1.0, 1.0, 1.0], "origin": [0.0, 0.0, 0.0],
                                "direction": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]})
        self.assertEqual(check_reply(result), [])
        self.assertIn("Prediction: glioma (p = 0.810)", report.summary_text(result))
        self.assertIn("<b>Prediction: glioma</b>", report.summary_html(result))
        self.assertEqual(report.findings_table(result)[1][0][:3], ["Left insular cortex", "insula", "left"])
        self.assertIn("lowers the probability of glioma", report.summary_html(result))
        self.delayDisplay("Test passed")
