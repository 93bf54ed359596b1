"""``make demo`` end to end: the README walkthrough as written, the Serve apps, and index.html.

The demo runs every walkthrough command through the ``vlmlab`` entry point and stops on one that fails
or prints a path it did not write; here it runs once in a fresh directory (the session's cached tiny
model placed where the walkthrough builds it, so ``vlmlab tiny`` reports it as already built), and the
page it writes is opened in headless Chromium.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import all_images_loaded, headless_chromium


@pytest.fixture(scope="module")
def demo(ray_local, tiny_model, tmp_path_factory) -> Path:
    from pipelines.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    shutil.copytree(tiny_model, out / "tiny-clip")  # the walkthrough's `vlmlab tiny` keeps it
    run_demo(out)
    return out


@pytest.mark.slow
def test_the_demo_shows_every_part_working(demo):
    numbers = json.loads((demo / "summary.json").read_text())
    print(json.dumps(numbers, indent=1))
    assert numbers["zero_shot_accuracy_rocks"] > 0.8  # chance 1/6
    # LoRA adapted the tiny CLIP to the texture photos it never saw
    assert numbers["lora_t2i@1_adapted"] > numbers["lora_t2i@1_base"] + 0.1
    # the condition classifier really learned, and was kept as fine-tuned
    assert numbers["inspect_kept"] == "fine-tuned"
    assert numbers["inspect_test_accuracy_fine_tuned"] > numbers["inspect_test_accuracy_zero_shot"] + 0.2
    assert len(numbers["served_search_hits"]) == 5
    for made in ("search_montage.png", "classify/confusion_matrix.png", "clusters/umap.png", "compare/nn_cosine.png",
                 "corpus/filtered/score_distributions.png", "probes/curve/few_shot.png",
                 "runs/inspect/evaluation.json", "colour-study/analysis/report.html", "served_inspect.png"):
        assert (demo / made).is_file(), made
    assert list((demo / "inspected").glob("*.png")), "no annotated scenes"
    # both stages ran on real boxes: the detector found objects (at the size it was trained at) and each
    # got a condition, on the command line and through Serve
    objects = [o for f in (demo / "inspected").glob("scene_*.json") for o in json.loads(f.read_text())["objects"]]
    assert objects and all(o["condition"] for o in objects)
    assert numbers["served_inspect_objects"] > 0


@pytest.mark.slow
def test_the_demo_page_opens_in_chromium_with_every_image(demo):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    page = demo / "index.html"
    with headless_chromium() as driver:
        driver.get(page.as_uri())
        images = driver.find_elements(By.TAG_NAME, "img")
        assert len(images) >= 15, len(images)
        WebDriverWait(driver, 60).until(all_images_loaded)
        text = driver.find_element(By.TAG_NAME, "body").text
        for heading in ("Search and similarity", "Zero-shot classification", "Inspection", "Numbers"):
            assert heading in text


def test_printed_paths_are_claims_of_files_not_suggestions(tmp_path):
    from pipelines.demo import missing_printed_paths, printed_paths

    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "manifest.json").write_text("{}")
    output = ("wrote store/manifest.json and store/index.json (1.9 ms p50, 3/4 ok) on open_clip:ViT-B-32/openai\n"
              "open http://127.0.0.1:8000/ui/x.html; next: vlmlab index store --out store/later\n")
    assert printed_paths(output) == ["store/manifest.json", "store/index.json"]
    assert missing_printed_paths(output, tmp_path) == ["store/index.json"]
