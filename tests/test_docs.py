"""The documentation cannot drift from the code.

- README.md's walkthrough block is exactly what ``make demo`` runs (pipelines.demo.WALKTHROUGH), and the
  demo runs every one of those commands as written, failing on any that exits non-zero or prints a path
  it did not write (tests/test_demo.py runs the demo).
- Every ``vlmlab ...`` and ``python -m ...`` command anywhere in README.md's code blocks, and every form
  shown in a verb's docstring, names a real verb, and every ``--flag`` and ``key=value`` it uses is one
  that verb accepts (checked against the verb's own argument parser and config).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest

from vlmlab.cli import VERBS

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
SHELL_BLOCK = re.compile(r"^```(?:bash|sh|console|shell)?\n(.*?)^```", re.M | re.S)


def shell_commands(text: str) -> list[str]:
    """Commands of the shell code blocks of a Markdown text: continuation lines joined, comments dropped."""
    commands = []
    for block in SHELL_BLOCK.findall(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                words = line.split()
            if words:
                commands.append(" ".join(shlex.quote(w) for w in words))
    return commands


def _verb_of(words: list[str]) -> tuple[str, list[str]] | None:
    if words[0] == "vlmlab":
        for n in range(max(len(v.split()) for v in VERBS), 0, -1):
            verb = " ".join(words[1:1 + n])
            if verb in VERBS:
                return VERBS[verb][0], words[1 + n:]
        raise AssertionError(f"unknown verb in {' '.join(words)!r}")
    if words[:2] == ["python", "-m"] and len(words) > 2:
        return words[2], words[3:]
    return None


_HELP: dict[str, str] = {}  # help text per module, computed once


def verb_help(module_name: str) -> str:
    """The ``--help`` text of a verb's module (what its argument parser accepts)."""
    if module_name not in _HELP:
        module = importlib.import_module(module_name)
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            module.main(["--help"])
        _HELP[module_name] = out.getvalue()
    return _HELP[module_name]


def config_fields(module_name: str) -> set[str]:
    """Every field name (dotted and short) of the config dataclasses a verb's module declares."""
    from vlmlab.config import _field_names

    module = importlib.import_module(module_name)
    names: set[str] = set()
    for value in vars(module).values():
        if dataclasses.is_dataclass(value) and isinstance(value, type) and value.__module__ == module.__name__:
            for name in _field_names(value):
                names.update({name, name.rsplit(".", 1)[-1]})
    return names


def check_command(command: str) -> None:
    """Assert that a documented command's verb exists and that it accepts every flag and override used."""
    words = shlex.split(command)
    found = _verb_of(words)
    if found is None:
        return
    module_name, args = found
    text = verb_help(module_name)
    accepted = set(re.findall(r"(?<![\w-])(-{1,2}[a-z][\w-]*)", text))
    after_flag = False
    for raw in args:
        word = raw.strip("[]()|")  # a synopsis marks optional parts and alternatives
        flag = word.split("=", 1)[0]
        if word in ("", "&", "|") or word.endswith("..."):
            after_flag = False
        elif flag.startswith("-") and not re.fullmatch(r"-?\d+(\.\d+)?", flag):
            assert flag in accepted, f"{command!r}: {flag} is not a flag of {module_name} ({sorted(accepted)})"
            after_flag = "=" not in word
        elif re.fullmatch(r"[a-z_][a-z0-9_.]*=.*", word) and not after_flag:  # a key=value override
            key = word.split("=", 1)[0]
            fields = config_fields(module_name)
            assert key in fields or key.rsplit(".", 1)[-1] in fields, \
                f"{command!r}: {key}= is no config field of {module_name}"
        else:
            after_flag = False


def docstring_forms() -> list[str]:
    """The ``vlmlab ...`` forms every verb's module shows in its docstrings."""
    forms = []
    for module_name in sorted({m for m, _ in VERBS.values()}):
        module = importlib.import_module(module_name)
        text = (module.__doc__ or "") + (module.main.__doc__ or "")
        for form in re.findall(r"``(vlmlab [^`]+)``", text):
            if not any(ch in form for ch in "[]") and "..." not in form:
                forms.append(form)
            else:  # a synopsis: drop the optional parts, check what is left
                forms.append(re.sub(r"\[[^\[\]]*\]", "", re.sub(r"\[[^\[\]]*\]", "", form)).replace("...", ""))
    return forms


def test_readme_walkthrough_is_what_the_demo_runs():
    from pipelines.demo import WALKTHROUGH

    block = next((b for b in SHELL_BLOCK.findall(README) if "vlmlab samples --out samples" in b), None)
    assert block is not None, "README.md has no walkthrough block"
    documented = shell_commands(f"```bash\n{block}```\n")
    assert documented == [" ".join(shlex.quote(w) for w in shlex.split(c)) for _, c in WALKTHROUGH]


@pytest.mark.parametrize("command", sorted(set(shell_commands(README))))
def test_every_readme_command_uses_real_verbs_and_flags(command):
    check_command(command)


def test_every_verb_docstring_form_uses_real_flags():
    forms = docstring_forms()
    assert len(forms) >= len(VERBS) // 2  # most verbs show their form
    for form in forms:
        check_command(form)
