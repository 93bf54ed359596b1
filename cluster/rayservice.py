"""Write k8s/rayservice.yaml from the two files it must agree with.

A RayService carries a Serve config and a cluster spec; both already exist
(serving/config.yaml, k8s/raycluster.yaml), so the manifest is generated rather than edited:

    python -m cluster.rayservice          # rewrite k8s/rayservice.yaml
    python -m cluster.rayservice --check  # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SERVE_CONFIG = REPO / "serving" / "config.yaml"
RAYCLUSTER = REPO / "k8s" / "raycluster.yaml"
RAYSERVICE = REPO / "k8s" / "rayservice.yaml"

HEADER = """\
# Search and inspection endpoints as a KubeRay RayService (zero-downtime upgrades of the Serve apps):
#   python -m cluster.rayservice               # regenerate this file after editing its sources
#   kubectl apply -f k8s/rayservice.yaml
#   kubectl port-forward svc/vlmlab-serve-svc 8000:8000 && open http://127.0.0.1:8000/
# Generated from serving/config.yaml (serveConfigV2) and k8s/raycluster.yaml (rayClusterConfig):
# do not edit by hand.
"""


LOOPBACK = "  host: 127.0.0.1"
ALL_INTERFACES = "  host: 0.0.0.0  # set by cluster/rayservice.py: the cluster's service reaches the proxies"


def render_rayservice() -> str:
    """The RayService manifest text built from the Serve config and the RayCluster spec.

    The Serve config listens on loopback (right for one machine); in a pod the proxies must listen on
    every interface for the Kubernetes service to reach them, so the host is set to 0.0.0.0 here.
    """
    serve_config = SERVE_CONFIG.read_text()
    if serve_config.count(LOOPBACK + "\n") != 1:
        raise ValueError(f"{SERVE_CONFIG}: expected one http_options line {LOOPBACK.strip()!r} to open up")
    serve_config = serve_config.replace(LOOPBACK + "\n", ALL_INTERFACES + "\n")
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
    return HEADER + yaml.safe_dump(service, sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> None:
    """Rewrite (or ``--check``) k8s/rayservice.yaml."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the file is out of date")
    args = parser.parse_args(argv)
    text = render_rayservice()
    if args.check:
        if not RAYSERVICE.exists() or RAYSERVICE.read_text() != text:
            print(f"{RAYSERVICE} is out of date: run python -m cluster.rayservice", file=sys.stderr)
            raise SystemExit(1)
        return
    RAYSERVICE.write_text(text)
    print(f"wrote {RAYSERVICE}")


if __name__ == "__main__":
    main()
