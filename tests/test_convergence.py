"""Aggregation convergence (Fig. 3a): exact answers on a linear model, the core against a plain loop, real curves."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from ssl_patch_analysis.checkpoints import load_model
from ssl_patch_analysis.convergence import (
    Summary,
    convergence_curve,
    cosine_to_whole_image,
    default_patch_sizes,
    default_stride,
    derangement,
    main,
    parse_n_values,
    plot_convergence,
)
from ssl_patch_analysis.data import load_dataset
from ssl_patch_analysis.models import ModelInfo, Preprocess, SSLModel
from ssl_patch_analysis.patches import grid


def linear_pooled_model(input_size: int, dim: int = 6, seed: int = 0) -> SSLModel:
    """h = W . (mean pixel) + b: a 1x1 convolution then global average pooling, no normalisation."""
    torch.manual_seed(seed)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, dim, kernel_size=1), torch.nn.AdaptiveAvgPool2d(1),
                                   torch.nn.Flatten())
    return SSLModel(backbone, preprocess=Preprocess(input_size, mean=None, std=None),
                    info=ModelInfo(method="test", arch="linear", embedding_dim=dim))


def tiled_images(n: int, side: int, tile: int, seed: int = 0) -> torch.Tensor:
    """Images made of ``tile``-pixel squares, each of one random colour: tiles differ, so one tile != the image."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(n, 3, side // tile, side // tile), dtype=np.uint8)
    return torch.from_numpy(colours.repeat(tile, axis=2).repeat(tile, axis=3))


def test_core_equals_a_direct_loop():
    rng = np.random.default_rng(5)
    images, patches, dim, draws = 5, 7, 4, 3
    embeddings = rng.normal(size=(images, patches, dim))
    whole = rng.normal(size=(images, dim))
    partner = np.array([3, 0, 4, 1, 2])
    n_values = [1, 3, 7, "all"]

    result = cosine_to_whole_image(embeddings, whole, n_values, draws, np.random.default_rng(11), partner)

    keys_rng = np.random.default_rng(11)  # the documented contract: one key array per integer N, in order
    for n in n_values:
        if n == "all":
            subsets = [[list(range(patches)) for _ in range(images)]]
        else:
            keys = keys_rng.random((draws, images, patches))
            subsets = [[sorted(range(patches), key=lambda j: keys[d, i, j])[:n] for i in range(images)]
                       for d in range(draws)]
        for d, per_image in enumerate(subsets):
            for i, subset in enumerate(per_image):
                mean = sum(embeddings[i, j] for j in subset) / len(subset)
                for reference, key in ((whole[i], "similarity"), (whole[partner[i]], "chance")):
                    expected = float(mean @ reference / (np.linalg.norm(mean) * np.linalg.norm(reference)))
                    assert result[str(n)][key][d, i] == pytest.approx(expected, abs=1e-12)
    assert result["all"]["similarity"].shape == (1, images)
    assert result["3"]["similarity"].shape == (draws, images)


def test_core_rejects_n_larger_than_the_grid_and_bad_shapes():
    embeddings = np.ones((2, 3, 4))
    with pytest.raises(ValueError, match="N=4 of the 3 patches"):
        cosine_to_whole_image(embeddings, np.ones((2, 4)), [4], 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="I x P x D"):
        cosine_to_whole_image(embeddings, np.ones((2, 5)), [1], 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="positive integer or 'all'"):
        cosine_to_whole_image(embeddings, np.ones((2, 4)), [0], 1, np.random.default_rng(0))


def test_derangement_pairs_every_image_with_another():
    for n in (2, 3, 10, 101):
        partner = derangement(n, np.random.default_rng(n))
        assert sorted(partner.tolist()) == list(range(n))
        assert (partner != np.arange(n)).all()
    with pytest.raises(ValueError, match="at least 2 images"):
        derangement(1, np.random.default_rng(0))


def test_summary_spread_is_over_images_with_a_student_t_interval():
    values = np.random.default_rng(1).normal(size=(4, 9))  # draws x images
    per_image = values.mean(axis=0)
    summary = Summary.of(values)
    low, high = stats.t.interval(0.95, df=8, loc=per_image.mean(), scale=stats.sem(per_image))
    assert summary.mean == pytest.approx(per_image.mean())
    assert summary.std == pytest.approx(per_image.std(ddof=1))
    assert summary.ci95 == pytest.approx((high - low) / 2)
    assert summary.per_image == pytest.approx(per_image.tolist(), abs=1e-15)  # kept for paired differences


@pytest.mark.parametrize("resize_to", ["native", None])
def test_mean_of_all_tiles_of_a_linear_pooled_model_is_the_whole_image(resize_to):
    tile, side = 4, 16
    images = tiled_images(6, side, tile)
    model = linear_pooled_model(input_size=tile)
    result = convergence_curve(model, images, patch_sizes=[tile], n_values=[1, 4, "all"], stride=tile,
                               num_images=6, draws=8, resize_to=resize_to)

    (curve,) = result.curves
    assert curve.grid_shape == (4, 4) and curve.fed_size == tile
    points = {point.n: point for point in curve.points}
    assert points["all"].num_averaged == 16
    assert points["all"].similarity.mean == pytest.approx(1.0, abs=1e-5)
    assert points["all"].similarity.std == pytest.approx(0.0, abs=1e-5)
    assert points["1"].similarity.mean < 0.999  # one tile is not the image: the test can tell
    assert points["all"].chance.mean < 0.999


