"""Session fixtures: the sample data and the tiny model are built once and shared.

The tiny model is also cached across pytest runs in ``.cache/`` keyed by a hash of the code
that builds it, so repeated local runs skip its ~40 s of training; a fresh clone builds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"
TINY_REPO_ID = "vlmlab/tiny-clip"
# huggingface_hub reads these when first imported: set them before anything imports it. The
# machine is offline; the hub cache is where the tiny model is placed as if downloaded.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = str(CACHE / "hf-hub")
# ultralytics reads these at import: no network checks, its settings file under .cache/, not $HOME.
os.environ["YOLO_OFFLINE"] = "1"
os.environ["YOLO_CONFIG_DIR"] = str(CACHE / "ultralytics")

import pytest  # noqa: E402
import torch  # noqa: E402

from cluster.node_args import GPU_TYPE_LABEL  # noqa: E402


def _code_key(*files: str) -> str:
    h = hashlib.sha1()
    for f in files:
        h.update((REPO / f).read_bytes())
    return h.hexdigest()[:12]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def samples_dir(tmp_path_factory) -> Path:
    """A `vlmlab samples` directory with the default config (seed 0)."""
    from vlmlab.testing.samples import build_samples

    out = tmp_path_factory.mktemp("samples")
    build_samples(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(samples_dir) -> str:
    """Path (a model spec) of the tiny CLIP model trained on the sample tiles."""
    from vlmlab.testing.tiny import build_tiny_model

    key = _code_key("vlmlab/testing/tiny.py", "vlmlab/testing/samples.py", "vlmlab/prompts.py")
    cached = CACHE / f"tiny-clip-{key}"
    if not (cached / "tiny_report.json").exists():
        tmp = CACHE / f".tiny-clip-{key}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        build_tiny_model(tmp, samples_dir)
        shutil.rmtree(cached, ignore_errors=True)
        tmp.rename(cached)
    return str(cached)


@pytest.fixture(scope="session")
def relabelled_pairs(samples_dir) -> Path:
    """A pairs file of the sample images whose captions name the NEXT rock class (basalt tiles read
    "a tile of granite", ...): a caption task the tiny model gets wrong until it is fine-tuned."""
    import pandas as pd

    from vlmlab.testing.samples import ROCK_CLASSES

    names = list(ROCK_CLASSES)
    renamed = {name: names[(i + 1) % len(names)] for i, name in enumerate(names)}
    pairs = pd.read_parquet(samples_dir / "pairs.parquet")
    pairs["caption"] = [f"a tile of {renamed[label]}" for label in pairs["label"]]
    out = samples_dir / "pairs_relabelled.parquet"
    pairs.to_parquet(out)
    return out


@pytest.fixture(scope="session")
def hub_cache(tiny_model) -> Path:
    """The offline Hugging Face cache (HF_HUB_CACHE), holding the tiny model as ``vlmlab/tiny-clip``."""
    from vlmlab.testing.tiny import seed_hub_cache

    cache = Path(os.environ["HF_HUB_CACHE"])
    seed_hub_cache(tiny_model, TINY_REPO_ID, cache)
    return cache


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now (for Serve and Ray heads started by tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(image) -> bytes:
    """``image`` (PIL) encoded as PNG bytes, as an upload carries it."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


RAY_OBJECT_STORE_BYTES = 600 * 1024**2  # small: several test processes may share this 2-core machine


def start_local_ray() -> None:
    """Start the embedded local Ray the tests share (2 CPUs, small object store)."""
    import ray

    if not ray.is_initialized():
        # address="local": always our own instance, even when another Ray runs on this machine
        ray.init(address="local", num_cpus=2, object_store_memory=RAY_OBJECT_STORE_BYTES, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray (``ray.init(num_cpus=2)``) shared by every test that needs one."""
    import ray

    start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture()
def ray_two_gpu_types():
    """A real two-node ``ray.cluster_utils.Cluster``: one node declaring ``titan_rtx``, one ``a30``
    (CPU-backed, as on a laptop), connected as the driver's cluster. Restores ``ray_local`` after."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    head = {"num_cpus": 1, "object_store_memory": RAY_OBJECT_STORE_BYTES}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    for gpu_type in ("titan_rtx", "a30"):  # declared as cluster/node_args.py declares them
        cluster.add_node(num_cpus=1, resources={gpu_type: 1}, labels={GPU_TYPE_LABEL: gpu_type},
                         object_store_memory=RAY_OBJECT_STORE_BYTES)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _extract_store(images: Path, model: str, out: Path, source: str) -> Path:
    from pipelines.extract import ExtractConfig, extract

    start_local_ray()
    extract(ExtractConfig(images=str(images), model=model, out=str(out), source=source, readers=1))
    return out


@pytest.fixture(scope="session")
def sample_store(samples_dir, tiny_model, tmp_path_factory) -> Path:
    """A store of the 256 sample tiles (source ``real``) extracted with the tiny model by the
    real pipeline (``pipelines.extract`` on the shared local Ray)."""
    return _extract_store(samples_dir / "tiles", tiny_model, tmp_path_factory.mktemp("stores") / "tiles", "real")


@pytest.fixture(scope="session")
def synthetic_store(samples_dir, tiny_model, tmp_path_factory) -> Path:
    """A store of the 48 synthetic sample images (source ``synthetic``), extracted like ``sample_store``."""
    return _extract_store(samples_dir / "synthetic", tiny_model, tmp_path_factory.mktemp("stores") / "synthetic",
                          "synthetic")


class NetworkBlocked:
    """Context manager: connections and DNS lookups beyond this machine raise; ``attempts`` lists them."""

    LOOPBACK = ("127.0.0.1", "::1", "localhost")

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def __enter__(self) -> NetworkBlocked:
        import socket

        real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo
        attempts, loopback = self.attempts, self.LOOPBACK

        def connect(sock, address):
            host = str(address[0]) if isinstance(address, tuple) else str(address)
            if sock.family in (socket.AF_INET, socket.AF_INET6) and host not in loopback:
                attempts.append(host)
                raise OSError(f"network disabled: connect to {address}")
            return real_connect(sock, address)

        def getaddrinfo(host, *args, **kwargs):
            if host is not None and host not in loopback:
                attempts.append(str(host))
                raise socket.gaierror(f"network disabled: lookup of {host}")
            return real_getaddrinfo(host, *args, **kwargs)

        self._patch = pytest.MonkeyPatch()
        self._patch.setattr(socket.socket, "connect", connect)
        self._patch.setattr(socket, "getaddrinfo", getaddrinfo)
        return self

    def __exit__(self, *exc) -> None:
        self._patch.undo()


@pytest.fixture(scope="session")
def tiny_detector(samples_dir, tmp_path_factory) -> Path:
    """Best weights of a YOLO detector trained one tiny epoch (imgsz 128, CPU) on the sample inspection
    scenes with the network cut off (fails if training tried to reach anything).

    One epoch from scratch finds little; inference with a very low ``conf`` still yields boxes.
    """
    from training.detector import DetectorConfig, train_detector

    out = tmp_path_factory.mktemp("detector") / "run"
    cfg = DetectorConfig(data=str(samples_dir / "inspection" / "data.yaml"), model="yolo11n.yaml", epochs=1,
                         imgsz=128, batch=8, workers=0, device="cpu", out=str(out))
    with NetworkBlocked() as network:
        best = train_detector(cfg)
    assert network.attempts == [], f"detector training tried to reach {network.attempts}"
    return best


class BusyCPU:
    """Context manager: ``n`` processes spinning on the CPU beside the test (a deliberately loaded
    machine, so that a guarantee tested inside holds without an idle core)."""

    def __init__(self, n: int = 2) -> None:
        self.n = n
        self.procs: list = []

    def __enter__(self) -> BusyCPU:
        import subprocess
        import sys

        spin = "import hashlib\nb = b'x' * 4096\nwhile True:\n    b = hashlib.sha256(b).digest() * 128\n"
        self.procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(self.n)]
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait()


