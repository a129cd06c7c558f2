"""Compressed patch indexes built by streaming from a store (issue 16): exact after re-ranking, in bounded memory,
resumable, refused when damaged, and accepted by the retrieval command, its statistics and the browser."""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import faiss  # isort: skip

import numpy as np
import pytest

from ssl_patch_analysis import index as index_module
from ssl_patch_analysis import retrieval
from ssl_patch_analysis.index import ArrayVectors, StoreVectors, exact_search
from ssl_patch_analysis.retrieval import DamagedIndexError, PatchIndex, neighbour_statistics
from ssl_patch_analysis.store import StoreLayout, StoreWriter, prepare_store, store_lock

ROOT = Path(__file__).resolve().parents[1]


def clustered_vectors(num_images, patches, dim, seed=0, spread=0.5):
    """``num_images x patches x dim`` float32: each image's patches near its own random centre (cosine ~0.8 between
    them, ~0 to other images'), so a patch's nearest neighbours are its image's other patches."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_images, 1, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=2, keepdims=True)
    noise = rng.standard_normal((num_images, patches, dim)).astype(np.float32) * (spread / np.sqrt(dim))
    return centres + noise


def write_store(path, vectors, batch_size=16, labels=None):
    """A complete float16 store of ``vectors`` (``N x P x D``) as the extract command writes one, batch by batch."""
    n, p, d = vectors.shape
    labels = np.arange(n) % 3 if labels is None else labels
    layout = StoreLayout(num_patches=p, layer_dims={"h": d}, image_ids=np.arange(n) * 2 + 1, labels=labels,
                         batch_size=batch_size, dtype="float16")
    boxes = np.broadcast_to(np.arange(p * 4, dtype=np.float32).reshape(p, 4), (n, p, 4))
    with store_lock(path):
        plan = prepare_store(path, {"test": "retrieval_scale"}, layout)
        with StoreWriter(plan.path) as writer:
            for batch in writer.pending_batches():
                span = writer.batch_rows(batch)
                writer.write_batch(batch, {"h": vectors[span].astype(np.float16), "boxes": boxes[span]})
            writer.mark_complete()
    return path


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """These indexes are small: one thread each, rather than OpenMP threads waiting on busy cores."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def brute_force(store_vectors, queries, k, float16=True):
    """Cosine top-k in float64 over the float16 values the store holds (or the values given): (similarities, rows)."""
    db = store_vectors.reshape(-1, store_vectors.shape[-1])
    db = (db.astype(np.float16) if float16 else db).astype(np.float64)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = queries.astype(np.float64) / np.linalg.norm(queries.astype(np.float64), axis=1, keepdims=True)
    cosine = q @ db.T
    rows = np.argsort(-cosine, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(cosine, rows, axis=1), rows


# ----------------------------------------------------------------------------- exact after re-ranking
@pytest.mark.parametrize("kind, nbits", [("ivfpq", 8), ("ivfpq", 4), ("opq-ivfpq", 4)])
def test_compressed_index_re_ranked_returns_exact_neighbours_and_cosines(tmp_path, kind, nbits):
    vectors = clustered_vectors(60, 20, 32, seed=1)
    store = write_store(tmp_path / "store", vectors)
    index = PatchIndex.from_store(store, "h", kind=kind, nlist=4, nprobe=4, pq_m=8, nbits=nbits, rerank=60,
                                  train_size=1200)
    assert index.info["index"] == kind and index.info["rerank"] == 60 and isinstance(index.exact_vectors, StoreVectors)
    assert index.info["faiss_factory"] == ("OPQ8," if kind == "opq-ivfpq" else "") + \
        f"IVF4,PQ8x{'4fs' if nbits == 4 else '8np'}"
    queries = vectors[::7, 3] + 0.05 * np.random.default_rng(2).standard_normal((9, 32)).astype(np.float32)
    similarities, rows = index.search(queries, 10)
    expected_similarities, expected_rows = brute_force(vectors, queries, 10)
    assert np.array_equal(rows, expected_rows)
    assert np.allclose(similarities, expected_similarities, atol=1e-5)
    # Without re-ranking, the codes' estimates: close, not exact.
    index.set_search(rerank=0)
    approximate, _ = index.search(queries, 10)
    assert not np.allclose(approximate, expected_similarities, atol=1e-5)
    # Queries by patch use the exact stored vector; recall is measured by streaming exact search over the store.
    index.set_search(rerank=60)
    assert index.recall_at_k(10, num_queries=40) == 1.0
    neighbours = index.query(image_id=int(index.image_ids[45]), patch_index=5, k=5)
    _, expected = brute_force(vectors, vectors.reshape(-1, 32)[45:46], 6)
    assert [n.row for n in neighbours] == expected[0, 1:].tolist()


def test_statistics_of_a_re_ranked_index_equal_the_flat_index_s(tmp_path):
    vectors = clustered_vectors(40, 10, 16, seed=3)
    labels = np.arange(40) % 4
    store = write_store(tmp_path / "store", vectors, labels=labels)
    flat = PatchIndex.from_store(store, "h")
    compressed = PatchIndex.from_store(store, "h", kind="ivfpq", nlist=2, nprobe=2, pq_m=4, nbits=4, rerank=400)
    got, want = (neighbour_statistics(index, k=6, num_queries=50) for index in (compressed, flat))
    assert np.array_equal(got.pop("query_rows"), want.pop("query_rows"))
    assert got.pop("per_query") == want.pop("per_query")  # each query's neighbour counts, exactly
    assert got == pytest.approx(want, abs=1e-6)
    for image_id, patch in ((1, 0), (41, 7)):
        got = compressed.query(image_id, patch, k=5, exclude_same_image=True)
        want = flat.query(image_id, patch, k=5, exclude_same_image=True)
        assert [n.row for n in got] == [n.row for n in want]
        assert np.allclose([n.similarity for n in got], [n.similarity for n in want], atol=1e-6)


def test_streamed_exact_search_equals_brute_force_across_chunks():
    vectors = np.random.default_rng(4).standard_normal((1000, 24)).astype(np.float32)
    queries = np.random.default_rng(5).standard_normal((7, 24)).astype(np.float32)
    unit = retrieval.normalised_float32(queries)
    similarities, rows = exact_search(ArrayVectors(vectors), unit, 12, chunk_vectors=97)
    expected_similarities, expected_rows = brute_force(vectors, queries, 12, float16=False)
    assert np.array_equal(rows, expected_rows) and np.allclose(similarities, expected_similarities, atol=1e-5)


# ----------------------------------------------------------------------------- bounded memory
CHILD = textwrap.dedent("""
    import json, os, resource, sys
    import numpy as np
    from ssl_patch_analysis.retrieval import PatchIndex
    from ssl_patch_analysis.index import ArrayVectors, exact_search, normalised_float32
    import faiss
    faiss.omp_set_num_threads(1)

    store, out, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])

    def status(key):
        line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
        return int(line.split()[1]) * 1024

    # Warm up what allocates once per process (OpenMP threads, their malloc arenas) before the limit.
    warm = normalised_float32(np.random.default_rng(0).standard_normal((4096, 64)).astype(np.float32))
    PatchIndex.from_vectors(warm, np.arange(4096), np.zeros(4096), np.zeros((4096, 4)), np.zeros(4096),
                            kind="ivfpq", nlist=4, pq_m=8, nbits=4).search(warm[:8], 4)
    exact_search(ArrayVectors(warm), warm[:8], 4)
    limit = status("VmSize") + budget
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    rss_before = status("VmRSS")
    try:  # the limit binds: the store's vectors could not even be held once
        np.ones(os.path.getsize(os.path.join(store, "h.npy")), np.uint8)
        whole_store_fits = True
    except MemoryError:
        whole_store_fits = False
    PatchIndex.from_store(store, "h", kind="ivfpq", nlist=16, nprobe=16, pq_m=64, nbits=4, rerank=100,
                          train_size=4096, chunk_vectors=8192, save_to=out)
    index = PatchIndex.load(out)
    queries = np.load(os.path.join(out, "..", "queries.npy"))
    similarities, rows = index.search(queries, 10)
    json.dump({"rows": rows.tolist(), "similarities": similarities.tolist(), "whole_store_fits": whole_store_fits,
               "peak_growth": status("VmHWM") - rss_before, "limit": limit}, sys.stdout)
""")


def test_a_store_larger_than_the_memory_allowed_is_indexed_and_queried_exactly(tmp_path):
    # 5,000 images x 40 patches x 512 float16: a 205 MB store; the build may grow by 120 MB of address space.
    vectors = clustered_vectors(5000, 40, 512, seed=6)
    store = write_store(tmp_path / "store", vectors, batch_size=50)
    store_bytes = (store / "h.npy").stat().st_size
    budget = 120 * 2**20
    assert store_bytes > 1.5 * budget
    queries = vectors[::499, 7] + 0.1 * np.random.default_rng(7).standard_normal((11, 512)).astype(np.float32)
    np.save(tmp_path / "queries.npy", queries)
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", CHILD, str(store), str(tmp_path / "index"), str(budget)],
                          capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert not result["whole_store_fits"]
    assert result["peak_growth"] < budget < store_bytes, result["peak_growth"]
    # Exact search over the store (float32, streamed: exact_search equals numpy above).
    expected_similarities, expected_rows = exact_search(StoreVectors(store, "h"), retrieval.normalised_float32(queries),
                                                        10)
    assert np.array_equal(result["rows"], expected_rows)
    assert np.allclose(result["similarities"], expected_similarities, atol=1e-6)


# ----------------------------------------------------------------------------- resumable builds
class Interrupted(Exception):
    pass


def test_an_interrupted_build_resumes_where_it_stopped_and_gives_the_same_index(tmp_path, monkeypatch, capsys):
    vectors = clustered_vectors(120, 20, 32, seed=8)
    store = write_store(tmp_path / "store", vectors, batch_size=10)  # 200 vectors a batch
    options = dict(kind="ivfpq", nlist=8, nprobe=8, pq_m=8, nbits=4, train_size=1000, chunk_vectors=400,
                   checkpoint_every=2)
    reference = PatchIndex.from_store(store, "h", **options, save_to=tmp_path / "reference")

    chunks = StoreVectors.chunks
    read = []

    def interrupted_after(count):
        def patched(self, start, size):
            for done, chunk in enumerate(chunks(self, start, size)):
                if done == count:
                    raise Interrupted
                read.append(chunk[0])
                yield chunk
        return patched

    monkeypatch.setattr(StoreVectors, "chunks", interrupted_after(5))
    with pytest.raises(Interrupted):
        PatchIndex.from_store(store, "h", **options, save_to=tmp_path / "index")
    record = json.loads((tmp_path / "index" / ".build.json").read_text())
    assert record["vectors"] == 1600 and (tmp_path / "index" / ".build.1600.faiss").is_file()
    assert not (tmp_path / "index" / "index.faiss").exists()  # nothing half-saved

    read.clear()
    monkeypatch.setattr(StoreVectors, "chunks", interrupted_after(10**9))
    resumed = PatchIndex.from_store(store, "h", **options, save_to=tmp_path / "index")
    assert read == [1600, 2000]  # only the chunks after the checkpoint
    assert "resuming the index build" in capsys.readouterr().err
    assert faiss.serialize_index(resumed.cpu_index).tobytes() == faiss.serialize_index(reference.cpu_index).tobytes()
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == [".lock", "index.faiss", "info.json",
                                                                       "metadata.npz"]
    loaded = PatchIndex.load(tmp_path / "index")
    queries = vectors[::13, 1]
    assert all(np.array_equal(a, b) for a, b in zip(loaded.search(queries, 8), reference.search(queries, 8),
                                                     strict=True))


@pytest.mark.parametrize("damage", ["other settings", "flipped bytes"])
def test_a_checkpoint_of_other_settings_or_damaged_is_not_resumed(tmp_path, monkeypatch, capsys, damage):
    vectors = clustered_vectors(60, 10, 16, seed=9)
    store = write_store(tmp_path / "store", vectors, batch_size=6)
    folder = tmp_path / "index"
    options = dict(kind="ivfpq", nlist=4, pq_m=4, nbits=4, chunk_vectors=60, checkpoint_every=1, save_to=folder)
    chunks = StoreVectors.chunks

    def interrupted(self, start, size):
        yield from list(chunks(self, start, size))[:3]
        raise Interrupted

    monkeypatch.setattr(StoreVectors, "chunks", interrupted)
    with pytest.raises(Interrupted):
        PatchIndex.from_store(store, "h", **options)
    monkeypatch.undo()
    record = json.loads((folder / ".build.json").read_text())
    if damage == "other settings":
        options["pq_m"] = 8
    else:
        file = folder / record["file"]
        data = bytearray(file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        file.write_bytes(bytes(data))
    rebuilt = PatchIndex.from_store(store, "h", **options)
    reason = "made with other settings" if damage == "other settings" else "does not match its checksum"
    assert re.search(rf"not resuming the partial index in .*{reason}.*building it again", capsys.readouterr().err)
    assert len(rebuilt) == 600 and not list(folder.glob(".build*"))
    reference = PatchIndex.from_store(store, "h", **{**options, "save_to": None})
    assert faiss.serialize_index(rebuilt.cpu_index).tobytes() == faiss.serialize_index(reference.cpu_index).tobytes()


# ----------------------------------------------------------------------------- saved compressed indexes
def saved_ivfpq(tmp_path):
    vectors = clustered_vectors(50, 10, 32, seed=10)
    store = write_store(tmp_path / "store", vectors)
    PatchIndex.from_store(store, "h", kind="opq-ivfpq", nlist=4, nprobe=4, pq_m=8, nbits=4, rerank=50,
                          save_to=tmp_path / "index", command="python -m ssl_patch_analysis.retrieval --index ivfpq")
    return tmp_path / "index", store, vectors


@pytest.mark.parametrize("name", ["index.faiss", "metadata.npz", "info.json"])
def test_a_damaged_saved_ivfpq_index_is_refused_naming_the_file(tmp_path, name):
    folder, _, _ = saved_ivfpq(tmp_path)
    info = json.loads((folder / "info.json").read_text())
    assert info["index"] == "opq-ivfpq" and info["vectors"]["source"] == "store" and info["rerank"] == 50
    file = folder / name
    data = bytearray(file.read_bytes())
    for offset in (len(data) // 3, len(data) // 2, len(data) - 2):
        data[offset] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(DamagedIndexError) as error:
        PatchIndex.load(folder)
    message = str(error.value)
    assert error.value.file == name and "\n" not in message and "rebuild it" in message
    assert "--index ivfpq --overwrite" in message or name == "info.json"


def test_a_saved_index_finds_its_store_and_refuses_another(tmp_path):
    folder, store, vectors = saved_ivfpq(tmp_path)
    queries = vectors[::9, 2]
    loaded = PatchIndex.load(folder)
    assert np.array_equal(loaded.search(queries, 5)[1], brute_force(vectors, queries, 5)[1])
    # The store moved: named where it is now, it is used; without it, only the codes' estimates are available.
    moved = tmp_path / "moved"
    store.rename(moved)
    with pytest.raises(ValueError, match=r"re-ranks against the store at .*store.* pass vectors=STORE.*rerank=0"):
        PatchIndex.load(folder)
    assert np.array_equal(PatchIndex.load(folder, vectors=moved).search(queries, 5)[1], loaded.search(queries, 5)[1])
    assert PatchIndex.load(folder, rerank=0).search(queries, 5)[1].shape == (len(queries), 5)
    # Another store in its place (made again: another id) is refused, with the way to rebuild the index.
    write_store(store, vectors)
    with pytest.raises(ValueError, match=r"not the one the index .* was built from.*rebuild it"):
        PatchIndex.load(folder)


def test_settings_the_vectors_do_not_allow_are_named(tmp_path):
    vectors, ids = np.random.default_rng(0).standard_normal((300, 24)).astype(np.float32), np.arange(300)
    meta = dict(image_ids=ids, patch_index=np.zeros(300), boxes=np.zeros((300, 4)), labels=np.zeros(300))
    with pytest.raises(ValueError, match=r"pq_m \(--pq-m\) must divide the dimension 24: one of 1, 2, 3, 4, 6, 8"):
        PatchIndex.from_vectors(vectors, **meta, kind="ivfpq", nlist=2, pq_m=5)
    with pytest.raises(ValueError, match=r"8-bit codes need at least 2\*\*8 = 256 training vectors.*nbits.* <= 7"):
        PatchIndex.from_vectors(vectors[:200], **{k: v[:200] for k, v in meta.items()}, kind="ivfpq", nlist=2)
    with pytest.raises(ValueError, match=r"rerank must be at least 0"):
        PatchIndex.from_vectors(vectors, **meta, kind="ivfpq", nlist=2, pq_m=4, nbits=4, rerank=-1)
    flat = PatchIndex.from_vectors(vectors, **meta)
    with pytest.raises(ValueError, match=r"nprobe applies to the IVF kinds"):
        flat.set_search(nprobe=4)
    with pytest.raises(ValueError, match=r"no exact vectors to re-rank against"):
        flat.set_search(rerank=10)


@pytest.mark.skipif(index_module.faiss_has_gpu(), reason="this faiss has GPU support and sees a GPU")
def test_multi_gpu_is_refused_clearly_without_gpu_faiss(capsys):
    vectors = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    meta = dict(image_ids=np.arange(300), patch_index=np.zeros(300), boxes=np.zeros((300, 4)), labels=np.zeros(300))
    refused = r"--multi-gpu shard (needs faiss with GPU support.*CPU-only|: faiss sees no GPU)"
    with pytest.raises(ValueError, match=refused):
        PatchIndex.from_vectors(vectors, **meta, kind="ivf", nlist=4, multi_gpu="shard")
    # The command refuses before loading anything: one line, exit status 2.
    with pytest.raises(SystemExit) as exit_:
        retrieval.main(["--multi-gpu", "shard", "--model", "no-such-model"])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert re.search(refused, error) and error.count("\n") == 1


# ----------------------------------------------------------------------------- the command, the figure, the browser
def test_the_retrieval_command_and_the_browser_accept_a_compressed_index(cifar10_npz, data_root, tmp_path):
    import helpers
    from ssl_patch_analysis.browser import PatchBrowser, embed_data
    from ssl_patch_analysis.checkpoints import save_checkpoint
    from ssl_patch_analysis.data import load_dataset

    model = helpers.tiny_model()
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(model, checkpoint)
    common = ["--model", str(checkpoint), "--data", "cifar10", "--data-root", str(data_root), "--device", "cpu",
              "--num-images", "12", "--num-queries", "30", "--neighbours", "4", "--query-image", "2", "--no-progress",
              "--store", str(tmp_path / "store")]
    flat = retrieval.main([*common, "--out", str(tmp_path / "flat")])
    compressed = retrieval.main([*common, "--out", str(tmp_path / "pq"), "--index", "ivfpq", "--nlist", "2",
                                 "--nprobe", "2", "--pq-m", "4", "--nbits", "4", "--rerank", "108",
                                 "--save-index", str(tmp_path / "index")])
    for layer in ("z", "h"):
        assert compressed["layers"][layer]["index"]["index"] == "ivfpq"
        got, want = (result["layers"][layer]["figure_neighbours"] for result in (compressed, flat))
        want_figure = want
        assert [n["row"] for n in got] == [n["row"] for n in want]
        assert [n["similarity"] for n in got] == pytest.approx([n["similarity"] for n in want], abs=1e-6)
        got, want = (result["layers"][layer]["statistics"] for result in (compressed, flat))
        for key in ("same_image", "same_class_other_image", "other_class", "mean_similarity"):
            assert got[key] == pytest.approx(want[key])
        assert got["recall_at_k"] == 1.0
        loaded = PatchIndex.load(tmp_path / "index" / layer)  # re-opens the store to re-rank
        assert [n.row for n in loaded.query(2, 4, k=4)] == [n["row"] for n in want_figure]
    assert (tmp_path / "pq" / "retrieval_tiny_cifar10.png").stat().st_size > 10_000

    source = embed_data(model, load_dataset("cifar10", "test", root=data_root), num_images=12,
                        cache=tmp_path / "cache", device="cpu", progress=False)
    exact = PatchBrowser(model, {"cifar10": source}, k=5, layer="h")
    source.indexes = {layer: PatchIndex.from_embeddings(source.embeddings, layer, kind="ivfpq", nlist=2, pq_m=4,
                                                        nbits=4, rerank=108) for layer in source.indexes}
    assert all(isinstance(i.exact_vectors, StoreVectors) for i in source.indexes.values())  # the browser's cache
    browser = PatchBrowser(model, {"cifar10": source}, k=5, layer="h")
    for layer in ("z", "h"):
        for control in (exact, browser):
            control.select(image_id=int(source.embeddings.image_ids[3]), row=1, col=2, layer=layer)
        assert [(n.row, round(n.similarity, 5)) for n in browser.neighbours] == \
            [(n.row, round(n.similarity, 5)) for n in exact.neighbours]
