"""Patch retrieval: FAISS results equal brute-force cosine top-k, survive save/load, and know where patches came
from."""
import json

import faiss  # isort: skip

import numpy as np
import pytest
import torch

from helpers import tiny_model
from ssl_patch_analysis.checkpoints import load_model, save_checkpoint
from ssl_patch_analysis.data import load_dataset
from ssl_patch_analysis.extract import extract_patch_embeddings
from ssl_patch_analysis.patches import grid
from ssl_patch_analysis.report import format_table
from ssl_patch_analysis.retrieval import (
    PatchIndex,
    RetrievalQuery,
    RetrievalSettingError,
    RetrievalSettings,
    embed_grid_patches,
    main,
    neighbour_statistics,
    patch_retrieval,
    plot_retrieval,
    plot_retrieval_result,
)
from ssl_patch_analysis.store import PatchEmbeddings


def random_patches(num_images=40, patches=5, dim=24, seed=0):
    """Random vectors of varied norms with their metadata (image ids deliberately not 0..N-1)."""
    rng = np.random.default_rng(seed)
    count = num_images * patches
    vectors = (rng.standard_normal((count, dim)) * rng.uniform(0.1, 10, (count, 1))).astype(np.float32)
    image_ids = np.repeat(rng.permutation(1000)[:num_images], patches)
    patch_index = np.tile(np.arange(patches), num_images)
    boxes = rng.integers(0, 30, (count, 4)).astype(np.float32)
    labels = np.repeat(rng.integers(0, 3, num_images), patches)
    return vectors, dict(image_ids=image_ids, patch_index=patch_index, boxes=boxes, labels=labels)


