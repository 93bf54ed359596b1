"""Every YAML file in the repository parses and opens with a comment giving the command that uses it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def repo_yaml_files() -> list[Path]:
    """YAML files tracked or about to be tracked by git (not .venv, caches or outputs)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.yaml", "*.yml"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()
    return [REPO / p for p in out if (REPO / p).is_file()]


def test_there_are_yaml_files():
    names = {p.relative_to(REPO).as_posix() for p in repo_yaml_files()}
    assert {"cluster/lab.yaml", "k8s/raycluster.yaml"} <= names


@pytest.mark.parametrize("path", repo_yaml_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_yaml_parses_and_says_how_to_use_it(path):
    text = path.read_text()
    docs = list(yaml.safe_load_all(text))
    assert docs and all(d is not None for d in docs)
    first = text.lstrip().splitlines()[0]
    assert first.startswith("#"), f"{path} should open with a comment giving the command that uses it"
    head = "\n".join(line for line in text.splitlines()[:8] if line.startswith("#"))
    assert any(word in head for word in ("vlmlab", "ray ", "serve ", "kubectl", "python", "make")), path
