"""Static checks of the Slicer extension: CMake lists, extension index entry, .ui file against the code,
Python 3.12 syntax, and a library that stays free of Qt and of the Slicer application."""

from __future__ import annotations

import ast
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXT = ROOT / "slicer_extension"
MODULE = "XAIExplain"
MODULE_DIR = EXT / MODULE
LIB_DIR = MODULE_DIR / f"{MODULE}Lib"
UI_FILE = MODULE_DIR / "Resources" / "UI" / f"{MODULE}.ui"
MODULE_PY = MODULE_DIR / f"{MODULE}.py"

EXTENSION_FIELDS = ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                    "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS")


def _cmake_sets(text: str) -> dict[str, list[str]]:
    """``set(NAME v1 v2 ...)`` commands (comments dropped; quoted values kept whole)."""
    text = re.sub(r"#[^\n]*", "", text)
    out = {}
    for m in re.finditer(r'\bset\(\s*(\w+)((?:\s+(?:"[^"]*"|[^\s")]+))*)\s*\)', text):
        out[m.group(1)] = re.findall(r'"[^"]*"|[^\s"]+', m.group(2))
    return out


def _expand(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: variables[m.group(1)], value.strip('"'))


def _python_files() -> list[Path]:
    return [MODULE_PY, *sorted(LIB_DIR.glob("*.py"))]


# ------------------------------------------------------------------------------------- CMake

def test_top_level_cmake_has_the_fields_the_extension_index_checks():
    text = (ROOT / "CMakeLists.txt").read_text()
    sets = _cmake_sets(text)
    variables = {k: " ".join(v).strip('"') for k, v in sets.items()}
    for field in EXTENSION_FIELDS:
        assert field in sets and variables[field], f"{field} missing or empty"
    for field in ("EXTENSION_HOMEPAGE", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert _expand(variables[field], variables).startswith("https://"), field
    assert _expand(variables["EXTENSION_ICONURL"], variables).endswith(f"Resources/Icons/{MODULE}.png")
    order = [text.index(s) for s in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                                     "add_subdirectory(", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                                     "include(${Slicer_EXTENSION_CPACK})")]
    assert order == sorted(order), "Slicer extension commands out of order"
    subdirs = re.findall(r"add_subdirectory\(\s*([^\s)]+)", text)
    assert subdirs == [f"slicer_extension/{MODULE}"]
    for d in subdirs:
        assert (ROOT / d / "CMakeLists.txt").is_file(), d


def test_module_cmake_lists_existing_files_and_every_library_file():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    sets = _cmake_sets(text)
    variables = {"MODULE_NAME": sets["MODULE_NAME"][0]}
    assert variables["MODULE_NAME"] == MODULE
    scripts = [_expand(v, variables) for v in sets["MODULE_PYTHON_SCRIPTS"]]
    resources = [_expand(v, variables) for v in sets["MODULE_PYTHON_RESOURCES"]]
    for name in scripts + resources:
        assert (MODULE_DIR / name).is_file(), f"CMake names {name}, which does not exist"
    # A library file left out of the list would be missing from the installed extension.
    lib_files = {f"{MODULE}Lib/{p.name}" for p in LIB_DIR.glob("*.py")}
    assert lib_files <= set(scripts), f"not in MODULE_PYTHON_SCRIPTS: {sorted(lib_files - set(scripts))}"
    assert f"{MODULE}.py" in scripts
    assert {f"Resources/UI/{MODULE}.ui", f"Resources/Icons/{MODULE}.png"} <= set(resources)
    assert re.search(r"slicerMacroBuildScriptedModule\(\s*NAME \$\{MODULE_NAME\}\s*SCRIPTS \$\{MODULE_PYTHON_SCRIPTS\}"
                     r"\s*RESOURCES \$\{MODULE_PYTHON_RESOURCES\}", text)
    assert re.search(r"slicer_add_python_unittest\(\s*SCRIPT \$\{MODULE_NAME\}\.py\s*\)", text)


