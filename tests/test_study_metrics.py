"""The colour study's parts against hand-computed answers: patch rendering, prompt styles, score
matrices, per-concept metrics, semantic discriminability and capacity, and the LLM2CLIP refusal."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from vlmlab.palette import PaletteError, lab_to_srgb, load_palette, srgb_to_lab
from vlmlab.studies.association import (
    concept_metrics,
    earth_movers,
    entropy_bits,
    pearson,
    spearman,
    to_distribution,
    total_variation,
)
from vlmlab.studies.discriminability import assignment_distances, best_assignment, semantic_distance
from vlmlab.studies.scores import read_matrix, style_scores, write_matrix
from vlmlab.studies.styles import StyleError, load_styles_file, resolve_styles

# --------------------------------------------------------------------------- palette


def test_patches_render_known_srgb_values(tmp_path):
    rgb, excess = lab_to_srgb(np.array([[50, 0, 0], [100, 0, 0], [0, 0, 0]]))
    assert np.round(rgb * 255).astype(int).tolist() == [[119, 119, 119], [255, 255, 255], [0, 0, 0]]
    assert excess.tolist() == [0, 0, 0]
    # the same three as a palette file: uniform 224x224 patches of exactly those colours
    path = tmp_path / "greys.csv"
    path.write_text("L,a,b\n50,0,0\n100,0,0\n0,0,0\n")
    patches = load_palette(path).patches()
    assert [p.size for p in patches] == [(224, 224)] * 3
    assert [p.getcolors() for p in patches] == [[(224 * 224, (119, 119, 119))], [(224 * 224, (255, 255, 255))],
                                               [(224 * 224, (0, 0, 0))]]


def test_uw71_matches_skimage_and_round_trips():
    from skimage.color import lab2rgb

    palette = load_palette("uw71")
    assert len(palette) == 71 and palette.lab[26].tolist() == [50, 0, 0]  # colour 27 is the mid grey
    rgb, _ = lab_to_srgb(palette.lab)
    assert np.abs(rgb - lab2rgb(palette.lab[None])[0]).max() < 1e-3
    assert np.abs(srgb_to_lab(rgb) - palette.lab).max() < 1e-4  # every UW-71 colour lies inside the gamut
    assert palette.clipped() == []


def test_out_of_gamut_colours_are_clipped_and_reported(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("50,0,0\n50,100,-100\n")  # a violet no sRGB display shows
    grey, violet = load_palette(path).rendered()
    assert not grey.clipped and grey.delta_e < 1e-6
    assert violet.clipped and violet.clip_excess > 0.1 and violet.delta_e > 10
    assert all(0 <= v <= 255 for v in violet.rgb)
    path.write_text("50,0\n")
    with pytest.raises(PaletteError, match="three numbers"):
        load_palette(path)
    with pytest.raises(PaletteError, match="uw71"):
        load_palette("no-such-palette")


# --------------------------------------------------------------------------- styles and matrices


def test_prompt_styles(tmp_path):
    four = resolve_styles(["4"])[0]
    prompts = four.prompts("banana")
    assert len(prompts) == 11 and prompts[0].endswith("strength of 0 out of 1.") and "of 0.1 out" in prompts[1]
    assert prompts[-1].endswith("strength of 1 out of 1.")
    assert resolve_styles(["control"])[0].prompts("banana") == ["The color of the image is yellow."]
    assert resolve_styles(["control-dark_red"])[0].prompts("x") == ["The color of the image is dark red."]
    assert [s.name for s in resolve_styles(["all"])] == ["1", "2", "3", "4", "control"]
    user = load_styles_file("vlmlab/studies/example_styles.yaml")
    assert user["graded"].graded and len(user["ensemble"].templates) == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("oops: 'The {colour} of {w}'\n")
    with pytest.raises(StyleError, match="only {w} and {x}"):
        load_styles_file(bad)
    with pytest.raises(StyleError, match="unknown prompt style"):
        resolve_styles(["5"])


def test_score_matrix_csv_matches_colours_by_position(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_text('"","V1","V2","V3"\napple,0.1,0.9,0.5\nbanana,0.8,0.2,0.3\n')
    m = read_matrix(path)
    assert m.concepts == ["apple", "banana"] and m.values.tolist() == [[0.1, 0.9, 0.5], [0.8, 0.2, 0.3]]
    out = write_matrix(tmp_path / "scores.csv", m.concepts, m.values)
    assert out.read_text().splitlines()[0] == "concept,1,2,3"
    assert np.array_equal(read_matrix(out).values, m.values)
    path.write_text("concept,1,2\napple,0.1\n")
    with pytest.raises(ValueError, match="line 2"):
        read_matrix(path)


def test_graded_style_is_the_expected_strength(tiny_model):
    from vlmlab.models import load_model

    encoder = load_model(tiny_model, device="cpu")
    images = encoder.encode_images(load_palette("uw71").patches(64)[:5])
    style = resolve_styles(["4"])[0]
    got = style_scores(encoder, images, ["banana", "sleeping"], style)
    # by hand: softmax over the 11 strengths of logit_scale * cosine, then sum of x * p(x)
    text = encoder.encode_texts(style.prompts("sleeping"))
    logits = encoder.logit_scale * (images @ text.T)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert np.allclose(got[1], p @ np.linspace(0, 1, 11), atol=1e-5)
    assert got.shape == (2, 5) and (got >= 0).all() and (got <= 1).all()
    plain = style_scores(encoder, images, ["banana"], resolve_styles(["1"])[0])
    direct = images @ encoder.encode_texts(["The color of the image represents the word banana."])[0]
    assert np.allclose(plain[0], direct, atol=1e-5)


# --------------------------------------------------------------------------- metrics


def test_metrics_against_hand_computed_values():
    assert to_distribution(np.array([1.0, 2.0, 3.0])).tolist() == pytest.approx([0, 1 / 3, 2 / 3])
    assert to_distribution(np.array([2.0, 2.0])).tolist() == [0.5, 0.5]
    assert total_variation(np.array([0.5, 0.5, 0]), np.array([0, 0.5, 0.5])) == pytest.approx(0.5)
    # all mass moves from position 1 to 3 -> 2; half the mass moves one position -> 1 (here: 0.5 + 0.5)
    assert earth_movers(np.array([1.0, 0, 0]), np.array([0, 0, 1.0])) == pytest.approx(2.0)
    assert earth_movers(np.array([0.5, 0.5, 0]), np.array([0, 0.5, 0.5])) == pytest.approx(1.0)
    lab = np.array([[50.0, 0, 0], [50.0, 6, 8]])  # ΔE = 10
    assert earth_movers(np.array([1.0, 0]), np.array([0, 1.0]), lab) == pytest.approx(10.0)
    assert entropy_bits(np.full(4, 0.25)) == pytest.approx(2.0) and entropy_bits(np.array([1.0, 0, 0])) == 0
    a = np.array([1.0, 2.0, 3.0])
    assert pearson(a, np.array([1.0, 3.0, 2.0])) == pytest.approx(0.5)
    assert spearman(a, np.array([1.0, 3.0, 2.0])) == pytest.approx(0.5)
    assert spearman(a, a[::-1]) == pytest.approx(-1.0) and math.isnan(pearson(a, np.ones(3)))
    m = concept_metrics(np.array([0.2, 0.3, 0.4]), np.array([0.0, 0.0, 1.0]))
    # model distribution [0, 1/3, 2/3] vs human [0, 0, 1]: TV 1/3, EMD 1/3, entropy 0.918 - 0 bits
    assert m["tv"] == pytest.approx(1 / 3) and m["emd"] == pytest.approx(1 / 3)
    assert m["entropy_diff"] == pytest.approx(-(1 / 3) * math.log2(1 / 3) - (2 / 3) * math.log2(2 / 3))
    assert m["top_colour_model"] == m["top_colour_human"] == 3


def test_semantic_distance_hand_computed_2x2():
    # W_iA=0.8, W_jB=0.6, W_iB=0.2, W_jA=0.3: ΔW = 0.9; s = 1.4 W(1-W) = 0.224, 0.336, 0.224, 0.294;
    # sqrt(sum s²) = sqrt(0.299684) = 0.547434; z = 1.644033; Φ(z) = 0.949915; ΔS = 2Φ - 1 = 0.89983
    assert semantic_distance(0.8, 0.6, 0.2, 0.3) == pytest.approx(0.89983, abs=1e-5)
    assert semantic_distance(0.2, 0.3, 0.8, 0.6) == pytest.approx(0.89983, abs=1e-5)  # swapped colours: same ΔS
    assert semantic_distance(1, 1, 0, 0) == 1.0 and semantic_distance(0.5, 0.5, 0.5, 0.5) == 0.0
    assert semantic_distance(0, 0, 0, 0) == 0.0


def test_capacity_assignment_by_contrast_merit():
    # rows concepts A, B; columns colours 0, 1, 2
    w = np.array([[0.9, 0.8, 0.1],
                  [0.9, 0.2, 0.3]])
    # raw association gives A colour 1 and B colour 0 (0.8 + 0.9 = 1.7, the largest total);
    # the contrast merit maximises ΔW: A -> 1, B -> 2 (ΔW = 0.8 + 0.3 - 0.2 - 0.1 = 0.8, vs 0.6)
    assert best_assignment(w, [0, 1], "association").tolist() == [1, 0]
    assert best_assignment(w, [0, 1], "contrast").tolist() == [1, 2]
    ds = assignment_distances(w, [0, 1], [1, 2])
    assert ds.tolist() == pytest.approx([float(semantic_distance(0.8, 0.3, 0.2, 0.1))])
    assert ds[0] > assignment_distances(w, [0, 1], [1, 0])[0]


# --------------------------------------------------------------------------- models the project cannot run


def test_llm2clip_is_refused_with_what_it_needs(tmp_path):
    from vlmlab.models import ModelSpecError, load_model

    with pytest.raises(ModelSpecError, match="llm2vec"):
        load_model("hf:microsoft/LLM2CLIP-Openai-B-16")
    local = tmp_path / "llm2clip-b16"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({
        "model_type": "clip", "architectures": ["LLM2CLIPModel"],
        "auto_map": {"AutoConfig": "configuration_clip.CLIPConfig", "AutoModel": "modeling_clip.LLM2CLIPModel"}}))
    with pytest.raises(ModelSpecError, match="transformers<=4.44.2"):
        load_model(str(local))
    other = tmp_path / "custom"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "clip", "auto_map": {"AutoModel": "m.M"}}))
    with pytest.raises(ModelSpecError, match="remote code"):
        load_model(f"hf:{other}")
