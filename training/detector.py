"""Object detector for inspection scenes: a thin, offline wrapper around ultralytics YOLO training.

``vlmlab train detector --data data.yaml [--model yolo11n.yaml|weights.pt] [--epochs N] [--imgsz 640]
[--batch 16] [--device cpu|0] [--out RUN_DIR] [key=value ...]`` (also ``python -m training.detector``)
trains a YOLO detector on a YOLO dataset and prints the path of the best weights
(``RUN_DIR/weights/best.pt``), which ``vlmlab inspect --detector`` and the Serve ``inspect`` app load.

It never touches the network, so it runs on the lab's air-gapped nodes and in tests:

- a ``.yaml`` model builds from scratch; a ``.pt`` must be a local file (ultralytics would otherwise
  try to download a name like ``yolo11n.pt``);
- ``YOLO_OFFLINE=1`` and ``YOLO_CONFIG_DIR=RUN_DIR/ultralytics`` are set before ultralytics is first
  imported, so its settings file and font cache live in the run, not in ``$HOME``;
- ultralytics' dataset check looks for ``Arial.ttf`` in its config dir and downloads it when missing;
  a font matplotlib ships is copied there under that name instead (labels only need *a* font);
- plots are off and AMP is off unless asked for (its check downloads a reference model).

The dataset's ``data.yaml`` may say ``path: .`` (relative to the YAML); ultralytics resolves relative
paths against its own datasets folder, so a copy with the absolute root goes to ``RUN_DIR/data.yaml``.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_SUBDIR = "ultralytics"  # ultralytics settings + fonts, inside the run directory
FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")  # what ultralytics' check_font looks for
AMP_MODES = ("off", "fp16", "bf16")


@dataclass(frozen=True)
class DetectorConfig:
    """A YOLO detector training job; every field is also a ``--flag`` and a ``key=value`` override."""

    data: str = field(default="", metadata={"help": "YOLO data.yaml (train and val splits)"})
    model: str = field(default="yolo11n.yaml", metadata={"help": "architecture .yaml (from scratch) or local .pt"})
    epochs: int = field(default=100, metadata={"help": "training epochs"})
    imgsz: int = field(default=640, metadata={"help": "training image size (pixels, square)"})
    batch: int = field(default=16, metadata={"help": "images per batch"})
    device: str = field(default="", metadata={"help": "cpu | 0 | 0,1 ; empty: the first GPU if any, else cpu"})
    out: str = field(default="runs/detector", metadata={"help": "run directory: weights/, results.csv, args.yaml"})
    workers: int = field(default=2, metadata={"help": "data-loading worker processes (0: in the main process)"})
    patience: int = field(default=50, metadata={"help": "epochs without a val-mAP gain before stopping"})
    seed: int = field(default=0, metadata={"help": "random seed (ultralytics runs deterministically with it)"})
    amp: str = field(default="off", metadata={"help": "mixed precision on GPU: off | fp16 (its check downloads "
                                                      "yolo26n.pt once) | bf16 (no check)"})
    plots: bool = field(default=False, metadata={"help": "write ultralytics' PNG plots (fonts must be local)"})


def resolve_data_yaml(data: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir/data.yaml``: a copy of the YOLO data file with ``path`` made absolute.

    Ultralytics resolves a relative ``path`` against its own datasets folder, not the YAML's; the
    copy makes the dataset location explicit. Raises ``FileNotFoundError`` for a missing file.
    """
    from training.inspect_data import read_data_yaml

    data = Path(data).expanduser().resolve()
    parsed = read_data_yaml(data)  # validates names/splits and resolves the root like ultralytics would
    with open(data) as f:
        spec = yaml.safe_load(f) or {}
    spec["path"] = str(parsed["root"])
    out = Path(out_dir) / "data.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    header = f"# resolved copy of {data} (absolute path) for ultralytics; written by vlmlab train detector\n"
    out.write_text(header + yaml.safe_dump(spec, sort_keys=False))
    return out