def test_extension_index_entry_follows_the_catalog_schema():
    entry = json.loads((EXT / f"{MODULE}.json").read_text())
    # Slicer's slicer-extension-catalog-entry-schema v1.0.x: required keys, no others, their types.
    allowed = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
               "build_dependencies": list, "dicom_support_rule": str, "build_subdirectory": str,
               "enabled": bool, "tier": int}
    assert {"$schema", "category", "scm_url"} <= set(entry)
    assert set(entry) <= set(allowed), f"keys the schema does not allow: {set(entry) - set(allowed)}"
    for k, v in entry.items():
        assert isinstance(v, allowed[k]), k
    assert re.match(r"https://raw\.githubusercontent\.com/Slicer/Slicer/main/Schemas/"
                    r"slicer-extension-catalog-entry-schema-v1\.0\.\d+\.json#$", entry["$schema"])
    assert entry.get("scm_type", "git") in ("git", "local") and 1 <= entry.get("tier", 1) <= 5
    assert all(isinstance(d, str) for d in entry["build_dependencies"])
    variables = {k: " ".join(v).strip('"') for k, v in _cmake_sets((ROOT / "CMakeLists.txt").read_text()).items()}
    assert entry["scm_url"] == variables["XAI_REPOSITORY_URL"], "CMake and index entry name different repositories"
    assert entry["category"] == variables["EXTENSION_CATEGORY"]


def test_license_is_apache_2():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_icon_is_a_small_png():
    data = (MODULE_DIR / "Resources" / "Icons" / f"{MODULE}.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert 32 <= width <= 256 and width == height
    assert len(data) < 64 * 1024


# ------------------------------------------------------------------------------------- .ui vs code

def _ui():
    root = ET.parse(UI_FILE).getroot()
    widgets = {w.get("name"): w.get("class") for w in root.iter("widget")}
    custom = {c.findtext("class"): c for c in root.iter("customwidget")}
    return root, widgets, custom


def test_every_widget_the_code_uses_exists_in_the_ui_file():
    _, widgets, _ = _ui()
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_PY.read_text()))
    assert len(used) >= 20  # the regex still finds the widget accesses
    missing = sorted(used - set(widgets))
    assert not missing, f"the code uses widgets the .ui file lacks: {missing}"


def test_ui_file_declares_its_custom_widgets_and_wires_the_scene():
    root, widgets, custom = _ui()
    assert root.findtext("class") == MODULE and widgets[MODULE] == "qMRMLWidget"
    for name, cls in widgets.items():
        assert cls.startswith("Q") or cls in custom, f"{name}: class {cls} needs a <customwidget> entry"
    for cls, c in custom.items():
        assert c.findtext("header") == f"{cls}.h" and c.findtext("extends"), cls
    assert widgets["segmentEditorWidget"] == "qMRMLSegmentEditorWidget"
    assert widgets["inputVolumeSelector"] == "qMRMLNodeComboBox"
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert {"inputVolumeSelector", "segmentEditorWidget"} <= receivers
    for c in root.iter("connection"):
        assert c.findtext("sender") in widgets and c.findtext("receiver") in widgets
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate widget names"


# ------------------------------------------------------------------------------------- Python

@pytest.mark.parametrize("path", _python_files(), ids=lambda p: p.name)
def test_parses_as_python_3_12(path):
    ast.parse(path.read_text(), filename=str(path), feature_version=(3, 12))


FORBIDDEN_MODULES = {"qt", "ctk", "PythonQt", "slicer.util", "slicer.ScriptedLoadableModule", "cgi"}
FORBIDDEN_ATTRS = {"app", "mrmlScene", "modules", "util"}  # slicer.<these> need the application