def brute_force_topk(database, queries, k, allowed=None):
    """Cosine top-k by numpy, in float64: (similarities, rows), nearest first."""
    db = database.astype(np.float64) / np.linalg.norm(database.astype(np.float64), axis=1, keepdims=True)
    q = queries.astype(np.float64) / np.linalg.norm(queries.astype(np.float64), axis=1, keepdims=True)
    cosine = q @ db.T
    if allowed is not None:
        cosine = np.where(allowed, cosine, -np.inf)
    rows = np.argsort(-cosine, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(cosine, rows, axis=1), rows


# ----------------------------------------------------------------------------- exactness
def test_flat_search_equals_numpy_topk_on_random_data():
    vectors, meta = random_patches()
    index = PatchIndex.from_vectors(vectors, **meta)
    queries = np.random.default_rng(1).standard_normal((30, vectors.shape[1])).astype(np.float32)
    similarities, rows = index.search(queries, 7)
    expected_similarities, expected_rows = brute_force_topk(vectors, queries, 7)
    assert np.array_equal(rows, expected_rows)
    assert np.allclose(similarities, expected_similarities, atol=1e-5)
    assert index.info["faiss_device"] == "cpu" and index.info["index"] == "flat" and len(index) == len(vectors)


def test_search_on_real_embeddings_equals_numpy_and_returns_patch_metadata(cifar10_npz, data_root):
    data = load_dataset("cifar10", "test", root=data_root)
    image_ids = np.array([3, 10, 0, 7, 42, 5])
    embeddings = extract_patch_embeddings(tiny_model(), data, grid(16, 8), image_ids=image_ids, dtype="float32",
                                          progress=False)
    num_patches = embeddings.num_patches
    for layer in ("h", "z"):
        vectors = embeddings.layer(layer).reshape(-1, embeddings.layer(layer).shape[-1])
        index = PatchIndex.from_embeddings(embeddings, layer)
        similarities, rows = index.search(vectors, 5)
        expected_similarities, expected_rows = brute_force_topk(vectors, vectors, 5)
        assert np.allclose(similarities, expected_similarities, atol=1e-5)
        # Rows may swap only where two similarities tie to float32 precision.
        swapped = rows != expected_rows
        assert np.allclose(similarities[swapped], expected_similarities[swapped], atol=1e-6)

        neighbours = index.query(image_id=42, patch_index=4, k=5)
        query_row = 4 * num_patches + 4  # image 42 is the fifth indexed image
        expected_similarities, expected_rows = brute_force_topk(vectors, vectors[query_row][None], 6)
        assert [n.row for n in neighbours] == list(expected_rows[0, 1:])  # the query itself comes first, left out
        for n in neighbours:
            image, patch = divmod(n.row, num_patches)
            assert n.image_id == image_ids[image] and n.patch_index == patch
            assert n.label == int(data.labels[image_ids[image]])
            assert n.box == tuple(embeddings.boxes[image, patch].tolist())
        assert np.allclose([n.similarity for n in neighbours], expected_similarities[0, 1:], atol=1e-5)


def test_query_includes_itself_only_when_asked_and_finds_patches_by_box():
    vectors, meta = random_patches()
    index = PatchIndex.from_vectors(vectors, **meta)
    image = int(meta["image_ids"][12])
    patch = int(meta["patch_index"][12])
    with_query = index.query(image, patch, k=4, include_query=True)
    without = index.query(image, patch, k=3)
    assert with_query[0].row == 12 and with_query[0].similarity == pytest.approx(1.0, abs=1e-5)
    assert [n.row for n in with_query[1:]] == [n.row for n in without]
    assert [n.row for n in index.query(image, box=meta["boxes"][12], k=3)] == [n.row for n in without]


def test_exclude_same_image_drops_the_image_and_still_returns_k():
    # Patches of one image are near-copies, so without exclusion they fill the top of the list.
    rng = np.random.default_rng(0)
    vectors, meta = random_patches(num_images=30, patches=6, dim=16)
    vectors = np.repeat(rng.standard_normal((30, 16)), 6, axis=0) + 0.01 * vectors / np.linalg.norm(
        vectors, axis=1, keepdims=True)
    index = PatchIndex.from_vectors(vectors, **meta)
    image, patch = int(meta["image_ids"][0]), 0
    assert {n.image_id for n in index.query(image, patch, k=5)} == {image}
    neighbours = index.query(image, patch, k=8, exclude_same_image=True)
    assert len(neighbours) == 8 and all(n.image_id != image for n in neighbours)
    allowed = (meta["image_ids"] != image)[None]
    _, expected_rows = brute_force_topk(vectors, vectors[:1], 8, allowed=allowed)
    assert [n.row for n in neighbours] == list(expected_rows[0])
    # By vector, per query: each query leaves out its own image.
    results = index.query_vectors(vectors[[0, 6, 12]], k=4, exclude_image_ids=meta["image_ids"][[0, 6, 12]])
    for result, row in zip(results, (0, 6, 12), strict=True):
        assert len(result) == 4 and all(n.image_id != meta["image_ids"][row] for n in result)


# ----------------------------------------------------------------------------- IVF and disk
def test_ivf_probing_every_list_equals_exact_search_and_recall_is_a_fraction():
    vectors, meta = random_patches(num_images=100, patches=4, dim=16)
    exact = PatchIndex.from_vectors(vectors, **meta)
    ivf = PatchIndex.from_vectors(vectors, **meta, kind="ivf", nlist=8, nprobe=8)
    queries = np.random.default_rng(2).standard_normal((25, 16)).astype(np.float32)
    exact_similarities, exact_rows = exact.search(queries, 10)
    ivf_similarities, ivf_rows = ivf.search(queries, 10)
    assert np.array_equal(ivf_rows, exact_rows) and np.allclose(ivf_similarities, exact_similarities, atol=1e-6)
    assert ivf.recall_at_k(10, num_queries=50) == 1.0 and exact.recall_at_k(10, num_queries=50) == 1.0
    one_list = PatchIndex.from_vectors(vectors, **meta, kind="ivf", nlist=8, nprobe=1)
    recall = one_list.recall_at_k(10, num_queries=100)
    # One of 8 lists holds about 1/8 of the vectors: a random 16-d set has true neighbours in other lists.
    assert 0.0 <= recall < 1.0
    assert one_list.info["nlist"] == 8 and one_list.info["nprobe"] == 1 and one_list.info["train_vectors"] == 400


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_save_load_round_trip_gives_identical_results(tmp_path, kind):
    vectors, meta = random_patches()
    index = PatchIndex.from_vectors(vectors, **meta, kind=kind, nlist=4, nprobe=2, info={"layer": "z"})
    index.save(tmp_path / "index")
    loaded = PatchIndex.load(tmp_path / "index")
    queries = np.random.default_rng(3).standard_normal((20, vectors.shape[1])).astype(np.float32)
    for got, expected in zip(loaded.search(queries, 6), index.search(queries, 6), strict=True):
        assert np.array_equal(got, expected)
    for name in ("image_ids", "patch_index", "boxes", "labels"):
        assert np.array_equal(getattr(loaded, name), getattr(index, name))
    assert loaded.info == index.info
    image = int(meta["image_ids"][7])
    assert loaded.query(image, 2, k=5, exclude_same_image=True) == index.query(image, 2, k=5, exclude_same_image=True)


# ----------------------------------------------------------------------------- statistics
def test_neighbour_statistics_on_data_with_known_neighbourhoods():
    # 10 images x 4 patches; images 0-4 are class 0, 5-9 class 1. A patch is its class direction
    # (weight 1) + its image direction (weight 1) + noise: the 3 other patches of its image are the
    # nearest, then the other patches of its class, then the other class.
    rng = np.random.default_rng(0)
    directions = np.linalg.qr(rng.standard_normal((64, 12)))[0].T  # 12 orthonormal directions
    image_of = np.repeat(np.arange(10), 4)
    labels = image_of // 5
    vectors = directions[labels] + directions[2 + image_of] + 0.01 * rng.standard_normal((40, 64))
    meta = dict(image_ids=image_of, patch_index=np.tile(np.arange(4), 10), boxes=np.zeros((40, 4)), labels=labels)
    index = PatchIndex.from_vectors(vectors, **meta)
    stats = neighbour_statistics(index, k=6, num_queries=40)
    assert stats["same_image"] == pytest.approx(0.5) and stats["same_class_other_image"] == pytest.approx(0.5)
    assert stats["other_class"] == 0.0 and stats["num_queries"] == 40
    assert stats["chance_same_image"] == pytest.approx(3 / 39)
    assert stats["chance_same_class_other_image"] == pytest.approx(16 / 39)
    nearer = neighbour_statistics(index, k=3, num_queries=40)
    assert nearer["same_image"] == pytest.approx(1.0) and nearer["same_class_other_image"] == 0.0


def test_neighbour_statistics_keep_each_querys_counts_that_give_the_fractions():
    # two images of 3 patches, one class each (labels 0, 1): a patch's nearest are the other patches of its image
    # (similarity ~1), then the other image's (orthogonal); k = 4 finds 2 of its image and 2 of the other one
    vectors = np.repeat(np.eye(8)[:2], 3, axis=0) + 0.01 * np.random.default_rng(0).standard_normal((6, 8))
    meta = dict(image_ids=np.repeat([0, 1], 3), patch_index=np.tile(np.arange(3), 2), boxes=np.zeros((6, 4)),
                labels=np.repeat([0, 1], 3))
    stats = neighbour_statistics(PatchIndex.from_vectors(vectors, **meta), k=4, num_queries=6)
    counts = stats["per_query"]
    assert counts == {"found": [4] * 6, "same_image": [2] * 6, "same_class_other_image": [0] * 6}
    # on real data: the counts over "found" average to the recorded fractions, per query in [0, k]
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, size=30)
    meta = dict(image_ids=np.repeat(np.arange(30), 4), patch_index=np.tile(np.arange(4), 30),
                boxes=np.zeros((120, 4)), labels=np.repeat(labels, 4))
    stats = neighbour_statistics(PatchIndex.from_vectors(rng.standard_normal((120, 16)), **meta), k=5, num_queries=50)
    found = np.array(stats["per_query"]["found"])
    for key in ("same_image", "same_class_other_image"):
        counts = np.array(stats["per_query"][key])
        assert ((0 <= counts) & (counts <= found)).all() and counts.dtype.kind == "i"
        assert np.mean(counts / found) == pytest.approx(stats[key], abs=1e-12)
    assert len(found) == stats["num_queries"] == 50


