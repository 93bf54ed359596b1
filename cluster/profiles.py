"""Per-GPU-type profiles (``cluster/profiles.yaml``): batch size, dtype and GPU share by model size.

Extraction sizes each GPU type's actor pool from its profile; serving reads the encoder's GPU
share. One file, one loader, so a new card type is one YAML entry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

PROFILES_FILE = Path(__file__).with_name("profiles.yaml")
CPU = "cpu"
# the profile of GPUs on nodes that declare no type
GENERIC_GPU = "gpu"


@dataclass(frozen=True)
class Profile:
    """What one GPU type gets for one model size class."""

    gpu_type: str
    size: str
    batch_size: int
    gpus_per_worker: float
    dtype: str
    relative_speed: float


@lru_cache(maxsize=4)
def load_profiles(path: str | Path = PROFILES_FILE) -> dict[str, Any]:
    """The parsed profiles file."""
    return yaml.safe_load(Path(path).read_text())


def gpu_types(path: str | Path = PROFILES_FILE) -> list[str]:
    """GPU types that have a profile (the Ray resource names GPU nodes declare), without ``cpu``
    and the generic ``gpu`` profile."""
    return [name for name in load_profiles(path)["profiles"] if name not in (CPU, GENERIC_GPU)]


def model_size(spec: str, path: str | Path = PROFILES_FILE) -> str:
    """Size class (``small``/``base``/``large``) of a model spec; ``base`` when no pattern matches."""
    for size, patterns in load_profiles(path)["model_sizes"].items():
        if any(re.search(p, spec, re.IGNORECASE) for p in patterns):
            return size
    return "base"


def profile_for(gpu_type: str, spec: str, path: str | Path = PROFILES_FILE) -> Profile:
    """The profile of ``gpu_type`` (a declared GPU resource name, or ``cpu``) for model ``spec``."""
    profiles = load_profiles(path)["profiles"]
    if gpu_type not in profiles:
        raise KeyError(f"no profile for GPU type {gpu_type!r} in {path}; known: {', '.join(profiles)}")
    entry = profiles[gpu_type]
    size = model_size(spec, path)
    return Profile(gpu_type=gpu_type, size=size, batch_size=int(entry["batch_size"][size]),
                   gpus_per_worker=float(entry["gpus_per_worker"][size]), dtype=str(entry["dtype"]),
                   relative_speed=float(entry["relative_speed"]))
