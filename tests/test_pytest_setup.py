"""The test runner's own configuration survives what FFCV's finalizers do under Python 3.11.

numba raises from a finalizer when FFCV's compiled pipelines are freed (libffcv/ffcv#167); the garbage
collector may run it in the middle of any ast.parse. With pytest's unraisable-exception hook enabled, the
hook formats that traceback with a nested ast.parse and CPython 3.11 fails the outer parse with
"SystemError: AST constructor recursion depth mismatch" (seen in CI). pyproject.toml disables the hook;
this runs the failure's recipe under the project's pytest configuration.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

RECIPE = """
import ast, gc, inspect

class RaisesWhenFreed:
    def __del__(self):
        raise KeyError("like numba freeing an FFCV pipeline")

def test_parse_while_a_finalizer_raises():
    source = inspect.getsource(inspect)
    old = gc.get_threshold()
    gc.set_threshold(1)  # collect on nearly every allocation, i.e. inside ast.parse
    try:
        for _ in range(20):
            a = RaisesWhenFreed()
            a.cycle = a
            del a
            ast.parse(source)
    finally:
        gc.set_threshold(*old)
"""


def test_a_raising_finalizer_during_ast_parse_does_not_fail_a_test(tmp_path: Path) -> None:
    (tmp_path / "test_recipe.py").write_text(RECIPE)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-c",
            str(ROOT / "pyproject.toml"),
            "--rootdir",
            str(tmp_path),
            str(tmp_path / "test_recipe.py"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:]
    assert "1 passed" in res.stdout