# ----------------------------------------------------------------------------- bad input
def test_bad_input_gets_clear_errors(tmp_path):
    vectors, meta = random_patches(num_images=4, patches=3, dim=8)
    index = PatchIndex.from_vectors(vectors, **meta)
    with pytest.raises(ValueError, match=r"queries must be Q x 8"):
        index.search(np.zeros((2, 9), np.float32), 3)
    with pytest.raises(ValueError, match=r"k=13 is larger than the 12 vectors"):
        index.search(vectors[:1], 13)
    with pytest.raises(ValueError, match=r"k=10 is larger than the 9 vectors"):
        index.query(int(meta["image_ids"][0]), 0, k=10, exclude_same_image=True)
    with pytest.raises(ValueError, match=r"k must be a positive integer"):
        index.search(vectors[:1], 0)
    empty = {name: array[:0] for name, array in meta.items()}
    with pytest.raises(ValueError, match=r"non-empty V x D array.*at least one patch vector"):
        PatchIndex.from_vectors(np.zeros((0, 8), np.float32), **empty)
    with pytest.raises(ValueError, match=r"the index is empty"):
        PatchIndex(faiss.IndexFlatIP(8), info={}, **empty)
    with pytest.raises(ValueError, match=r"image_ids must have shape \(12,\)"):
        PatchIndex.from_vectors(vectors, **{**meta, "image_ids": meta["image_ids"][:5]})
    with pytest.raises(ValueError, match=r"unknown index kind 'hnsw'"):
        PatchIndex.from_vectors(vectors, **meta, kind="hnsw")
    with pytest.raises(ValueError, match=r"nlist must be between 1 and the number of vectors \(12\)"):
        PatchIndex.from_vectors(vectors, **meta, kind="ivf", nlist=50)
    with pytest.raises(ValueError, match=r"NaN or infinite"):
        PatchIndex.from_vectors(np.full((12, 8), np.nan, np.float32), **meta)
    with pytest.raises(ValueError, match=r"image 123456 is not in the index"):
        index.query(123456, 0)
    with pytest.raises(ValueError, match=r"has no patch 7 in the index"):
        index.query(int(meta["image_ids"][0]), 7)
    with pytest.raises(FileNotFoundError, match=r"no patch index at .*missing index.faiss"):
        PatchIndex.load(tmp_path)
    embeddings = PatchEmbeddings(h=vectors.reshape(4, 3, 8), z=None, pre_feature=None, boxes=np.zeros((4, 3, 4)),
                                 image_ids=np.arange(4), labels=np.zeros(4, np.int64))
    with pytest.raises(ValueError, match=r"no layer 'z'"):
        PatchIndex.from_embeddings(embeddings, "z")
    with pytest.raises(ValueError, match=r"unknown layer 'q'"):
        PatchIndex.from_embeddings(embeddings, "q")


