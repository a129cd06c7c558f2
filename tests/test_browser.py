"""The k-NN patch browser: widget clicks show the brute-force cosine top-k, the store is reused, bad input is named."""
import faiss  # isort: skip  # noqa: F401  (before torch, as the package does)

import time

import numpy as np
import pytest

import helpers
from ssl_patch_analysis.browser import PatchBrowser, default_grid, embed_data, spread_ids
from ssl_patch_analysis.data import load_dataset

K = 5


@pytest.fixture(scope="module")
def browser(cifar10_npz, imagenette_npz, data_root, tmp_path_factory):
    model = helpers.tiny_model()
    cache = tmp_path_factory.mktemp("browser-cache")
    sources = {
        "cifar10": embed_data(model, load_dataset("cifar10", "test", root=data_root), num_images=24, cache=cache,
                              device="cpu", progress=False),
        "imagenette": embed_data(model, load_dataset("imagenette", "val", root=data_root), num_images=10,
                                 cache=cache, device="cpu", progress=False),
    }
    return PatchBrowser(model, sources, k=K, layer="z")


def brute_force(source, image_id: int, patch_index: int, layer: str, k: int, exclude_same_image: bool = False):
    """Cosine top-k in NumPy over the stored embeddings: [(image id, patch index, similarity)], query left out."""
    array = np.asarray(source.embeddings.layer(layer), dtype=np.float64)
    num_images, patches, dim = array.shape
    unit = array.reshape(-1, dim) / np.linalg.norm(array.reshape(-1, dim), axis=1, keepdims=True)
    ids = np.repeat(np.asarray(source.embeddings.image_ids), patches)
    positions = np.tile(np.arange(patches), num_images)
    query = np.flatnonzero((ids == image_id) & (positions == patch_index))[0]
    similarity = unit @ unit[query]
    similarity[query] = -np.inf
    if exclude_same_image:
        similarity[ids == image_id] = -np.inf
    order = np.argsort(-similarity, kind="stable")[:k]
    return [(int(ids[r]), int(positions[r]), float(similarity[r])) for r in order]


def shown(browser):
    return [(n.image_id, n.patch_index, n.similarity) for n in browser.neighbours]


def assert_same_neighbours(got, expected):
    assert [(i, p) for i, p, _ in got] == [(i, p) for i, p, _ in expected]
    np.testing.assert_allclose([s for *_, s in got], [s for *_, s in expected], atol=1e-5)


def test_spread_ids_cover_the_split_evenly():
    ids = spread_ids(3925, 60)
    assert len(ids) == 60 and ids[0] == 0 and ids[-1] == 3924 and np.all(np.diff(ids) > 0)
    assert np.ptp(np.diff(ids)) <= 1  # evenly spaced, to rounding
    assert spread_ids(5, 50).tolist() == [0, 1, 2, 3, 4]
    assert default_grid((32, 32)) == (16, 8) and default_grid((224, 224)) == (112, 56)


def test_widget_clicks_show_the_brute_force_top_k(browser):
    source = browser.sources["cifar10"]
    assert source.grid_shape == (3, 3)
    ids = np.asarray(source.embeddings.image_ids)
    # As a user's clicks would: move the image slider, the patch sliders, then switch the space.
    browser.image_slider.value = 7
    browser.row_slider.value = 0
    browser.col_slider.value = 2
    assert_same_neighbours(shown(browser), brute_force(source, int(ids[7]), 2, "z", K))
    browser.layer_buttons.value = "h"
    assert_same_neighbours(shown(browser), brute_force(source, int(ids[7]), 2, "h", K))
    browser.exclude_box.value = True
    expected = brute_force(source, int(ids[7]), 2, "h", K, exclude_same_image=True)
    assert_same_neighbours(shown(browser), expected)
    assert all(image != ids[7] for image, _, _ in shown(browser))
    browser.exclude_box.value = False
    browser.k_slider.value = 8
    assert len(browser.neighbours) == 8
    assert_same_neighbours(shown(browser), brute_force(source, int(ids[7]), 2, "h", 8))
    assert browser.png.startswith(b"\x89PNG")


