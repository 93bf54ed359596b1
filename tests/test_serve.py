"""The search application on a real local Ray Serve, over HTTP on 127.0.0.1, with the tiny model.

One module fixture deploys serving/config.yaml (the shipped file, pointed at the sample store,
GPUs and CPUs scaled down for this machine); every test talks to it over HTTP.
"""

from __future__ import annotations

import base64
import csv
import io
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import free_port
from vlmlab.testing.samples import ROCK_CLASSES

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "bench" / "out" / "serve_page.png"
UPLOAD_LIMIT = 64 * 1024
SMALL = {"ray_actor_options": {"num_gpus": 0, "num_cpus": 0.1}}
# Autoscaling off in tests: a fixed replica set keeps the replica-kill test deterministic.
FIXED = {**SMALL, "autoscaling_config": None, "num_replicas": 1}


@pytest.fixture(scope="module")
def labels(samples_dir) -> dict[str, str]:
    """Tile path (as stored, relative to the samples dir) -> rock class."""
    with open(samples_dir / "tiles.csv") as f:
        return {row["path"]: row["label"] for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def probe_dir(sample_store, samples_dir, tmp_path_factory) -> Path:
    """A calibrated 4-shot logistic probe of the six rock classes on the sample store (vlmlab train probe)."""
    from vlmlab.probe import train_probe

    out = tmp_path_factory.mktemp("probe") / "rocks"
    train_probe(sample_store, samples_dir / "tiles.csv", out, shots=4, templates="rocks", calibration_fraction=0.5)
    return out


@pytest.fixture(scope="module")
def served(ray_local, sample_store, probe_dir):
    """(base URL, store path) of the search app deployed from serving/config.yaml (with a probe)."""
    from ray import serve

    from serving.common import deploy_config
    from vlmlab.store import EmbeddingStore

    port = free_port()
    from vlmlab.index import SearchIndex, build_index

    try:
        SearchIndex.load(EmbeddingStore.open(sample_store))
    except Exception:
        build_index(EmbeddingStore.open(sample_store))
    serve.shutdown()  # a Serve left by another module would keep its own HTTP port
    options = {name: FIXED for name in ("QueryEncoder", "IndexReader", "SearchAPI")}
    deploy_config(app_args={"store": str(sample_store), "max_upload_bytes": UPLOAD_LIMIT, "max_batch_size": 8,
                           "batch_wait_timeout_s": 0.02, "probe": str(probe_dir)},
                 host="127.0.0.1", port=port, deployment_options=options)
    yield f"http://127.0.0.1:{port}", Path(sample_store)
    serve.shutdown()


@pytest.fixture(scope="module")
def client(served):
    with httpx.Client(base_url=served[0], timeout=60) as c:
        yield c


def _label_of(hit: dict, labels: dict[str, str]) -> str | None:
    return next((lab for path, lab in labels.items() if hit["path"].endswith(path) or path.endswith(hit["path"])),
                None)


def test_search_ranks_the_described_class_first(client, labels):
    correct = 0
    for label, descriptions in ROCK_CLASSES.items():
        r = client.post("/search", json={"text": descriptions[0], "k": 5})
        assert r.status_code == 200, r.text
        hits = r.json()["hits"]
        assert len(hits) == 5
        scores = [h["score"] for h in hits]
        assert scores == sorted(scores, reverse=True)
        assert all(h["thumb_url"] == f"thumb/{h['id']}" and h["similar_url"] == f"similar/{h['id']}" for h in hits)
        correct += _label_of(hits[0], labels) == label
    # 6 classes: chance is 1/6; the tiny model gets nearly all of them.
    assert correct >= 5, f"{correct}/6 classes ranked first"


def test_combined_and_filtered_queries(client, labels):
    r = client.post("/search", json={"text": "layered sandstone", "negative": "granite crystals", "k": 10,
                                     "source": "real"})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert hits and all(h["source"] == "real" for h in hits)
    assert sum(_label_of(h, labels) == "granite" for h in hits) == 0
    r = client.post("/search", json={"text": "layered sandstone", "k": 10, "source": "real",
                                     "where": "tile_x < 65540 or tile_y = 43690"})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert len(hits) == 10 and all(h["tile_x"] < 65540 or h["tile_y"] == 43690 for h in hits)


def test_image_query_similar_thumb_classify_healthz(client, labels, samples_dir, sample_store):
    from vlmlab.store import EmbeddingStore

    by_label: dict[str, list[str]] = {}
    for path, lab in labels.items():
        by_label.setdefault(lab, []).append(path)
    # image query: a tile finds tiles of its class
    path = by_label["basalt"][0]
    b64 = base64.b64encode((samples_dir / path).read_bytes()).decode()
    hits = client.post("/search", json={"image": b64, "k": 5}).json()["hits"]
    assert sum(_label_of(h, labels) == "basalt" for h in hits) >= 4
    assert hits[0]["score"] > 0.999  # the tile itself is in the store

    # similar: excludes the query image, neighbours share its class
    first = hits[0]
    r = client.get(f"/similar/{first['id']}", params={"k": 5})
    assert r.status_code == 200, r.text
    sim = r.json()["hits"]
    assert len(sim) == 5 and first["id"] not in [h["id"] for h in sim]
    assert sum(_label_of(h, labels) == "basalt" for h in sim) >= 4

    # thumb: a PNG no larger than the thumbnail size
    r = client.get(f"/thumb/{first['id']}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    thumb = Image.open(io.BytesIO(r.content))
    assert max(thumb.size) <= 128

    # classify: zero-shot over the six classes, on two tiles of each
    classes = list(ROCK_CLASSES)
    correct = total = 0
    for label in classes:
        for tile in by_label[label][:2]:
            r = client.post("/classify", files={"image": ("t.png", (samples_dir / tile).read_bytes(), "image/png")},
                            data={"classes": ",".join(classes)})
            assert r.status_code == 200, r.text
            body = r.json()
            assert abs(sum(body["probs"]) - 1) < 1e-4
            correct += body["top"] == label
            total += 1
    assert correct / total >= 0.75, f"classify accuracy {correct}/{total} (chance 1/6)"

    # healthz, docs and the page
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["vectors"] == EmbeddingStore.open(sample_store).count()
    assert client.get("/docs").status_code == 200
    assert "/search" in client.get("/openapi.json").json()["paths"]
    assert "search-form" in client.get("/").text
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/static/../search.py").status_code == 404


def test_concurrent_queries_share_encoder_batches(client):
    texts = [d for ds in ROCK_CLASSES.values() for d in ds]
    errors: list[int] = []

    def one(text: str) -> None:
        r = client.post("/search", json={"text": text, "k": 3})
        if r.status_code != 200:
            errors.append(r.status_code)

    threads = [threading.Thread(target=one, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = client.get("/stats").json()
    assert stats["max_batch"] > 1, stats


@pytest.mark.parametrize(
    "method,url,kwargs,status,reason",
    [
        ("post", "/search", {"json": {"text": "  "}}, 400, "empty query"),
        ("post", "/search", {"json": {}}, 400, "empty query"),
        ("post", "/search", {"json": {"text": "granite", "k": 0}}, 400, "k must be"),
        ("post", "/search", {"json": {"text": "granite", "k": 1000}}, 400, "k must be"),
        ("post", "/search", {"json": {"image": "not base64!!"}}, 400, "base64"),
        ("post", "/search", {"json": {"image": base64.b64encode(b"plain text, not an image").decode()}}, 400,
         "decoded"),
        ("post", "/search", {"json": {"text": "granite", "source": "drawn"}}, 400, "source"),
        ("post", "/search", {"json": {"text": "granite", "where": "nonsense ==="}}, 400, "filter"),
        ("post", "/search", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 422,
         "json"),
        ("get", "/similar/123456789", {}, 404, "unknown id"),
        ("get", "/thumb/123456789", {}, 404, "unknown id"),
        ("get", "/similar/abc", {}, 422, "int"),
        ("post", "/classify", {"files": {"image": ("x.png", b"\x89PNG broken", "image/png")},
                               "data": {"classes": "a,b"}}, 400, "decoded"),
        ("post", "/classify", {"files": {"image": ("x.png", b"", "image/png")}, "data": {"classes": "a,b"}}, 400,
         "empty"),
        ("post", "/classify", {"files": {"image": ("x.png", b"0" * (UPLOAD_LIMIT + 10), "image/png")},
                               "data": {"classes": "a,b"}}, 413, "limit"),
        ("post", "/classify", {"data": {"classes": "a,b"}}, 422, "image"),
        ("post", "/classify", {"files": {"image": ("x.png", b"x", "image/png")}, "data": {"classes": "one"}}, 400,
         "two"),
        ("post", "/search", {"json": {"txt": "granite"}}, 422, "txt"),
        ("post", "/search", {"json": {"text": "granite " * 2000}}, 400, "limit"),
        ("post", "/search", {"json": {"text": "granite", "negative": ["moss"] * 500}}, 400, "limit"),
        ("post", "/search", {"json": {"text": "granite", "where": "(" * 3000 + "tile_z=1" + ")" * 3000}}, 400,
         "limit"),
        ("post", "/search", {"json": {"text": "granite", "where": "NOT " * 50 + "tile_z = 1"}}, 400, "deeper"),
        ("post", "/search", {"json": {"text": "granite", "where": "tile_z = 99999999999999999999"}}, 400, "range"),
        ("get", "/similar/1?where=" + "NOT%20" * 50 + "tile_z%3D1", {}, 400, "deeper"),
        ("post", "/classify", {"files": {"image": ("x.png", b"x", "image/png")},
                               "data": {"classes": ",".join(f"c{i}" for i in range(500))}}, 400, "limit"),
        ("post", "/classify", {"files": {"image": ("x.png", b"x", "image/png")},
                               "data": {"classes": "a," + "b" * 5000}}, 400, "limit"),
    ],
    ids=["blank-text", "no-query", "k-zero", "k-large", "bad-base64", "not-image", "bad-source", "bad-filter",
         "malformed-json", "unknown-similar", "unknown-thumb", "non-int-id", "corrupt-upload", "empty-upload",
         "upload-too-large", "no-upload", "one-class", "unknown-field", "long-text", "many-negatives",
         "deep-filter", "not-negation", "huge-int", "similar-deep-filter", "many-classes", "long-class"],
)
def test_bad_input_gets_4xx_with_reason(client, method, url, kwargs, status, reason):
    r = getattr(client, method)(url, **kwargs) if method == "get" else client.request("POST", url, **kwargs)
    assert r.status_code == status, r.text
    assert reason.lower() in r.text.lower(), r.text


def test_classify_with_the_apps_probe_returns_calibrated_prediction_sets(client, labels, samples_dir, probe_dir):
    from vlmlab.probe import load_probe

    probe = load_probe(probe_dir)
    by_label: dict[str, list[str]] = {}
    for path, lab in labels.items():
        by_label.setdefault(lab, []).append(path)
    correct = total = 0
    for label in probe.classes:
        for tile in by_label[label][-2:]:
            r = client.post("/classify", files={"image": ("t.png", (samples_dir / tile).read_bytes(), "image/png")},
                            data={"conformal": "0.1"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["classes"] == probe.classes and abs(sum(body["probs"]) - 1) < 1e-6
            assert body["probe"] == {"method": "logistic", "shots": 24, "calibrated": True}
            assert body["prediction_set"] and body["prediction_set"][0] == body["top"]  # APS: the top class leads
            guarantee = body["conformal"]
            assert guarantee["alpha"] == 0.1 and guarantee["coverage_at_least"] == 0.9 and guarantee["method"] == "aps"
            assert guarantee["calibration_rows"] == probe.calibration.split["conformal_rows"]
            correct += label in body["prediction_set"]
            total += 1
    assert correct / total >= 0.9, f"{correct}/{total} sets hold the true class"
    plain = client.post("/classify", files={"image": ("t.png", (samples_dir / tile).read_bytes(), "image/png")})
    assert plain.status_code == 200 and "prediction_set" not in plain.json() and plain.json()["probe"]["calibrated"]


@pytest.mark.parametrize("data,status,reason", [
    ({"conformal": "0"}, 400, "(0, 1)"), ({"conformal": "1"}, 400, "(0, 1)"), ({"conformal": "-0.1"}, 400, "(0, 1)"),
    ({"conformal": "2"}, 400, "(0, 1)"), ({"conformal": "often"}, 422, "conformal"),
    ({"conformal": "0.1", "conformal_method": "best"}, 400, "conformal method"),
    ({"conformal": "0.1", "classes": "granite,basalt"}, 400, "probe"),
], ids=["zero", "one", "negative", "two", "not-a-number", "unknown-method", "ad-hoc-classes"])
def test_classify_refuses_bad_conformal_requests(client, samples_dir, labels, data, status, reason):
    tile = next(iter(labels))
    r = client.post("/classify", files={"image": ("t.png", (samples_dir / tile).read_bytes(), "image/png")}, data=data)
    assert r.status_code == status, r.text
    assert reason in r.text


def _encoder_replicas() -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if "QueryEncoder" in a["name"] and a["name"].startswith("SERVE_REPLICA"))


@pytest.mark.slow
def test_killed_encoder_replica_is_replaced_and_traffic_recovers(client):
    import ray

    before = _encoder_replicas()
    assert len(before) == 1
    stop = threading.Event()
    results: list[tuple[float, int]] = []

    def traffic() -> None:
        with httpx.Client(base_url=str(client.base_url), timeout=30) as c:
            while not stop.is_set():
                try:
                    code = c.post("/search", json={"text": "black basalt", "k": 3}).status_code
                except httpx.HTTPError:
                    code = -1
                results.append((time.monotonic(), code))

    worker = threading.Thread(target=traffic)
    worker.start()
    time.sleep(1.0)
    killed_at = time.monotonic()
    ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        later = [code for t, code in results if t > killed_at + 1]
        if len(later) >= 20 and all(code == 200 for code in later[-20:]):
            break
        time.sleep(0.5)
    stop.set()
    worker.join()
    after = _encoder_replicas()
    assert len(after) == 1 and after != before, (before, after)
    tail = [code for t, code in results if t > killed_at][-20:]
    assert len(tail) == 20 and all(code == 200 for code in tail), tail
    assert all(code == 200 for t, code in results if t < killed_at)


@pytest.mark.slow
def test_web_page_in_headless_chromium(served, labels):
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    if not Path("/usr/bin/chromium").exists():
        pytest.fail("Chromium is missing: `make setup` installs it (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1200,900",
                 "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=options)
    try:
        wait = WebDriverWait(driver, 60, ignored_exceptions=(StaleElementReferenceException,))
        driver.get(served[0] + "/")
        box = driver.find_element(By.ID, "query")
        box.send_keys("layered sandstone with tan bands")
        driver.find_element(By.ID, "go").click()
        try:
            wait.until(ec.presence_of_all_elements_located((By.CSS_SELECTOR, ".hit")))
        except Exception:
            pytest.fail(f"no results shown; status: {driver.find_element(By.ID, 'status').text!r}; "
                        f"console: {driver.get_log('browser')}")
        wait.until(lambda d: all(img.get_property("naturalWidth") > 0 for img in d.find_elements(By.CSS_SELECTOR,
                                                                                                   ".hit img")))
        cards = driver.find_elements(By.CSS_SELECTOR, ".hit")
        assert len(cards) == 12
        scores = [float(c.find_element(By.CLASS_NAME, "score").text) for c in cards]
        assert scores == sorted(scores, reverse=True) and -1 <= scores[-1] <= scores[0] <= 1
        first_path = cards[0].find_element(By.TAG_NAME, "img").get_attribute("alt")
        assert _label_of({"path": first_path}, labels) == "sandstone", first_path
        clicked_id = cards[0].get_attribute("data-id")
        cards[0].click()
        # "finding images similar to ..." while loading; "similar to PATH: N results" once the grid is new
        wait.until(lambda d: (t := d.find_element(By.ID, "status").text).startswith("similar to") and "results" in t)
        similar = driver.find_elements(By.CSS_SELECTOR, ".hit")
        assert clicked_id not in [c.get_attribute("data-id") for c in similar]
        sim_labels = [_label_of({"path": c.find_element(By.TAG_NAME, "img").get_attribute("alt")}, labels)
                      for c in similar]
        assert sim_labels.count("sandstone") >= 8, sim_labels
        assert len(similar) == 12
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(SCREENSHOT))
        shot = np.asarray(Image.open(SCREENSHOT).convert("RGB"))
        assert shot.shape[0] > 300 and shot.std() > 10  # a rendered page with thumbnails, not a blank one
    finally:
        driver.quit()


def test_healthz_fails_with_the_reason_when_the_store_is_missing(served, tiny_model, tmp_path):
    """Runs after the other HTTP tests of the module: it redeploys the app on a store that does not exist."""
    from serving.common import deploy_config

    missing = tmp_path / "no-such-store"
    options = {name: FIXED for name in ("QueryEncoder", "IndexReader", "SearchAPI")}
    deploy_config(app_args={"store": str(missing), "model": tiny_model}, host="127.0.0.1",
                 port=int(served[0].rsplit(":", 1)[1]), deployment_options=options)
    with httpx.Client(base_url=served[0], timeout=30) as c:
        r = c.get("/healthz")
        # the reason names the store, never where this machine keeps it
        assert r.status_code == 503
        assert "no-such-store" in r.json()["reason"] and str(tmp_path) not in r.text
        r = c.post("/search", json={"text": "granite"})
        assert r.status_code == 503 and "no-such-store" in r.text and str(tmp_path) not in r.text


def test_serve_verb_checks_its_arguments_before_starting(capsys):
    from serving.search import main
    from vlmlab.config import ConfigError

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "--max-batch-size" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="max_bach_size"):
        main(["some-store", "max_bach_size=4"])


def test_shipped_config_is_a_valid_serve_config_with_fractional_gpus_and_autoscaling():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serving.common import CONFIG_PATH

    text = CONFIG_PATH.read_text()
    schema = ServeDeploySchema.model_validate(yaml.safe_load(text))
    app = next(a for a in schema.applications if a.name == "search")
    assert app.import_path == "serving.search:build_app"
    deployments = {d.name: d for d in app.deployments}
    assert app.args["layout"] == "split"  # the cluster's layout; `vlmlab serve` runs combined
    assert schema.http_options.host == "127.0.0.1"  # loopback unless a deployment says otherwise
    assert deployments["QueryEncoder"].autoscaling_config["min_replicas"] >= 2  # a lost replica is not an outage
    assert set(deployments) == {"QueryEncoder", "IndexReader", "SearchAPI"}
    assert deployments["QueryEncoder"].ray_actor_options.num_gpus == 0.25
    assert not deployments["IndexReader"].ray_actor_options.num_gpus
    for d in deployments.values():
        auto = d.autoscaling_config
        assert 1 <= auto["min_replicas"] <= auto["max_replicas"] and auto["target_ongoing_requests"] > 0
        assert d.max_ongoing_requests >= auto["target_ongoing_requests"]
    # a full batch can queue behind the running one
    assert deployments["QueryEncoder"].max_ongoing_requests >= 2 * app.args["max_batch_size"]
    for line in text.splitlines():
        if line.strip().startswith(("max_ongoing_requests", "min_replicas", "max_replicas", "target_ongoing")):
            assert "#" in line, f"say why: {line.strip()}"


@pytest.mark.slow
def test_vlmlab_serve_runs_one_replica_holding_encoder_and_index(served, sample_store, tiny_model):
    """The `combined` layout `vlmlab serve` uses: the ingress replica holds the model and the index, and
    takes the encoder deployment's resources and scaling (here fixed to one replica on CPU)."""
    import ray
    from ray import serve

    from serving.common import deploy_config

    port = int(served[0].rsplit(":", 1)[1])
    deploy_config(app_args={"store": str(sample_store), "layout": "combined"}, host="127.0.0.1", port=port,
                  deployment_options={name: FIXED for name in ("QueryEncoder", "IndexReader", "SearchAPI")})
    assert set(serve.status().applications["search"].deployments) == {"SearchAPI"}
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    assert not any("QueryEncoder" in n or "IndexReader" in n for n in names if n.startswith("SERVE_REPLICA"))
    with httpx.Client(base_url=served[0], timeout=60) as c:
        assert c.get("/healthz").status_code == 200
        hits = c.post("/search", json={"text": ROCK_CLASSES["basalt"][0], "k": 5}).json()["hits"]
        assert len(hits) == 5
        assert c.post("/search", json={"txt": "basalt"}).status_code == 422