# ----------------------------------------------------------------------------- figure and command line
def test_fewer_patches_than_queries_asked_records_and_prints_the_number_used(cifar10_npz, data_root, tmp_path,
                                                                               capsys):
    # was: "200 random query patches" printed and recorded where the 18 indexed patches were all the queries
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(tiny_model(), checkpoint)
    summary = main(["--model", str(checkpoint), "--data", "cifar10", "--data-root", str(data_root), "--device", "cpu",
                    "--num-images", "2", "--num-queries", "200", "--neighbours", "4", "--no-progress",
                    "--out", str(tmp_path / "figures")])
    used = summary["layers"]["h"]["statistics"]["num_queries"]
    assert used == 2 * 9  # 3 x 3 patches of 16 px at stride 8 on each 32 px image
    assert summary["num_queries"] == used and summary["num_queries_asked"] == 200
    written = json.loads((tmp_path / "figures" / "retrieval_tiny_cifar10.json").read_text())
    assert written["num_queries"] == used and written["num_queries_asked"] == 200
    assert f"nearest of {used} random query patches among {used}" in capsys.readouterr().out


def test_command_line_writes_figure_and_numbers(cifar10_npz, data_root, tmp_path):
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(tiny_model(), checkpoint)
    summary = main(["--model", str(checkpoint), "--data", "cifar10", "--data-root", str(data_root), "--device", "cpu",
                    "--num-images", "12", "--num-queries", "30", "--neighbours", "4", "--query-image", "2",
                    "--out", str(tmp_path / "figures"), "--save-index", str(tmp_path / "index")])
    written = json.loads((tmp_path / "figures" / "retrieval_tiny_cifar10.json").read_text())
    assert (tmp_path / "figures" / "retrieval_tiny_cifar10.png").stat().st_size > 10_000
    assert written["query"] == {"image_id": 2, "patch_index": 4, "box": [8.0, 8.0, 24.0, 24.0],
                                "label": int(load_dataset("cifar10", "test", root=data_root).labels[2])}
    for layer in ("z", "h"):
        stats = written["layers"][layer]["statistics"]
        parts = stats["same_image"] + stats["same_class_other_image"] + stats["other_class"]
        assert parts == pytest.approx(1.0) and stats["num_queries"] == 30
        assert len(written["layers"][layer]["figure_neighbours"]) == 4
        # The saved index answers the figure's query with the neighbours the figure shows.
        loaded = PatchIndex.load(tmp_path / "index" / layer)
        assert [n.row for n in loaded.query(2, 4, k=4)] == \
            [n["row"] for n in written["layers"][layer]["figure_neighbours"]]
    assert summary["num_images"] == 12
    # The JSON says how to make it again, as the other analyses' do.
    assert written["command"].startswith("python -m ssl_patch_analysis.retrieval --model ")
    assert "--neighbours 4" in written["command"] and summary["command"] == written["command"]


