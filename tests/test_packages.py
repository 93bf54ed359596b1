"""Our generic top-level names (training, serving, ...) must resolve to this repository."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["vlmlab", "pipelines", "training", "serving", "cluster"])
def test_package_imports_from_this_repository(name):
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().is_relative_to(REPO)


def test_cli_help_lists_verbs():
    out = subprocess.run([sys.executable, "-m", "vlmlab.cli", "--help"], capture_output=True, text=True, check=True)
    for verb in ("samples", "tiny", "demo"):
        assert f"  {verb}" in out.stdout


def test_cli_unknown_verb_exits_2():
    out = subprocess.run([sys.executable, "-m", "vlmlab.cli", "no-such-verb"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown verb" in out.stderr


def test_verb_and_module_run_the_same_main(tmp_path):
    from vlmlab.cli import VERBS

    for verb, (module, _) in VERBS.items():
        assert callable(importlib.import_module(module).main), verb
    subprocess.run([sys.executable, "-m", "vlmlab.cli", "samples", "--out", str(tmp_path / "a"), "--grid", "2",
                    "--synthetic", "1", "--scenes", "1"], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "vlmlab.testing.samples", "--out", str(tmp_path / "b"), "--grid", "2",
                    "--synthetic", "1", "--scenes", "1"], check=True, capture_output=True)
    assert (tmp_path / "a" / "tiles.csv").read_text() == (tmp_path / "b" / "tiles.csv").read_text()
