"""The command line: a user error is one line on stderr and exit code 2, never a traceback;
``--debug`` shows the traceback."""

from __future__ import annotations

import pytest

from xai_core.cli import main


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys):
    missing = tmp_path / "nope.nii.gz"
    flat = tmp_path / "flat.nii.gz"
    flat.write_bytes(b"not an image at all")
    hostile = tmp_path / "leak.mha"
    hostile.write_text("ObjectType = Image\nNDims = 3\nDimSize = 256 1 2\nElementType = MET_UCHAR\n"
                       "ElementDataFile = /etc/passwd\n")
    for argv, words in [
        (["explain", str(missing), "--out", str(tmp_path / "o1")], "nope.nii.gz"),
        (["explain", str(flat), "--out", str(tmp_path / "o2")], "flat.nii.gz"),
        (["explain", str(hostile), "--untrusted", "--out", str(tmp_path / "o3")], "/etc/passwd"),
        (["explain", str(missing), "--model", "no-such-model", "--out", str(tmp_path / "o4")], "nope.nii.gz"),
    ]:
        code, err = _run(capsys, *argv)
        assert code == 2, argv
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("xai explain: error:") and words in lines[0], err
        assert "Traceback" not in err


def test_bad_param_and_debug_traceback(tmp_path, capsys):
    path = tmp_path / "x.nii.gz"
    path.write_bytes(b"garbage")
    code, err = _run(capsys, "explain", str(path), "--param", "no equals sign", "--out", str(tmp_path / "o"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    with pytest.raises(Exception):  # noqa: B017 - the point is that the original error propagates
        main(["--debug", "explain", str(path), "--out", str(tmp_path / "o")])