def test_plot_marks_relations_in_the_legend():
    vectors, meta = random_patches(num_images=6, patches=4, dim=8)
    meta["image_ids"] = np.repeat(np.arange(6), 4)
    meta["boxes"] = np.tile(np.array([[0, 0, 16, 16]], np.float32), (24, 1))
    index = PatchIndex.from_vectors(vectors, **meta)

    class Images:
        def get_batch(self, ids):
            return torch.zeros(len(ids), 3, 32, 32, dtype=torch.uint8)

    fig = plot_retrieval(Images(), 0, meta["boxes"][0], int(meta["labels"][0]),
                         {"z": index.query(0, 0, k=5), "h": index.query(0, 0, k=5)}, title="tiny on random")
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["query patch", "same image", "same class, other image", "other class"]
    assert len(fig.axes) == 2 * 6 and fig.axes[0].get_ylabel() == "projection z"


# ----------------------------------------------------------------------------- the library function
def test_patch_retrieval_result_is_what_the_command_writes(cifar10_npz, data_root, tmp_path, capsys):
    checkpoint, store = tmp_path / "tiny.pt", tmp_path / "store"
    save_checkpoint(tiny_model(), checkpoint)
    summary = main(["--model", str(checkpoint), "--data", "cifar10", "--data-root", str(data_root), "--device", "cpu",
                    "--num-images", "10", "--num-queries", "25", "--neighbours", "5", "--query-image", "3",
                    "--query-patch", "1", "--exclude-same-image", "--seed", "4", "--store", str(store),
                    "--out", str(tmp_path / "figures")])
    printed = capsys.readouterr().out
    written = json.loads((tmp_path / "figures" / "retrieval_tiny_cifar10.json").read_text())

    data = load_dataset("cifar10", "test", root=data_root)
    settings = RetrievalSettings(num_images=10, num_queries=25, k=5, query_image=3, query_patch=1,
                                 exclude_same_image=True, seed=4)
    # The command's store: the same embeddings, and the same record of how they were computed (speed included).
    result = patch_retrieval(load_model(checkpoint, device="cpu", verbose=False), data, settings, device="cpu",
                             store=store)
    assert result.to_json() == {key: value for key, value in written.items() if key not in ("command", "output_of")}
    assert summary["layers"]["h"]["statistics"] == result.layers["h"].statistics.to_dict()
    assert list(result.layers) == ["z", "h"] and result.num_images == 10 and result.num_indexed_patches == 90
    assert result.query == RetrievalQuery(image_id=3, patch_index=1, box=(8.0, 0.0, 24.0, 16.0),
                                          label=int(data.labels[3]))
    for name, layer in result.layers.items():
        assert len(layer.figure_neighbours) == 5 and all(n.image_id != 3 for n in layer.figure_neighbours)
        assert layer.statistics.recall_at_k is None and "recall_at_k" not in written["layers"][name]["statistics"]
    assert format_table(result.table_rows(), result.table_headers()) in printed  # the command prints the result's
    fig = plot_retrieval_result(result, data)
    assert fig.get_suptitle().startswith(f"Nearest patches: {result.model} on {result.data}\n")


