"""Heatmaps (Fig. 4) and the locality score, checked against direct computations and known answers."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.image import AxesImage
from PIL import Image
from scipy.stats import spearmanr

import helpers
from ssl_patch_analysis.checkpoints import load_model, save_checkpoint
from ssl_patch_analysis.data import load_dataset
from ssl_patch_analysis.heatmap import (
    LOCALITY_TABLE_HEADERS,
    HeatmapSettings,
    compare_locality,
    default_grid,
    figure_heatmaps,
    first_of_each_class,
    heatmap_analysis,
    locality_over_images,
    locality_score,
    main,
    patch_similarity_maps,
    plot_heatmap_analysis,
    plot_heatmaps,
    spearman_rho,
)
from ssl_patch_analysis.models import (
    SSLModel,
)
from ssl_patch_analysis.patches import grid
from ssl_patch_analysis.report import format_table


@torch.no_grad()
def direct_maps(model: SSLModel, image: torch.Tensor, patch: int, stride: int, cell: tuple[int, int]):
    """Similarity maps computed the plain way: slice every patch, run the model, cosine to the query."""
    rows, cols = (image.shape[1] - patch) // stride + 1, (image.shape[2] - patch) // stride + 1
    crops = torch.stack([image[:, r * stride:r * stride + patch, c * stride:c * stride + patch]
                         for r in range(rows) for c in range(cols)]).float() / 255
    out = model(crops)
    maps = {}
    for layer, vectors in out.items():
        unit = F.normalize(vectors.double(), dim=1)
        maps[layer] = (unit @ unit[cell[0] * cols + cell[1]]).reshape(rows, cols).numpy()
    return maps


# ----------------------------------------------------------------------------- similarity maps


def test_maps_equal_direct_computation_and_query_scores_one(tiny_model, random_images):
    model, images = tiny_model, random_images[:2]
    cells = [(3, 3), (0, 6), (5, 1)]
    result = patch_similarity_maps(model, images, [1, 0], patch_size=8, stride=4, queries=cells, resize_to=8,
                                   device="cpu")
    assert result.grid_shape == (7, 7) and result.layers == ["z", "h"]
    assert result.queries.tolist() == [[0, 3, 3], [0, 0, 6], [0, 5, 1], [1, 3, 3], [1, 0, 6], [1, 5, 1]]
    for q, (index, row, col) in enumerate(result.queries.tolist()):
        image_id = result.image_ids[index]
        expected = direct_maps(model, images[image_id], 8, 4, (row, col))
        for layer in ("z", "h"):
            assert result.maps[layer][q].shape == (7, 7)
            assert result.maps[layer][q][row, col] == pytest.approx(1.0, abs=1e-6)
            np.testing.assert_allclose(result.maps[layer][q], expected[layer], atol=1e-4)
        np.testing.assert_array_equal(result.query_box(q), [col * 4, row * 4, col * 4 + 8, row * 4 + 8])
    np.testing.assert_array_equal(result.images[0], images[1].permute(1, 2, 0).numpy())


def test_identical_patches_elsewhere_score_one(tiny_model):
    model = tiny_model
    tile = helpers.random_images(1, size=16, seed=3)[0]
    tiled = tile.repeat(1, 2, 2)[None]  # a 32 x 32 image of 2 x 2 copies of one 16 x 16 tile
    # Patches at their own size (no resampling): resizing would blend in pixels just outside each box,
    # which differ between the copies.
    result = patch_similarity_maps(model, tiled, [0], patch_size=16, stride=16, queries=[(0, 0), (1, 1)],
                                   resize_to=16, device="cpu")
    for layer in ("z", "h"):
        np.testing.assert_allclose(result.maps[layer], 1.0, atol=1e-5)

    # Period 8, stride 4: every other cell repeats the query's pixels exactly, the cells between do not.
    periodic = helpers.random_images(1, size=8, seed=4)[0].repeat(1, 4, 4)[None]
    result = patch_similarity_maps(model, periodic, [0], patch_size=8, stride=4, queries=[(2, 4)], resize_to=8,
                                   device="cpu")
    for layer in ("z", "h"):
        similarity = result.maps[layer][0]
        np.testing.assert_allclose(similarity[::2, ::2], 1.0, atol=1e-5)
        assert similarity[1::2, 1::2].max() < 0.999


def test_imagenet_shaped_model_on_real_imagenette(imagenette_npz):
    data = load_dataset("imagenette", "val", root=imagenette_npz.parent)
    model = helpers.tiny_model(stem="imagenet", input_size=56)
    patch, stride = default_grid(data.image_size)
    assert (patch, stride) == (56, 14) and grid(patch, stride).grid_shape((224, 224)) == (13, 13)
    result = patch_similarity_maps(model, data, [5], patch_size=56, stride=56, queries=[(1, 2)], device="cpu")
    assert result.grid_shape == (4, 4) and result.resize_to == 56 and result.images.shape == (1, 224, 224, 3)
    expected = direct_maps(model, data.get_batch([5])[0], 56, 56, (1, 2))
    for layer in ("z", "h"):
        np.testing.assert_allclose(result.maps[layer][0], expected[layer], atol=1e-4)
    fig = plot_heatmaps(result, "imagenette")
    assert fig.axes[0].get_xlim() == (0.0, 224.0)


def test_default_and_random_queries_and_clear_errors(tiny_model, random_images):
    model, images = tiny_model, random_images[:2]
    result = patch_similarity_maps(model, images, [0, 1], patch_size=8, stride=4, resize_to=8, device="cpu")
    assert result.queries.tolist() == [[0, 3, 3], [1, 3, 3]]  # the centre cell of the 7 x 7 grid
    result = patch_similarity_maps(model, images, [0, 1], patch_size=8, stride=4, queries=5, resize_to=8,
                                   device="cpu", seed=1)
    assert result.num_queries == 10
    for index in (0, 1):
        cells = {tuple(c) for c in result.queries[result.queries[:, 0] == index, 1:].tolist()}
        assert len(cells) == 5  # distinct cells per image
    with pytest.raises(ValueError, match=r"inside the 7 x 7 grid"):
        patch_similarity_maps(model, images, [0], patch_size=8, stride=4, queries=[(7, 0)], device="cpu")
    with pytest.raises(ValueError, match="has h; pass layers among those"):
        patch_similarity_maps(helpers.tiny_model(projector=False), images, [0], patch_size=8, stride=4, device="cpu")


def test_plot_puts_every_map_on_one_colour_scale_with_cells_on_patch_centres(tiny_model, random_images):
    result = patch_similarity_maps(tiny_model, random_images[:2], [0, 1], patch_size=8, stride=4,
                                   queries=[(3, 3), (0, 0)], resize_to=8, device="cpu")
    fig = plot_heatmaps(result, "tiny model on random images")
    maps = [image for ax in fig.axes for image in ax.get_images() if image.get_label() in ("z", "h")]
    assert len(maps) == 2 * result.num_queries
    assert all(isinstance(image, AxesImage) for image in maps)
    clims = {image.get_clim() for image in maps}
    assert len(clims) == 1
    low, high = clims.pop()
    assert low == pytest.approx(min(m.min() for m in result.maps.values()))
    assert high == pytest.approx(1.0, abs=1e-6)
    colorbars = [ax for ax in fig.axes if "cosine similarity" in ax.get_ylabel()]
    assert len(colorbars) == 1
    # Cell (r, c) is a stride-wide square centred on the centre of patch (r, c): x = c * 4 + 4.
    left, right, bottom, top = maps[0].get_extent()
    assert (left + 2, right - 2, top + 2, bottom - 2) == (4, 4 + 6 * 4, 4, 4 + 6 * 4)
    assert fig.legends and fig.get_suptitle() == "tiny model on random images"


# ----------------------------------------------------------------------------- locality score


def blob_embeddings(centers: np.ndarray, sigma: float = 6.0) -> np.ndarray:
    """Gaussian bumps on a fine grid of anchors: cosine similarity ~ exp(-distance^2 / (4 sigma^2))."""
    axis = np.arange(-40, 73, 2.0)
    anchors = np.stack(np.meshgrid(axis, axis, indexing="ij"), axis=-1).reshape(-1, 2)
    squared = ((centers[:, None, :] - anchors[None, :, :]) ** 2).sum(-1)
    return np.exp(-squared / (2 * sigma ** 2))


def test_locality_is_one_when_similarity_falls_with_distance_and_zero_when_shuffled():
    boxes = grid(8, 2).boxes([0], (32, 32))[0].numpy()
    centers = (boxes[:, :2] + boxes[:, 2:]) / 2
    local = np.repeat(blob_embeddings(centers)[None], 3, axis=0)
    score = locality_score(local, boxes)
    assert score["locality_mean"] > 0.99 and score["num_images"] == 3 and score["queries_per_image"] == 169
    np.testing.assert_allclose(score["locality"], -score["rho"])

    rng = np.random.default_rng(0)
    shuffled = np.stack([blob_embeddings(centers)[rng.permutation(len(centers))] for _ in range(40)])
    score = locality_score(shuffled, boxes, queries=20)
    assert abs(score["locality_mean"]) < 0.05 and score["queries_per_image"] == 20

    compared = compare_locality({"h": local, "z": shuffled[:3]}, boxes)
    assert compared["paired_h_minus_z"]["fraction_h_more_local"] == 1.0
    assert compared["paired_h_minus_z"]["mean"] > 0.8


def test_locality_matches_scipy_spearman_pair_by_pair():
    rng = np.random.default_rng(1)
    embeddings = rng.normal(size=(3, 6, 4))
    corners = rng.integers(0, 20, size=(3, 6, 2)).astype(float)
    boxes = np.concatenate([corners, corners + 5], axis=-1)
    for queries in (None, [0, 4]):
        score = locality_score(embeddings, boxes, queries=queries)
        for i in range(3):
            similarity, distance = [], []
            for q in (range(6) if queries is None else queries):
                for j in range(6):
                    if j != q:
                        a, b = embeddings[i, q], embeddings[i, j]
                        similarity.append(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
                        distance.append(np.hypot(*(corners[i, q] - corners[i, j])))
            assert score["rho"][i] == pytest.approx(spearmanr(similarity, distance).statistic, abs=1e-12)
    ties = np.array([1, 1, 2, 3, 3, 3, 7.0])
    values = np.array([0.3, 0.1, 0.5, 0.2, 0.9, 0.4, 0.8])
    assert spearman_rho(values, ties) == pytest.approx(spearmanr(values, ties).statistic, abs=1e-12)
    assert np.isnan(spearman_rho(np.ones(5), np.arange(5.0)))
    with pytest.raises(ValueError, match="boxes must be 3 x 6 x 4"):
        locality_score(embeddings, boxes[:, :5])


# ----------------------------------------------------------------------------- command line


def test_cli_writes_figure_and_json(tmp_path, cifar10_npz, tiny_model):
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(tiny_model, checkpoint)
    record = main(["--model", str(checkpoint), "--data", "cifar10", "--data-root", str(cifar10_npz.parent),
                   "--device", "cpu", "--patch-size", "16", "--stride", "8", "--queries", "1,1;0,2",
                   "--image-ids", "0,3", "--locality-images", "4", "--out", str(tmp_path / "figs")])
    png, saved = tmp_path / "figs" / "heatmap_tiny_cifar10.png", tmp_path / "figs" / "heatmap_tiny_cifar10.json"
    assert Image.open(png).size[0] > 300
    written = json.loads(saved.read_text())
    assert written["data"] == "CIFAR-10 (JPEG copy) test"
    queries = written["heatmaps"]["queries"]
    assert [(q["image_id"], q["cell"], q["class"]) for q in queries] == [
        (0, [1, 1], "cat"), (0, [0, 2], "cat"), (3, [1, 1], "airplane"), (3, [0, 2], "airplane")]
    assert np.asarray(queries[1]["maps"]["h"]).shape == (3, 3) and queries[1]["maps"]["h"][0][2] == 1.0
    for layer in ("z", "h"):
        scores = written["locality"]["layers"][layer]
        assert scores["num_images"] == 4 and len(scores["rho"]) == 4
        assert scores["locality_mean"] == pytest.approx(record["locality"]["layers"][layer]["locality_mean"])
        assert -1 <= scores["locality_mean"] <= 1
    assert len(written["locality"]["image_ids"]) == 4


def test_cli_explains_bad_queries(tmp_path, cifar10_npz, capsys, tiny_model):
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(tiny_model, checkpoint)
    common = ["--model", str(checkpoint), "--data-root", str(cifar10_npz.parent), "--device", "cpu",
              "--patch-size", "16", "--stride", "8", "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        main(common + ["--queries", "1-1"])
    assert "'row,col;row,col'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(common + ["--queries", "3,0", "--locality-images", "0"])
    assert "inside the 3 x 3 grid" in capsys.readouterr().err
    assert not list(tmp_path.glob("heatmap_*"))



def test_cli_refuses_more_locality_queries_than_patches_before_any_embedding(tmp_path, cifar10_npz, tiny_model,
                                                                              monkeypatch, capsys):
    # was: refused by the locality score, after the figure's and the locality images' patches were embedded
    import ssl_patch_analysis.heatmap as heatmap

    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(tiny_model, checkpoint)

    def embedded(*args, **kwargs):
        raise AssertionError("patches embedded before --locality-queries was checked")

    monkeypatch.setattr(heatmap, "figure_heatmaps", embedded)
    monkeypatch.setattr(heatmap, "locality_over_images", embedded)
    with pytest.raises(SystemExit) as stopped:
        main(["--model", str(checkpoint), "--data-root", str(cifar10_npz.parent), "--device", "cpu",
              "--patch-size", "16", "--stride", "8", "--locality-queries", "10", "--out", str(tmp_path)])
    assert stopped.value.code == 2
    assert ("--locality-queries 10: each image has 9 patches on this grid; pass at most 9"
            in capsys.readouterr().err)


def test_cli_random_init_control_is_named_apart_and_uses_fresh_weights(tmp_path, cifar10_npz, tiny_model):
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(tiny_model, checkpoint)
    common = ["--model", str(checkpoint), "--data", "cifar10", "--data-root", str(cifar10_npz.parent),
              "--device", "cpu", "--patch-size", "16", "--stride", "8", "--queries", "1,1",
              "--image-ids", "0", "--locality-images", "4", "--out", str(tmp_path / "figs")]
    trained = main(common)
    control = main(common + ["--random-init", "--seed", "3"])
    figs = tmp_path / "figs"
    assert sorted(p.name for p in figs.glob("*.json")) == ["heatmap_tiny-random-init_cifar10.json",
                                                          "heatmap_tiny_cifar10.json"]
    written = json.loads((figs / "heatmap_tiny-random-init_cifar10.json").read_text())
    assert written["model_info"]["extra"]["random_init"] == {"seed": 3, "batch_norm_calibration_images": 512}
    assert "random-init" in written["model"]
    assert json.loads((figs / "heatmap_tiny_cifar10.json").read_text())["model"] == trained["model"]
    maps = [np.asarray(r["heatmaps"]["queries"][0]["maps"]["h"]) for r in (trained, control)]
    assert maps[0].shape == maps[1].shape == (3, 3) and not np.allclose(maps[0], maps[1], atol=1e-3)


@pytest.mark.parametrize("flag, value, message", [
    ("--locality-images", "-3", "expected an integer >= 0, got -3"),
    ("--locality-queries", "0", "expected a positive integer, got 0"),
    ("--figure-images", "x", "expected a positive integer, got 'x'"),
    ("--random-queries", "-1", "expected a positive integer, got -1"),
])
def test_cli_refuses_negative_counts_instead_of_skipping_silently(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and message in err


# ----------------------------------------------------------------------------- the library functions


def test_heatmap_analysis_is_what_the_command_writes(tmp_path, cifar10_npz, capsys, tiny_model):
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(tiny_model, checkpoint)
    record = main(["--model", str(checkpoint), "--data", "cifar10", "--data-root", str(cifar10_npz.parent),
                   "--device", "cpu", "--patch-size", "16", "--stride", "8", "--resize-to", "16",
                   "--queries", "1,1;0,2", "--image-ids", "0,3", "--locality-images", "5", "--locality-queries", "4",
                   "--seed", "2",
                   "--out", str(tmp_path / "figs")])
    printed = capsys.readouterr().out
    written = json.loads((tmp_path / "figs" / "heatmap_tiny_cifar10.json").read_text())

    settings = HeatmapSettings(patch_size=16, stride=8, resize_to=16, image_ids=(0, 3), queries=((1, 1), (0, 2)),
                               locality_images=5, locality_queries=4, seed=2)
    data = load_dataset("cifar10", "test", root=cifar10_npz.parent)
    analysis = heatmap_analysis(load_model(checkpoint, device="cpu", verbose=False), data, settings, device="cpu")
    assert analysis.to_json() == {key: value for key, value in written.items() if key not in ("command", "output_of")}
    assert record["locality"]["layers"]["h"]["locality_mean"] == analysis.locality.layers["h"].locality_mean
    locality = analysis.locality
    assert list(locality.layers) == ["z", "h"] and len(locality.image_ids) == 5
    assert locality.layers["h"].queries_per_image == 4 and locality.paired_h_minus_z.num_images == 5
    assert format_table(locality.table_rows(), LOCALITY_TABLE_HEADERS) in printed
    fig = plot_heatmap_analysis(analysis)
    assert "mean ± std over 5 images" in fig.get_suptitle()
    assert fig.get_suptitle().startswith(f"Patch similarity heatmaps: {analysis.model} on {analysis.data}\n")


def test_locality_over_images_equals_a_direct_computation_on_real_images(cifar10_npz, tiny_model):
    data, model = load_dataset("cifar10", "test", root=cifar10_npz.parent), tiny_model
    # Patches fed at their own size (no resampling), so that slicing them out by hand gives the same pixels.
    settings = HeatmapSettings(patch_size=16, stride=8, resize_to=16, locality_images=3, seed=5)
    locality = locality_over_images(model, data, settings, device="cpu")
    image_ids = np.sort(np.random.default_rng(5).choice(len(data), 3, replace=False))
    assert locality.image_ids.tolist() == image_ids.tolist()
    assert (locality.patch_size, locality.stride) == (16, 8)

    centres = np.array([(8 + 8 * col, 8 + 8 * row) for row in range(3) for col in range(3)], dtype=float)
    distance = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    pairs = ~np.eye(9, dtype=bool)  # every (query, other patch) pair of the 3 x 3 grid
    for i, image_id in enumerate(image_ids):
        image = data.get_batch([int(image_id)])[0]
        crops = torch.stack([image[:, 8 * row:8 * row + 16, 8 * col:8 * col + 16]
                             for row in range(3) for col in range(3)]).float() / 255
        with torch.no_grad():
            out = model(crops)
        for layer in ("z", "h"):
            unit = F.normalize(out[layer].double(), dim=1).numpy()
            cosine = unit @ unit.T
            cosine = (cosine + cosine.T) / 2  # (q, j) and (j, q) are one pair of patches: one similarity
            rho = spearmanr(cosine[pairs], distance[pairs]).statistic
            assert locality.layers[layer].rho[i] == pytest.approx(rho, abs=1e-6)
            assert locality.layers[layer].locality[i] == pytest.approx(-rho, abs=1e-6)
    for layer in ("z", "h"):
        score = locality.layers[layer]
        assert score.num_images == 3 and score.queries_per_image == 9
        assert score.locality_mean == pytest.approx(np.mean(score.locality))
        assert score.locality_std == pytest.approx(np.std(score.locality, ddof=1))
    paired = locality.paired_h_minus_z
    difference = locality.layers["h"].locality - locality.layers["z"].locality
    assert paired.mean == pytest.approx(difference.mean()) and paired.fraction_h_more_local == np.mean(difference > 0)


def test_figure_heatmaps_defaults_and_errors(cifar10_npz, tiny_model):
    data, model = load_dataset("cifar10", "test", root=cifar10_npz.parent), tiny_model
    settings = HeatmapSettings(patch_size=16, stride=8, resize_to=16, figure_images=2, locality_images=0)
    analysis = heatmap_analysis(model, data, settings, device="cpu")
    heatmaps = analysis.heatmaps
    # The first images of distinct classes, each with the centre cell and the top-left cell as queries.
    assert heatmaps.image_ids.tolist() == first_of_each_class(data.labels, 2)
    assert heatmaps.queries.tolist() == [[0, 1, 1], [0, 0, 0], [1, 1, 1], [1, 0, 0]]
    assert analysis.locality is None and analysis.to_json()["locality"] is None
    with pytest.raises(ValueError, match=rf"image ids must lie in 0\.\.{len(data) - 1} .* got \[{len(data)}\]"):
        figure_heatmaps(model, data, HeatmapSettings(image_ids=(len(data),)))
    with pytest.raises(ValueError, match=r"locality_images must be at least 1"):
        locality_over_images(model, data, settings)
