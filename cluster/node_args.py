"""Print the ``ray start`` arguments that declare this node's GPUs and GPU type.

The launcher's start commands (cluster/lab.yaml) run ``ray start ... $(python3 cluster/node_args.py)``
on each machine. Ray detects GPUs itself but names a Titan RTX differently across versions
(``TITAN``, ``TITAN-RTX``), and the ``ray.io/`` label prefix is reserved for Ray's own labels, so
the type is declared here from cluster/nodes.yaml: a custom resource (``titan_rtx``/``a30``,
amount = GPU count) and the node label ``vlmlab.io/gpu-type``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import socket
from pathlib import Path

import yaml

NODES_FILE = Path(__file__).with_name("nodes.yaml")
GPU_TYPE_LABEL = "vlmlab.io/gpu-type"


def load_nodes(path: str | Path = NODES_FILE) -> dict[str, dict]:
    """``{host: {"gpu_type": str | None, "num_gpus": int}}`` from cluster/nodes.yaml."""
    return yaml.safe_load(Path(path).read_text())["nodes"]


def ray_start_args(node: dict) -> list[str]:
    """``ray start`` arguments for one node entry: GPU count, type resource and type label."""
    args = [f"--num-gpus={int(node.get('num_gpus', 0))}"]
    if node.get("gpu_type"):
        args.append("--resources=" + json.dumps({node["gpu_type"]: int(node["num_gpus"])}))
        args.append(f"--labels={GPU_TYPE_LABEL}={node['gpu_type']}")
    return args


def this_host(nodes: dict[str, dict]) -> str:
    """The entry of ``nodes`` naming this machine (by FQDN, short hostname or IP address)."""
    names = {socket.getfqdn(), socket.gethostname()}
    try:
        names.add(socket.gethostbyname(socket.gethostname()))
    except OSError:
        pass
    for host in nodes:
        if host in names or host.split(".")[0] in names:
            return host
    raise SystemExit(f"this machine ({', '.join(sorted(names))}) is not listed in {NODES_FILE}")


def main(argv: list[str] | None = None) -> None:
    """Print this node's (or ``--host``'s) ``ray start`` arguments, shell-quoted."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--host", help="a host of cluster/nodes.yaml (default: this machine)")
    parser.add_argument("--nodes", default=str(NODES_FILE), help="nodes file")
    args = parser.parse_args(argv)
    nodes = load_nodes(args.nodes)
    host = args.host or this_host(nodes)
    if host not in nodes:
        raise SystemExit(f"unknown host {host!r}; hosts: {', '.join(nodes)}")
    print(" ".join(shlex.quote(a) for a in ray_start_args(nodes[host])))


if __name__ == "__main__":
    main()