def prepare_offline(config_dir: str | Path) -> Path:
    """Point ultralytics at ``config_dir`` for settings and fonts, and tell it it is offline.

    Must run before the first ``import ultralytics`` of the process to take effect (ultralytics reads
    ``YOLO_CONFIG_DIR`` and ``YOLO_OFFLINE`` at import); if it was imported already (a test session, a
    notebook), the settings dir in use is kept and only the font is placed there. Returns that dir.
    """
    config_dir = Path(config_dir).resolve()
    config_dir.mkdir(parents=True, exist_ok=True)
    if "ultralytics" not in sys.modules:
        os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
        os.environ["YOLO_OFFLINE"] = "1"
    import matplotlib
    from ultralytics.utils import SETTINGS, USER_CONFIG_DIR

    settings_dir = Path(USER_CONFIG_DIR)
    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in FONT_NAMES:
        if not (settings_dir / name).exists():
            shutil.copyfile(font, settings_dir / name)
    if settings_dir.is_relative_to(config_dir):
        # Our own settings file: no usage analytics, no experiment-tracker callbacks (the Ray Tune one
        # would report into whatever Ray session is around), TensorBoard on as in every vlmlab run, and
        # ultralytics' default folders inside the run rather than the current directory.
        SETTINGS.update({"sync": False, "clearml": False, "comet": False, "dvc": False, "mlflow": False,
                         "raytune": False, "wandb": False, "tensorboard": True,
                         "runs_dir": str(config_dir / "runs"), "weights_dir": str(config_dir / "weights"),
                         "datasets_dir": str(config_dir / "datasets")})
    return settings_dir


def _check_model(model: str) -> str:
    """The model argument for ``YOLO(...)``; fails early where ultralytics would try a download."""
    path = Path(model).expanduser()
    if path.suffix in (".yaml", ".yml"):
        return str(path.resolve()) if path.is_file() else model  # a file, or an ultralytics cfg name (yolo11n.yaml)
    if path.is_file():
        return str(path.resolve())
    raise FileNotFoundError(f"detector model {model!r} is neither an architecture .yaml nor a local weights file; "
                            "training runs offline, so give --model yolo11n.yaml (from scratch) or a .pt path")


def _device(device: str) -> str:
    if device:
        return device
    import torch

    return "0" if torch.cuda.is_available() else "cpu"


def train_detector(cfg: DetectorConfig) -> Path:
    """Train a YOLO detector offline; returns the best weights (``cfg.out/weights/best.pt``).

    Raises ``FileNotFoundError`` for a missing data file or model, ``ValueError`` for a bad ``amp``.
    """
    if not cfg.data:
        raise ValueError("train detector needs --data data.yaml (a YOLO dataset)")
    if cfg.amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {cfg.amp!r}")
    out = Path(cfg.out).expanduser().resolve()
    data = resolve_data_yaml(cfg.data, out)
    prepare_offline(out / CONFIG_SUBDIR)
    model_arg = _check_model(cfg.model)
    device = _device(cfg.device)

    from ultralytics import YOLO

    model = YOLO(model_arg)
    # AMP is only used on GPUs; "fp16" runs ultralytics' AMP check, "bf16" skips it.
    amp: Any = {"off": False, "fp16": True, "bf16": "bf16"}[cfg.amp] if device != "cpu" else False
    model.train(data=str(data), epochs=cfg.epochs, imgsz=cfg.imgsz, batch=cfg.batch, device=device,
                workers=cfg.workers, patience=cfg.patience, seed=cfg.seed, deterministic=True, amp=amp,
                plots=cfg.plots, project=str(out.parent), name=out.name, exist_ok=True, verbose=False)
    best = out / "weights" / "best.pt"
    if not best.is_file():
        raise RuntimeError(f"ultralytics finished without writing {best}; see {out} for its logs")
    return best


def _report(cfg: DetectorConfig, best: Path) -> None:
    print(f"best weights: {best}")
    print(f"vlmlab inspect IMAGES... --detector {best} --classifier CLASSIFIER_RUN --out OUT_DIR")


def main(argv: list[str] | None = None) -> None:
    """``vlmlab train detector``: train, then print the best weights path."""
    from training.run import job_main

    job_main(DetectorConfig, train_detector, argv, prog="vlmlab train detector",
             description=__doc__.splitlines()[0], report=_report, needs_ray=False)


if __name__ == "__main__":
    main()