def test_switching_data_set_refits_the_sliders_and_searches_that_set(browser):
    browser.data_choice.value = "imagenette"
    source = browser.sources["imagenette"]
    assert browser.image_slider.max == source.num_images - 1 == 9
    assert (browser.row_slider.max, browser.col_slider.max) == (2, 2)
    labels = np.asarray(source.data.labels)[np.asarray(source.embeddings.image_ids)]
    assert len(set(labels.tolist())) >= 5  # spread over the class-sorted split, not its first class only
    browser.image_slider.value = 9
    ids = np.asarray(source.embeddings.image_ids)
    expected = brute_force(source, int(ids[9]), 3 * browser.row_slider.value + browser.col_slider.value,
                           browser.layer_buttons.value, browser.k_slider.value)
    assert_same_neighbours(shown(browser), expected)
    assert all(image in set(ids.tolist()) for image, _, _ in shown(browser))
    browser.data_choice.value = "cifar10"
    assert browser.image_slider.max == browser.sources["cifar10"].num_images - 1


def test_select_sets_the_controls_and_marks_relations(browser):
    source = browser.sources["cifar10"]
    image_id = int(source.embeddings.image_ids[3])
    started = time.perf_counter()
    got = browser.select(image_id, 1, 1, layer="z", data="cifar10", k=K)
    print(f"one browser update (FAISS query + figure + PNG) on the CPU: {time.perf_counter() - started:.3f} s")
    assert (browser.image_slider.value, browser.row_slider.value, browser.col_slider.value) == (3, 1, 1)
    assert browser.layer_buttons.value == "z" and got is browser.neighbours
    assert_same_neighbours(shown(browser), brute_force(source, image_id, 4, "z", K))
    label = int(source.data.labels[image_id])
    same_image = sum(n.image_id == image_id for n in got)
    same_class = sum(n.image_id != image_id and n.label == label for n in got)
    assert f"same image: {same_image}" in browser.summary.value
    assert f"same class: {same_class}" in browser.summary.value
    assert f"image {image_id} ({source.data.class_names[label]})" in browser.summary.value


def test_select_rejects_bad_input_with_the_valid_range(browser):
    source = browser.sources["cifar10"]
    not_indexed = int(np.setdiff1d(np.arange(100), source.embeddings.image_ids)[0])
    with pytest.raises(ValueError, match="not indexed"):
        browser.select(not_indexed, 0, 0)
    with pytest.raises(ValueError, match=r"3 x 3 grid"):
        browser.select(int(source.embeddings.image_ids[0]), 3, 0)
    with pytest.raises(ValueError, match="layer must be one of"):
        browser.select(int(source.embeddings.image_ids[0]), 0, 0, layer="q")
    with pytest.raises(ValueError, match="unknown data set"):
        browser.select(0, 0, 0, data="mnist")


def test_second_embedding_reads_the_store_back(cifar10_npz, data_root, tmp_path):
    model = helpers.tiny_model(1)
    data = load_dataset("cifar10", "test", root=data_root)
    first = embed_data(model, data, num_images=6, cache=tmp_path, device="cpu", progress=False)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock")  # the lock records its holder
    stamps = [p.stat().st_mtime_ns for p in files]
    second = embed_data(model, data, num_images=6, cache=tmp_path, device="cpu", progress=False)
    assert [p.stat().st_mtime_ns for p in files] == stamps  # nothing rewritten
    np.testing.assert_array_equal(np.asarray(first.embeddings.layer("z")), np.asarray(second.embeddings.layer("z")))
    other = embed_data(helpers.tiny_model(2), data, num_images=6, cache=tmp_path, device="cpu", progress=False)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2  # other weights: their own store
    assert not np.allclose(np.asarray(other.embeddings.layer("z")), np.asarray(first.embeddings.layer("z")))
