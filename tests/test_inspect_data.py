"""training.inspect_data: YOLO crops, spatial bins, context, class weights and the oversampling sampler."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from training.inspect_data import (
    class_weights,
    condition_vocabulary,
    crop_instance,
    draw_indices,
    oversampling_factors,
    oversampling_weights,
    read_data_yaml,
    read_instances,
    spatial_bin,
    split_class_name,
)
from vlmlab.testing.samples import INSPECTION_CLASSES

CONDITIONS = condition_vocabulary(INSPECTION_CLASSES)


@pytest.fixture(scope="module")
def data_yaml(samples_dir):
    return samples_dir / "inspection" / "data.yaml"


def test_reads_every_labelled_object_of_each_split(data_yaml):
    spec = read_data_yaml(data_yaml)
    assert spec["names"] == INSPECTION_CLASSES and set(spec["splits"]) == {"train", "val", "test"}
    root = data_yaml.parent
    for split, folder in (("train", "train"), ("val", "valid"), ("test", "test")):
        instances = read_instances(data_yaml, split)
        lines = sum(len(p.read_text().split("\n")) - 1 for p in (root / "labels" / folder).glob("*.txt"))
        assert len(instances) == lines > 0
        assert {i.split for i in instances} == {split}
    inst = read_instances(data_yaml, "valid")[0]  # YOLO's "valid" folder name works as a split name too
    x0, y0, x1, y1 = inst.box
    assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 640
    assert (inst.object_type, inst.condition) == split_class_name(inst.label, CONDITIONS)


def test_spatial_bins_and_context_follow_the_scene_layout(data_yaml):
    instances = read_instances(data_yaml, "train")
    bins = Counter((i.object_type, i.spatial_bin) for i in instances)
    # the sample scenes put toe drains low, slope drains mid-image and vegetation high (as the lab's data)
    assert {b for (t, b) in bins if t == "toe drain"} == {"bottom"}
    assert {b for (t, b) in bins if t == "slope drain"} == {"middle"}
    assert {b for (t, b) in bins if t == "vegetation"} == {"top"}
    assert [spatial_bin(y) for y in (0.1, 0.5, 0.72, 1.0)] == ["top", "middle", "bottom", "bottom"]
    for inst in instances:
        assert inst.object_type not in inst.context.split(", ")
    toe = next(i for i in instances if i.object_type == "toe drain")
    assert "rock toe" in toe.context and "slope drain" in toe.context  # every scene has both
    assert split_class_name("vegetation", CONDITIONS) == ("vegetation", "none")
    assert split_class_name("slope drain blocked", CONDITIONS) == ("slope drain", "blocked")


def test_crop_instance_adds_the_margin_and_stays_inside_the_image():
    image = Image.new("RGB", (640, 640))
    assert crop_instance(image, (100, 200, 300, 240), 0.1).size == (240, 48)
    assert crop_instance(image, (100, 200, 300, 240), 0.0).size == (200, 40)
    assert crop_instance(image, (600, 620, 640, 640), 0.5).size == (60, 30)  # clipped at the right/bottom edge
    assert crop_instance(image, (5, 5, 5, 5), 0.2).size == (1, 1)
    assert crop_instance(Image.new("L", (50, 50)), (0, 0, 10, 10), 0.0).mode == "RGB"


def test_class_weights_are_inverse_to_frequency():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)  # class 3 absent
    weights = class_weights(labels, 4)
    counts = np.array([60, 30, 10])
    assert weights[3] == 0
    assert np.allclose(weights[:3] * counts, weights[0] * 60)  # weight x count is the same for every class
    assert weights[labels].mean() == pytest.approx(1.0)
    assert weights[2] / weights[0] == pytest.approx(6.0)


def test_oversampling_draws_each_class_by_its_factor():
    names = ["toe drain normal", "toe drain blocked", "rock toe damaged", "vegetation"]
    labels = np.array([0] * 400 + [1] * 40 + [2] * 100 + [3] * 460)
    factors = oversampling_factors(labels, names, rare_factor=2.5, rare_fraction=0.5,
                                   condition_factors={"blocked": 3.0})
    # rare (< half the largest class): blocked (3x, the larger of rare 2.5 and blocked 3) and rock toe damaged (2.5x)
    assert factors.tolist() == [1.0, 3.0, 2.5, 1.0]
    assert oversampling_factors(labels, names, class_factors={"vegetation": 0.5})[3] == 0.5
    weights = oversampling_weights(labels, factors)
    assert weights.sum() == pytest.approx(1.0)
    draws = draw_indices(weights, 400_000, np.random.default_rng(0))
    per_example_rate = np.bincount(labels[draws], minlength=4) / np.bincount(labels)
    # each example of a class is drawn factor times as often as an example of a factor-1 class
    assert per_example_rate / per_example_rate[0] == pytest.approx(factors, rel=0.03)
    assert len(draws) == 400_000 and draws.max() < len(labels)


def test_condition_vocabulary_comes_from_the_data(tmp_path):
    # the sample set's words are derived from its own names, not from a list in the code
    assert CONDITIONS == ("blocked", "damaged", "normal")
    other = ["culvert clear", "culvert silted", "culvert collapsed", "fence intact", "fence broken", "tree"]
    assert condition_vocabulary(other) == ("broken", "clear", "collapsed", "intact", "silted")
    assert split_class_name("culvert silted", condition_vocabulary(other)) == ("culvert", "silted")
    assert split_class_name("tree", condition_vocabulary(other)) == ("tree", "none")
    # a lab can declare its vocabulary in data.yaml (e.g. a type with one condition only)
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "data.yaml").write_text("path: .\ntrain: images/train\nnames: [pipe ok, wall cracked]\n"
                                        "conditions: [ok, cracked]\n")
    spec = read_data_yaml(tmp_path / "data.yaml")
    assert spec["conditions"] == ("cracked", "ok")
    assert split_class_name("wall cracked", spec["conditions"]) == ("wall", "cracked")