@pytest.fixture()
def busy_cpu():
    """A process keeps a core busy for the duration of the test (on 2 cores: half the machine gone, so
    actors start late and at uneven speeds; two spinners made a 64-image run take minutes)."""
    with BusyCPU(1) as busy:
        yield busy


@pytest.fixture(scope="session")
def relabelled_labels(samples_dir) -> Path:
    """A ``path,label`` CSV of the sample tiles in which each tile carries the NEXT rock class's name
    (basalt tiles are "granite", ...): labels the text prompts describe wrongly, so the tiny model gets
    them all wrong zero-shot while a few labelled embeddings per class fix it."""
    import pandas as pd

    from vlmlab.testing.samples import ROCK_CLASSES

    names = list(ROCK_CLASSES)
    renamed = {name: names[(i + 1) % len(names)] for i, name in enumerate(names)}
    tiles = pd.read_csv(samples_dir / "tiles.csv")
    out = samples_dir / "tiles_relabelled.csv"
    pd.DataFrame({"path": tiles["path"], "label": tiles["label"].map(renamed)}).to_csv(out, index=False)
    return out


@pytest.fixture(scope="session")
def tiny_vlm() -> str:
    """Path (a VLM spec) of the tiny Qwen2-VL trained on procedural scenes, cached in .cache/ like the tiny CLIP."""
    from vlmlab.testing.tiny_vlm import build_tiny_vlm

    key = _code_key("vlmlab/testing/tiny_vlm.py", "vlmlab/testing/nlvr.py", "vlmlab/nlvr.py")
    cached = CACHE / f"tiny-vlm-{key}"
    if not (cached / "tiny_vlm_report.json").exists():
        tmp = CACHE / f".tiny-vlm-{key}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        build_tiny_vlm(tmp)
        shutil.rmtree(cached, ignore_errors=True)
        tmp.rename(cached)
    return str(cached)


@pytest.fixture(scope="session")
def nlvr_data(samples_dir, tmp_path_factory) -> Path:
    """The sample set's procedural NLVR (``samples/nlvr``, lil-lab layout) prepared by ``vlmlab vlm data``."""
    from pipelines.nlvr2 import DataConfig, prepare

    out = tmp_path_factory.mktemp("nlvr") / "data"
    prepare(DataConfig(source=str(samples_dir / "nlvr"), out=str(out)))
    return out


@pytest.fixture(scope="session")
def textures_dir(tmp_path_factory) -> Path:
    """A `vlmlab samples textures` set: real skimage photographs, intact and with drawn defects (YOLO
    layout + labels.csv)."""
    from vlmlab.testing.textures import build_texture_set

    out = tmp_path_factory.mktemp("textures")
    build_texture_set(out)
    return out


@contextlib.contextmanager
def headless_chromium(width: int = 1300, height: int = 900):
    """A headless Debian Chromium driven by selenium (no browser download; `make setup` installs it),
    allowed to read file:// pages and their images. Quits on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not Path("/usr/bin/chromium").exists():
        pytest.fail("Chromium is missing: `make setup` installs it (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--window-size={width},{height}",
                 "--disable-dev-shm-usage", "--allow-file-access-from-files"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def all_images_loaded(driver) -> bool:
    """Whether every <img> of the page in ``driver`` has loaded with a width (none broken)."""
    from selenium.webdriver.common.by import By

    return all(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 0
               for img in driver.find_elements(By.TAG_NAME, "img"))
