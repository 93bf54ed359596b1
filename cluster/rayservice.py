"""Write k8s/rayservice.yaml from the files it must agree with.

A RayService carries a Serve config and a cluster spec; both already exist
(serving/config.yaml, k8s/raycluster.yaml), so the manifest is generated rather than edited. The
applications' arguments that differ per deployment (the search ``store``, the inspect
``detector``/``classifier``, the vlm ``model``/``adapter``) are set in k8s/rayservice-values.yaml
and merged into the Serve config's ``args`` here, its comments kept:

    python -m cluster.rayservice          # rewrite k8s/rayservice.yaml
    python -m cluster.rayservice --check  # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import yaml

from cluster.generated import write_or_check

REPO = Path(__file__).resolve().parents[1]
SERVE_CONFIG = REPO / "serving" / "config.yaml"
RAYCLUSTER = REPO / "k8s" / "raycluster.yaml"
RAYSERVICE = REPO / "k8s" / "rayservice.yaml"
VALUES = REPO / "k8s" / "rayservice-values.yaml"

HEADER = """\
# Search and inspection endpoints as a KubeRay RayService (zero-downtime upgrades of the Serve apps):
#   python -m cluster.rayservice               # regenerate this file after editing its sources
#   kubectl apply -f k8s/rayservice.yaml
#   kubectl port-forward svc/vlmlab-serve-svc 8000:8000 && open http://127.0.0.1:8000/
# Generated from serving/config.yaml (serveConfigV2), k8s/rayservice-values.yaml (the applications'
# args: store, detector, model, ...) and k8s/raycluster.yaml (rayClusterConfig, whose image holds
# the code and every dependency): do not edit by hand.
"""


LOOPBACK = "  host: 127.0.0.1"
ALL_INTERFACES = "  host: 0.0.0.0  # set by cluster/rayservice.py: the cluster's service reaches the proxies"
APP_LINE = re.compile(r"^\s*- name: (?P<name>\S+)\s*(#.*)?$")
ARGS_LINE = re.compile(r"^(?P<indent>\s*)args:\s*(#.*)?$")
KEY_LINE = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_]\w*):(?P<rest>.*)$")
Scalar = str | int | float | bool | None


class _Dumper(yaml.SafeDumper):
    """A safe dumper that writes multi-line strings as literal blocks, so the embedded Serve config
    reads (comments included) as it does in serving/config.yaml."""


def _str_representer(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    """Multi-line strings as ``|`` blocks, others as usual."""
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_Dumper.add_representer(str, _str_representer)


def load_values(path: str | Path = VALUES) -> dict[str, dict[str, Scalar]]:
    """``{application: {arg: value}}`` from k8s/rayservice-values.yaml (values are YAML scalars)."""
    values = (yaml.safe_load(Path(path).read_text()) or {}).get("applications") or {}
    for app, args in values.items():
        for key, value in (args or {}).items():
            if not isinstance(value, Scalar):
                raise ValueError(f"{path}: applications.{app}.{key} must be a string, number, bool or null")
    return {app: dict(args or {}) for app, args in values.items()}


def _replace_value(line: str, old: Any, new: Scalar) -> str:
    """``line`` (``key: old  # comment``) with its value replaced by ``new``, the comment kept."""
    match = KEY_LINE.match(line)
    rest = match["rest"]
    # the value ends at the first ` #` that leaves a YAML value equal to the parsed one (a `#` inside a
    # quoted value is not a comment)
    for end in [m.start() for m in re.finditer(r"\s+#", rest)] + [len(rest)]:
        try:
            if yaml.safe_load(rest[:end] or "null") == old:
                return f"{match['indent']}{match['key']}: {json.dumps(new)}{rest[end:]}"
        except yaml.YAMLError:
            continue
    raise ValueError(f"cannot find the value of {line.strip()!r}")


def merge_app_args(serve_config: str, values: dict[str, dict[str, Scalar]]) -> str:
    """The Serve config text with each ``values[app][arg]`` written into that application's ``args``.

    Only the value on the arg's own line changes, so the config's comments stay. An application or
    arg that the Serve config does not have raises ``ValueError`` (a typo must not be dropped).
    """
    parsed = {app["name"]: app for app in yaml.safe_load(serve_config)["applications"]}
    for app, args in values.items():
        if app not in parsed:
            raise ValueError(f"{VALUES.name}: no application {app!r} in {SERVE_CONFIG.name} ({', '.join(parsed)})")
        unknown = set(args) - set(parsed[app].get("args") or {})
        if unknown:
            raise ValueError(f"{VALUES.name}: {app} has no arg {', '.join(sorted(unknown))} in {SERVE_CONFIG.name} "
                             f"(args: {', '.join(parsed[app].get('args') or {})}); add it there first")
    lines = serve_config.splitlines(keepends=True)
    # the applications are the `- name:` items of the outermost list; deployments' are deeper
    app, app_indent, args_indent, key_indent = None, None, None, None
    for i, line in enumerate(lines):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        if args_indent is not None and indent <= args_indent:
            args_indent = key_indent = None
        if (found := APP_LINE.match(line)) and args_indent is None and indent == (app_indent or indent):
            app, app_indent = found["name"], indent
        elif (found := ARGS_LINE.match(line)) and args_indent is None:
            args_indent = len(found["indent"])
        elif args_indent is not None and (key_indent is None or indent == key_indent):
            key_indent = indent
            key = KEY_LINE.match(line)["key"]
            if key in values.get(app, {}):
                lines[i] = _replace_value(line.rstrip("\n"), parsed[app]["args"][key], values[app][key]) + "\n"
    merged = "".join(lines)
    for name, app_config in {a["name"]: a for a in yaml.safe_load(merged)["applications"]}.items():
        expected = {**(parsed[name].get("args") or {}), **values.get(name, {})}
        if (app_config.get("args") or {}) != expected:  # the line edits must amount to exactly the merge
            raise ValueError(f"merging {VALUES.name} into {SERVE_CONFIG.name} went wrong for application {name!r}")
    return merged


def render_rayservice() -> str:
    """The RayService manifest text built from the Serve config, its values and the RayCluster spec.

    The Serve config listens on loopback (right for one machine); in a pod the proxies must listen on
    every interface for the Kubernetes service to reach them, so the host is set to 0.0.0.0 here.
    """
    serve_config = SERVE_CONFIG.read_text()
    if serve_config.count(LOOPBACK + "\n") != 1:
        raise ValueError(f"{SERVE_CONFIG}: expected one http_options line {LOOPBACK.strip()!r} to open up")
    serve_config = serve_config.replace(LOOPBACK + "\n", ALL_INTERFACES + "\n")
    serve_config = merge_app_args(serve_config, load_values())
    cluster = yaml.safe_load(RAYCLUSTER.read_text())
    service = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": "vlmlab-serve"},
        "spec": {
            "serveConfigV2": serve_config,
            "rayClusterConfig": cluster["spec"],
        },
    }
    return HEADER + yaml.dump(service, Dumper=_Dumper, sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> None:
    """Rewrite (or ``--check``) k8s/rayservice.yaml."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the file is out of date")
    args = parser.parse_args(argv)
    write_or_check(RAYSERVICE, render_rayservice(), "python -m cluster.rayservice", args.check)


if __name__ == "__main__":
    main()