def test_patch_retrieval_statistics_and_neighbours_equal_brute_force_cosine(cifar10_npz, data_root):
    data, model = load_dataset("cifar10", "test", root=data_root), tiny_model()
    embeddings = extract_patch_embeddings(model, data, grid(16, 8), image_ids=np.arange(12), dtype="float32",
                                          progress=False)
    # An IVF index probing all its lists searches exactly: recall 1, and the brute-force neighbours.
    settings = RetrievalSettings(num_images=12, k=4, num_queries=40, index="ivf", nlist=4, nprobe=4, seed=1)
    result = patch_retrieval(model, data, settings, embeddings=embeddings)
    image_of = np.repeat(np.arange(12), 9)
    labels = np.repeat(np.asarray(data.labels)[:12], 9)

    def brute_force_nearest(row, k=4):
        others = np.delete(np.arange(len(cosine)), row)
        return others[np.argsort(-cosine[row, others], kind="stable")[:k]]

    for layer in ("z", "h"):
        vectors = embeddings.layer(layer).reshape(12 * 9, -1).astype(np.float64)
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        cosine = unit @ unit.T
        stats = result.layers[layer].statistics
        rows = np.array(stats.query_rows)
        assert stats.k == 4 and stats.num_queries == 40 and len(set(rows.tolist())) == 40
        nearest = np.stack([brute_force_nearest(r) for r in rows])
        same_image = image_of[nearest] == image_of[rows][:, None]
        same_class_other_image = (labels[nearest] == labels[rows][:, None]) & ~same_image
        assert stats.same_image == pytest.approx(same_image.mean(), abs=1e-12)
        assert stats.same_class_other_image == pytest.approx(same_class_other_image.mean(), abs=1e-12)
        assert stats.other_class == pytest.approx(1 - same_image.mean() - same_class_other_image.mean(), abs=1e-12)
        assert stats.mean_similarity == pytest.approx(np.take_along_axis(cosine[rows], nearest, 1).mean(), abs=1e-5)
        assert stats.chance_same_image == pytest.approx(8 / 107)
        class_patches = np.array([(labels == labels[r]).sum() for r in rows])
        assert stats.chance_same_class_other_image == pytest.approx(np.mean((class_patches - 9) / 107))
        assert stats.recall_at_k == 1.0
        # The figure's query: the patch nearest the centre of image 0 (patch 4 of the 3 x 3 grid).
        assert result.query.patch_index == 4
        assert [n.row for n in result.layers[layer].figure_neighbours] == brute_force_nearest(4).tolist()
    assert result.table_headers()[-1] == "recall@4" and [row[-1] for row in result.table_rows()] == [1.0, 1.0]


def test_patch_retrieval_refuses_settings_the_data_does_not_allow(cifar10_npz, data_root, tmp_path, capsys):
    data, model = load_dataset("cifar10", "test", root=data_root), tiny_model()
    with pytest.raises(RetrievalSettingError, match=rf"num_images {len(data) + 1} must be between 1 and {len(data)}"):
        patch_retrieval(model, data, RetrievalSettings(num_images=len(data) + 1))
    with pytest.raises(RetrievalSettingError, match=r"query_image 5 must be one of the indexed images 0\.\.4") as error:
        embed_grid_patches(model, data, RetrievalSettings(num_images=5, query_image=5))
    assert error.value.setting == "query_image" and error.value.value == 5
    embeddings = embed_grid_patches(model, data, RetrievalSettings(num_images=3))
    with pytest.raises(RetrievalSettingError, match=r"query_patch 9 must be in 0\.\.8 \(patches per image\)"):
        patch_retrieval(model, data, RetrievalSettings(num_images=3, query_patch=9, k=2), embeddings=embeddings)
    with pytest.raises(ValueError, match=r"embeddings must hold the grid patches of images 0\.\.3 .* got 3 images"):
        patch_retrieval(model, data, RetrievalSettings(num_images=4, k=2), embeddings=embeddings)
    # The command names its own flag.
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(model, checkpoint)
    with pytest.raises(SystemExit) as exit_:
        main(["--model", str(checkpoint), "--data", "cifar10", "--data-root", str(data_root), "--device", "cpu",
              "--num-images", "3", "--neighbours", "2", "--query-patch", "9", "--out", str(tmp_path / "figures")])
    assert exit_.value.code == 2
    assert "error: --query-patch must be in 0..8 (patches per image)" in capsys.readouterr().err


def test_no_progress_silences_the_embedding_bar_too(tmp_path, capsys):
    # retrieval --no-progress still drew the extraction's bar ("embedding 9 patches/img: ...") on stderr
    data = torch.rand(3, 3, 32, 32)
    embed_grid_patches(tiny_model(), data, RetrievalSettings(num_images=3, patch_size=16, stride=8), progress=False)
    assert "patches/img" not in capsys.readouterr().err
    embed_grid_patches(tiny_model(), data, RetrievalSettings(num_images=3, patch_size=16, stride=8), progress=True)
    assert "patches/img" in capsys.readouterr().err