@pytest.mark.parametrize("path", sorted(LIB_DIR.glob("*.py")), ids=lambda p: p.name)
def test_library_never_imports_qt_or_the_slicer_application(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            names = []
        for n in names:
            assert n not in FORBIDDEN_MODULES and n.split(".")[0] not in {"qt", "ctk"}, f"{path.name} imports {n}"
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "slicer":
            assert node.attr not in FORBIDDEN_ATTRS, f"{path.name} uses slicer.{node.attr} (line {node.lineno})"


def test_module_file_follows_the_scripted_module_template():
    tree = ast.parse(MODULE_PY.read_text())
    classes = {c.name: c for c in tree.body if isinstance(c, ast.ClassDef)}
    bases = {name: [b.id for b in c.bases if isinstance(b, ast.Name)] for name, c in classes.items()}
    assert bases[MODULE] == ["ScriptedLoadableModule"]
    assert bases[f"{MODULE}Widget"][0] == "ScriptedLoadableModuleWidget"
    assert bases[f"{MODULE}Logic"] == ["ScriptedLoadableModuleLogic"]
    assert bases[f"{MODULE}Test"] == ["ScriptedLoadableModuleTest"]
    # Slicer runs runTest(): every test_ method must be called from it.
    test_cls = classes[f"{MODULE}Test"]
    methods = {f.name for f in test_cls.body if isinstance(f, ast.FunctionDef)}
    run_test = next(f for f in test_cls.body if isinstance(f, ast.FunctionDef) and f.name == "runTest")
    called = {n.func.attr for n in ast.walk(run_test) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert {m for m in methods if m.startswith("test_")} <= called
    # Signals the widget connects to are real Qt signatures, not Python names.
    for sig in re.findall(r'\.connect\("([^"]+)"', MODULE_PY.read_text()):
        assert re.fullmatch(r"\w+\([\w*, ]*\)", sig), sig


def test_slicer_docs_explain_install_connect_explain_correct_save():
    text = (ROOT / "docs" / "slicer.md").read_text()
    for words in ("Additional module paths", "Connect", "Explain", "Segment Editor", "Save as label", "token"):
        assert words in text, words


# ------------------------------------------------------------------------------------- result schema

SCHEMA_COPY = MODULE_DIR / "Resources" / "Schema" / "xai_result_schema.json"
REFRESH = ("refresh it: .venv/bin/python -m xai_core.schema > docs/result_schema.json && "
           f"cp docs/result_schema.json {SCHEMA_COPY.relative_to(ROOT)}")


def _lib_schema():
    import sys

    sys.path.insert(0, str(MODULE_DIR))
    from XAIExplainLib import schema

    return schema


def test_bundled_schema_is_the_projects_schema():
    from xai_core.schema import result_json_schema

    bundled = json.loads(SCHEMA_COPY.read_text())
    assert bundled == json.loads((ROOT / "docs" / "result_schema.json").read_text()), \
        f"the module's schema copy differs from docs/result_schema.json; {REFRESH}"
    # Also against the models themselves: a model change fails here even before docs/ is regenerated.
    assert bundled == json.loads(json.dumps(result_json_schema())), f"the result models changed; {REFRESH}"
    assert _lib_schema().SCHEMA_PATH == SCHEMA_COPY.resolve()


def test_module_cmake_installs_the_schema():
    sets = _cmake_sets((MODULE_DIR / "CMakeLists.txt").read_text())
    assert str(SCHEMA_COPY.relative_to(MODULE_DIR)) in sets["MODULE_PYTHON_RESOURCES"]


def test_every_field_the_library_reads_is_in_the_bundled_schema():
    schema = _lib_schema()
    assert sum(len(v) for v in schema.READS.values()) >= 40  # READS still lists the fields
    for kind, paths in schema.READS.items():
        for path in paths:
            schema.field_schema(path, kind)  # KeyError names the path the schema lacks


def test_the_library_reads_replies_only_through_schema_paths():
    """Every ``get(obj, "path")`` / ``items(obj, "path")`` in the module names a path of ``READS``
    (a misspelt path would read nothing and never be checked), and report.py, scene.py, jobs.py and
    client.py touch a reply no other way (no ``result.get(...)`` or reading ``result[...]``)."""
    schema = _lib_schema()
    reads = {p for paths in schema.READS.values() for p in paths}
    used = set()
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("get", "items")
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):
                used.add(node.args[1].value)
                assert node.args[1].value in reads, f"{path.name}:{node.lineno} reads {node.args[1].value!r}"
    assert len(used) >= 35, sorted(used)
    for name in ("report.py", "scene.py", "jobs.py", "client.py"):
        tree = ast.parse((LIB_DIR / name).read_text())
        functions = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)]
        for node in (n for f in functions for n in ast.walk(f)):
            target = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
                target = node.func.value
            elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
                target = node.value  # jobs.py puts a downloaded findings artifact into the reply
            if isinstance(target, ast.Name) and target.id == "result":
                pytest.fail(f"{name}:{node.lineno} reads the reply without a schema path")


def test_ui_has_the_report_checkbox_on_by_default_and_the_findings_table():
    root, widgets, _ = _ui()
    assert widgets["reportCheckBox"] == "QCheckBox" and widgets["findingsTableWidget"] == "QTableWidget"
    box = next(w for w in root.iter("widget") if w.get("name") == "reportCheckBox")
    checked = next(p for p in box.iter("property") if p.get("name") == "checked")
    assert checked.findtext("bool") == "true"
    code = MODULE_PY.read_text()
    assert '"toggled(bool)", self.onReportToggled' in code and "SetParameter(REPORT_PARAMETER" in code