def test_n_larger_than_the_grid_is_skipped_with_a_note():
    images = tiled_images(3, 8, 4)
    result = convergence_curve(linear_pooled_model(4), images, patch_sizes=[4], n_values=[1, 8, "all"], stride=4,
                               num_images=3, draws=2, resize_to="native")
    (curve,) = result.curves
    assert [point.n for point in curve.points] == ["1", "all"]
    assert curve.skipped == ["N=8 skipped: the 2x2 grid of 4 px patches has only 4 patches"]


def test_bad_inputs_say_what_to_pass():
    images = tiled_images(3, 8, 4)
    model = linear_pooled_model(4)
    with pytest.raises(ValueError, match="does not fit"):
        convergence_curve(model, images, patch_sizes=[9])
    with pytest.raises(ValueError, match="num_images must be between 2"):
        convergence_curve(model, images, patch_sizes=[4], num_images=1)
    with pytest.raises(ValueError, match="among those the model has"):
        convergence_curve(model, images, patch_sizes=[4], num_images=3, layer="z")
    with pytest.raises(ValueError, match="'native'"):
        convergence_curve(model, images, patch_sizes=[4], num_images=3, resize_to="own")
    with pytest.raises(ValueError, match="positive integers or 'all'"):
        parse_n_values("1,two,all")
    assert parse_n_values("1, 2,ALL") == [1, 2, "all"]


def test_default_patch_sizes_and_strides_scale_with_the_image():
    assert default_patch_sizes(32) == [8, 16, 24]
    assert default_patch_sizes(224) == [56, 112, 168]
    for side in (32, 224):
        for p in default_patch_sizes(side):
            stride = default_stride(p, side)
            rows, cols = grid(p, stride).grid_shape((side, side))
            assert rows * cols >= 25 and stride <= side // 8
    assert [default_stride(p, 32) for p in (8, 16, 24)] == [4, 4, 2]


def test_shipped_vicreg_curve_rises_with_n_and_stays_above_chance(cifar10_npz, data_root):
    model = load_model("vicreg", verbose=False)
    data = load_dataset("cifar10", "test", root=data_root)
    result = convergence_curve(model, data, patch_sizes=[8, 16], n_values=[1, 4, "all"], num_images=8, draws=5,
                               device="cpu")
    for curve in result.curves:
        points = {point.n: point for point in curve.points}
        assert points["all"].similarity.mean > points["4"].similarity.mean > points["1"].similarity.mean
        for point in curve.points:
            assert point.similarity.mean - point.similarity.ci95 > point.chance.mean + point.chance.ci95
    assert result.data == "CIFAR-10 (JPEG copy) test"
    figure = plot_convergence(result)
    assert "vicreg" in figure.axes[0].get_title()
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["1", "4", "all"]


def test_cli_writes_the_figure_and_the_numbers(tmp_path):
    folder = tmp_path / "tiles"
    for i, image in enumerate(tiled_images(4, 32, 8, seed=3)):
        (folder / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"class{i % 2}" / f"{i}.png")
    out = tmp_path / "figures"

    main(["--model", "vicreg", "--data", str(folder), "--num-images", "4", "--patch-sizes", "16",
          "--n-values", "1,2,all", "--draws", "3", "--device", "cpu", "--out", str(out), "--pdf"])

    with Image.open(out / "convergence_vicreg_tiles.png") as png:
        assert png.size[0] > 400 and png.size[1] > 300
    assert (out / "convergence_vicreg_tiles.pdf").stat().st_size > 0
    numbers = json.loads((out / "convergence_vicreg_tiles.json").read_text())
    assert {"model", "model_info", "data", "layer", "num_images", "draws", "seed", "curves", "spread",
            "chance_level", "command", "seconds"} <= set(numbers)
    (curve,) = numbers["curves"]
    assert (curve["patch_size"], curve["stride"], curve["grid_shape"], curve["num_patches"]) == (16, 4, [5, 5], 25)
    assert [point["n"] for point in curve["points"]] == ["1", "2", "all"]
    for point in curve["points"]:
        assert set(point["similarity"]) == set(point["chance"]) == {"mean", "std", "ci95", "per_image"}
        assert point["num_images"] == 4 and math.isfinite(point["similarity"]["mean"])
        for kind in ("similarity", "chance"):  # one value per image, in image_ids order, giving the mean
            assert len(point[kind]["per_image"]) == len(numbers["image_ids"]) == 4
            assert sum(point[kind]["per_image"]) / 4 == pytest.approx(point[kind]["mean"], abs=1e-12)
    assert numbers["model_info"]["method"] == "vicreg"
    # Layer z goes beside h's files, not over them (was: convergence_vicreg_tiles.json replaced by z's curve).
    h_json = (out / "convergence_vicreg_tiles.json").read_bytes()
    main(["--model", "vicreg", "--data", str(folder), "--num-images", "4", "--patch-sizes", "16", "--layers", "z",
          "--n-values", "1,all", "--draws", "3", "--device", "cpu", "--out", str(out), "--no-progress"])
    assert (out / "convergence_vicreg_tiles.json").read_bytes() == h_json
    assert json.loads((out / "convergence_z_vicreg_tiles.json").read_text())["layer"] == "z"


def test_cli_rejects_bad_n_values(capsys):
    with pytest.raises(SystemExit):
        main(["--n-values", "1,0,all"])
    assert "positive integers or 'all'" in capsys.readouterr().err
