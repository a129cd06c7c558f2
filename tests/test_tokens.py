"""A Vision Transformer's own patch tokens as patch embeddings (``--tokens``), checked against a hand-written ViT.

The ViTs are tiny random ones saved in DINO's raw and full layouts (``test_vit``'s writers); the
reference tokens, class token and DINO head are computed from the saved tensors alone
(``test_vit._reference_tokens``, ``_reference_dino_head``), on real CIFAR-10 images.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import helpers
from ssl_patch_analysis import convergence, evaluate, extract, heatmap
from ssl_patch_analysis.checkpoints import load_model, save_checkpoint
from ssl_patch_analysis.data import load_dataset
from ssl_patch_analysis.extract import (
    TokenSampler,
    extract_patch_embeddings,
    extract_token_embeddings,
    token_sampler,
    whole_image_embeddings,
)
from ssl_patch_analysis.patches import grid
from ssl_patch_analysis.store import PatchEmbeddings
from test_vit import (
    CIFAR10,
    IMAGENET,
    _dino_head,
    _layer_norm,
    _normalize,
    _reference_dino_head,
    _reference_tokens,
    _vit_state,
)

ATOL = 1e-4
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # DINO's head is weight-normalised


@pytest.fixture(scope="module")
def cifar(cifar10_npz):
    return load_dataset("cifar10", "test", root=cifar10_npz.parent)


@pytest.fixture(scope="module")
def raw_vit(tmp_path_factory):
    """DINO's raw backbone layout (dino_deitsmall16_pretrain.pth): width 48, 2 blocks, 8 px patches, 32 px input."""
    state = _vit_state(width=48, depth=2, patch=8, grid=4, seed=21)
    path = tmp_path_factory.mktemp("raw") / "dino_vit.pth"
    torch.save(state, path)
    return state, path


@pytest.fixture(scope="module")
def dino_full(tmp_path_factory):
    """DINO's full checkpoint: the teacher ViT and its head, which is the projector z."""
    vit = _vit_state(width=48, depth=2, patch=8, grid=4, seed=22)
    head = _dino_head(48, 23).state_dict()
    path = tmp_path_factory.mktemp("full") / "checkpoint.pth"
    teacher = {**{f"backbone.{k}": v for k, v in vit.items()}, **{f"head.{k}": v for k, v in head.items()}}
    torch.save({"teacher": teacher, "student": {}, "args": argparse.Namespace(arch="vit_tiny")}, path)
    return vit, head, path


def _pixels(data, ids) -> torch.Tensor:
    return data.get_batch(list(ids)).float() / 255


def _reference(state, x, mean_std, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(class token, patch tokens B x P x D) after the final norm, of the blocks up to ``block``, from the weights."""
    if block is not None:
        state = {k: v for k, v in state.items() if not k.startswith("blocks.") or int(k.split(".")[1]) <= block}
    tokens = _layer_norm(_reference_tokens(state, _normalize(x, mean_std), heads=3), state, "norm")
    return tokens[:, 0], tokens[:, 1:]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


# ----------------------------------------------------------------------------- (a) (b) the stored tokens


def test_stored_tokens_are_the_reference_vits_tokens_with_their_pixel_squares(tmp_path, cifar, raw_vit):
    state, path = raw_vit
    model = load_model(path, num_heads=3, verbose=False)
    ids = [0, 5, 9]
    x = _pixels(cifar, ids)
    for block in (None, 0):
        stored = extract_token_embeddings(model, cifar, block=block, image_ids=ids, out=tmp_path / f"store{block}",
                                          dtype="float32", device="cpu", progress=False)
        reloaded = PatchEmbeddings.load(tmp_path / f"store{block}")
        cls, tokens = _reference(state, x, CIFAR10, block)
        assert reloaded.h.shape == (3, 16, 48) and reloaded.z is None
        np.testing.assert_allclose(reloaded.h, tokens.numpy(), atol=ATOL)
        np.testing.assert_allclose(whole_image_embeddings(model, cifar, block=block, image_ids=ids)["h"], cls.numpy(),
                                   atol=ATOL)
        assert stored.meta["sampler"] == {"kind": "tokens", "grid": [4, 4], "token_size": 8, "input_size": 32,
                                          "block": 1 if block is None else 0}
        assert stored.meta["tokens"]["block"] == (1 if block is None else 0) and stored.meta["tokens"]["depth"] == 2
    squares = [[8 * j, 8 * i, 8 * j + 8, 8 * i + 8] for i in range(4) for j in range(4)]
    assert np.array_equal(reloaded.boxes, np.broadcast_to(np.float32(squares), (3, 16, 4)))
    assert list(reloaded.image_ids) == ids and list(reloaded.labels) == [int(cifar.labels[i]) for i in ids]
    # the last block's whole-image embedding is the model's h of the image
    with torch.no_grad():
        np.testing.assert_allclose(whole_image_embeddings(model, cifar, image_ids=ids)["h"], model.embed(x).numpy(),
                                   atol=ATOL)
    # fed at 48 px: a 6 x 6 grid, each token a 32/6 px square of the 32 px image
    larger = extract_token_embeddings(model, cifar, resize_to=48, image_ids=ids, device="cpu", progress=False)
    assert larger.h.shape == (3, 36, 48)
    np.testing.assert_allclose(larger.boxes[0, 7], [32 / 6, 32 / 6, 64 / 6, 64 / 6], rtol=1e-6)
    assert larger.boxes[0, -1, 2:].tolist() == [32.0, 32.0]
    with pytest.raises(ValueError, match=r"not a multiple of its 8 px patches: pass --resize-to .* e\.g\. 32"):
        token_sampler(model, resize_to=36)
    with pytest.raises(ValueError, match="block 2 does not exist: this ViT has 2 blocks"):
        token_sampler(model, block=2)


def test_z_of_a_token_is_the_dino_head_applied_to_it(cifar, dino_full):
    vit, head, path = dino_full
    model = load_model(path, verbose=False)
    ids = [1, 2]
    x = _pixels(cifar, ids)
    stored = extract_token_embeddings(model, cifar, image_ids=ids, dtype="float32", device="cpu", progress=False)
    cls, tokens = _reference(vit, x, IMAGENET)
    assert stored.z.shape == (2, 16, 100)
    np.testing.assert_allclose(stored.z, _reference_dino_head(head, tokens, use_bn=False).numpy(), atol=ATOL)
    whole = whole_image_embeddings(model, cifar, layers=["h", "z"], image_ids=ids)
    np.testing.assert_allclose(whole["z"], _reference_dino_head(head, cls, use_bn=False).numpy(), atol=ATOL)
    assert stored.meta["tokens"]["z"].startswith("the model's projector applied to each token")


# ----------------------------------------------------------------------------- (c) (d) the analyses


def test_convergence_tokens_all_is_the_cosine_of_the_mean_token_to_the_class_token(tmp_path, cifar, dino_full,
                                                                                    cifar10_npz, capsys):
    vit, head, path = dino_full
    result = convergence.main(["--model", str(path), "--data", "cifar10", "--data-root", str(cifar10_npz.parent),
                               "--device", "cpu", "--tokens", "--num-images", "4", "--n-values", "1,16,all",
                               "--draws", "3", "--no-progress", "--out", str(tmp_path)])
    cls, tokens = _reference(vit, _pixels(cifar, range(4)), IMAGENET)
    by_hand = _cos(tokens.mean(1).numpy(), cls.numpy())
    curve = result.curves[0]
    assert (curve.grid_shape, curve.patch_size, curve.tokens["block"]) == ((4, 4), 8, 1)
    points = {point.n: point for point in curve.points}
    assert points["all"].similarity.mean == pytest.approx(by_hand.mean(), abs=1e-5)
    assert points["16"].similarity.mean == pytest.approx(by_hand.mean(), abs=1e-5)  # 16 of 16 tokens: all of them
    written = json.loads((tmp_path / "convergence_tokens_checkpoint_cifar10.json").read_text())
    assert written["tokens"]["whole_image"] == "class token after the final norm, of block 1"
    assert (tmp_path / "convergence_tokens_checkpoint_cifar10.png").stat().st_size > 10_000
    assert "8 px tokens, block 1 (4x4)" in capsys.readouterr().out
    # z: the mean of the tokens' projections against the projection of the class token
    model = load_model(path, verbose=False)
    z = convergence.convergence_curve(model, cifar, n_values=["all"], layer="z", num_images=4, draws=1,
                                      device="cpu", tokens=True)
    z_tokens, z_cls = _reference_dino_head(head, tokens, False), _reference_dino_head(head, cls, False)
    by_hand = _cos(z_tokens.mean(1).numpy(), z_cls.numpy())
    assert z.curves[0].points[0].similarity.mean == pytest.approx(by_hand.mean(), abs=1e-5)


def test_convergence_tokens_runs_the_backbone_once_per_image(cifar, dino_full, monkeypatch):
    """The tokens and the class token they are compared with come from one forward pass: each image goes through
    the backbone once (it went twice, once for the tokens and again for the whole-image embedding), and
    :func:`~.extract.tokens_and_whole_image_embeddings` gives both, equal to the two separate calls."""
    _, _, path = dino_full
    model = load_model(path, verbose=False)
    embed_tokens, fed = type(model.backbone).embed_tokens, []

    def counting(self, x, block):
        fed.append(x.shape[0])
        return embed_tokens(self, x, block)

    monkeypatch.setattr(type(model.backbone), "embed_tokens", counting)
    curve = convergence.convergence_curve(model, cifar, n_values=["all"], layer="z", num_images=5, draws=1,
                                          device="cpu", tokens=True, batch_size=2)
    assert sum(fed) == 5 and curve.curves[0].num_patches == 16
    fed.clear()
    ids = [3, 1, 4]
    tokens, whole = extract.tokens_and_whole_image_embeddings(model, cifar, layers=["h", "z"], image_ids=ids,
                                                              batch_size=2, device="cpu")
    assert sum(fed) == 3 and tokens["h"].shape == (3, 16, 48) and whole["z"].shape == (3, 100)
    with pytest.raises(TypeError, match="unexpected keyword argument 'out'"):  # in memory: a store is extract's
        extract.tokens_and_whole_image_embeddings(model, cifar, image_ids=ids, out="store")
    separate = extract_token_embeddings(model, cifar, image_ids=ids, dtype="float32", device="cpu", progress=False)
    for name in ("h", "z"):
        np.testing.assert_allclose(tokens[name], separate.layer(name), atol=1e-6)
        np.testing.assert_allclose(whole[name], whole_image_embeddings(model, cifar, layers=[name],
                                                                       image_ids=ids)[name], atol=1e-6)


def test_a_non_finite_class_token_stops_the_pass_naming_the_image(cifar, raw_vit, monkeypatch):
    _, path = raw_vit
    model = load_model(path, num_heads=3, verbose=False)
    forward = extract._TokenNetwork.forward

    def nan_class_token_of_the_second_image(self, x):
        outputs = forward(self, x)
        outputs["whole_h"][1] = float("nan")
        return outputs

    monkeypatch.setattr(extract._TokenNetwork, "forward", nan_class_token_of_the_second_image)
    with pytest.raises(ValueError, match="the whole-image h embedding of image 7 holds NaN or infinity"):
        whole_image_embeddings(model, cifar, image_ids=[4, 7, 8], device="cpu")
    with pytest.raises(ValueError, match="the whole-image h embedding of image 7 holds NaN or infinity"):
        extract.tokens_and_whole_image_embeddings(model, cifar, image_ids=[4, 7, 8], device="cpu", progress=False)


def test_heatmap_tokens_maps_are_token_cosines(tmp_path, cifar, dino_full, cifar10_npz):
    vit, head, path = dino_full
    record = heatmap.main(["--model", str(path), "--data", "cifar10", "--data-root", str(cifar10_npz.parent),
                           "--device", "cpu", "--tokens", "--block", "0", "--image-ids", "3", "--queries", "1,2",
                           "--locality-images", "3", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "heatmap_tokens_block0_checkpoint_cifar10.json").read_text())
    assert (tmp_path / "heatmap_tokens_block0_checkpoint_cifar10.png").stat().st_size > 10_000
    query = written["heatmaps"]["queries"][0]
    assert written["heatmaps"]["grid_shape"] == [4, 4] and query["cell"] == [1, 2]
    assert query["box"] == [16.0, 8.0, 24.0, 16.0] and written["heatmaps"]["tokens"]["block"] == 0
    _, tokens = _reference(vit, _pixels(cifar, [3]), IMAGENET, block=0)
    for layer, vectors in (("h", tokens[0]), ("z", _reference_dino_head(head, tokens[0], False))):
        unit = F.normalize(vectors, dim=-1)
        by_hand = (unit @ unit[1 * 4 + 2]).reshape(4, 4).numpy()
        np.testing.assert_allclose(query["maps"][layer], by_hand, atol=2e-4)
    assert written["locality"]["layers"]["h"]["num_images"] == 3
    assert record["heatmaps"]["tokens"] == written["heatmaps"]["tokens"]


def test_evaluate_tokens_protocols_average_the_chosen_tokens(tmp_path, cifar, raw_vit, cifar10_npz):
    _, path = raw_vit
    model = load_model(path, num_heads=3, verbose=False)
    ids = np.array([4, 7, 8])
    stored = extract_token_embeddings(model, cifar, image_ids=ids, dtype="float32", device="cpu", progress=False)
    options = dict(image_ids=ids, seed=3, device="cpu", progress=False, tokens=True)
    features, labels = evaluate.protocol_features(model, cifar, "all", store_dir=tmp_path, **options)
    np.testing.assert_allclose(features, stored.h.mean(1), atol=1e-6)
    features, _ = evaluate.protocol_features(model, cifar, "2", **options)
    chosen = [evaluate.token_subset(16, 2, 3, i) for i in ids]
    np.testing.assert_allclose(features, [stored.h[k, c].mean(0) for k, c in enumerate(chosen)], atol=1e-6)
    assert list(labels) == [int(cifar.labels[i]) for i in ids]
    results = evaluate.main(["--model", str(path), "--num-heads", "3", "--data", "cifar10", "--data-root",
                             str(cifar10_npz.parent), "--device", "cpu", "--tokens", "--protocols", "central,4,all",
                             "--train-split", "test", "--train-size", "40", "--test-size", "20", "--k", "5",
                             "--probe-epochs", "2", "--no-progress", "--out", str(tmp_path)])
    assert [row["title"] for row in results["protocols"]] == ["central", "4 tokens", "all tokens"]
    assert [row["patches_per_image"] for row in results["protocols"]] == [1, 4, 16]
    assert (tmp_path / "evaluate_tokens_dino_vit_cifar10.json").exists()


@pytest.mark.parametrize("block", [None, 0])
def test_evaluate_tokens_runs_each_image_through_the_vit_once_for_every_protocol(tmp_path, cifar, raw_vit,
                                                                                 monkeypatch, block):
    """Without a cache, ``evaluate --tokens`` ran every image through the ViT once per protocol (three times for
    ``central,2,all`` with the central view): now every token protocol comes from one pass, and ``central`` too
    when the tokens are the last block's (its whole-image embedding is the central view). Each protocol's
    features are those of the cached path (a token store; the central view as a crop), so are its scores."""
    _, path = raw_vit
    model = load_model(path, num_heads=3, verbose=False)
    vit = type(model.backbone)
    embed_tokens, forward, fed = vit.embed_tokens, vit.forward, []

    def images(x):  # not the blank image that reads the layers' widths
        return 0 if bool((x.amax((-2, -1)) == x.amin((-2, -1))).all()) else x.shape[0]

    def counting(self, x, block):
        fed.append(images(x))
        return embed_tokens(self, x, block)

    def counting_forward(self, x):  # a crop (the central view) through the network
        fed.append(images(x))
        return forward(self, x)

    evaluate_features, seen = evaluate.evaluate_features, []

    def keeping(train_x, train_y, test_x, test_y, *args):
        seen.append((train_x, train_y, test_x, test_y))
        return evaluate_features(train_x, train_y, test_x, test_y, *args)

    monkeypatch.setattr(vit, "embed_tokens", counting)
    monkeypatch.setattr(vit, "forward", counting_forward)
    monkeypatch.setattr(evaluate, "evaluate_features", keeping)
    train_ids, test_ids = np.arange(30, 54), np.array([5, 2, 9, 11, 0, 7])
    options = dict(train_ids=train_ids, test_ids=test_ids, ks=(5,), schedule=evaluate.ProbeSchedule(epochs=2),
                   seed=3, device="cpu", progress=False, tokens=True, block=block)
    protocols = ["central", "2", "all"]
    one_pass = evaluate.evaluate_protocols(model, cifar, cifar, protocols, **options)
    central_apart = 0 if block is None else len(train_ids) + len(test_ids)  # an earlier block's pass is no view
    assert sum(fed) == len(train_ids) + len(test_ids) + central_apart
    fed.clear()
    passes = seen[:]
    seen.clear()
    cached = evaluate.evaluate_protocols(model, cifar, cifar, protocols, store_dir=tmp_path, **options)
    assert sum(fed) == 2 * (len(train_ids) + len(test_ids))  # the token store, then the central view apart
    for (a_train, a_train_y, a_test, a_test_y), (b_train, b_train_y, b_test, b_test_y) in zip(passes, seen,
                                                                                              strict=True):
        np.testing.assert_allclose(a_train, b_train, atol=1e-5)
        np.testing.assert_allclose(a_test, b_test, atol=1e-5)
        np.testing.assert_array_equal(a_train_y, cifar.labels[train_ids].numpy())
        np.testing.assert_array_equal(b_train_y, a_train_y)
        np.testing.assert_array_equal(a_test_y, b_test_y)
    crop = evaluate.protocol_features(model, cifar, "central", image_ids=test_ids, device="cpu", progress=False)[0]
    np.testing.assert_allclose(passes[0][2], crop, atol=1e-5)  # the central view as a crop through the network
    for a, b in zip(one_pass["protocols"], cached["protocols"], strict=True):
        assert a["knn"] == b["knn"] and a["correct"] == b["correct"]
        assert a["linear"] == pytest.approx(b["linear"], abs=1e-6)
        assert a["patches_per_image"] == b["patches_per_image"] and a["sampler"] == b["sampler"]


def test_retrieval_tokens_indexes_every_token_and_ranks_by_token_cosine(cifar, raw_vit):
    from ssl_patch_analysis.retrieval import RetrievalSettings, patch_retrieval

    _, path = raw_vit
    model = load_model(path, num_heads=3, verbose=False)
    settings = RetrievalSettings(num_images=6, k=4, num_queries=10, tokens=True, query_patch=5)
    result = patch_retrieval(model, cifar, settings, device="cpu")
    assert result.num_indexed_patches == 6 * 16 and result.query.box == (8.0, 8.0, 16.0, 16.0)
    tokens = extract_token_embeddings(model, cifar, image_ids=range(6), dtype="float32", device="cpu", progress=False)
    unit = tokens.h.reshape(-1, 48) / np.linalg.norm(tokens.h.reshape(-1, 48), axis=1, keepdims=True)
    by_hand = np.sort(unit @ unit[5])[::-1][1:5]  # the query itself is left out of its neighbours
    found = [n.similarity for n in result.layers["h"].figure_neighbours]
    np.testing.assert_allclose(found, by_hand, atol=2e-3)  # the store holds float16
    assert result.layers["h"].index_info["sampler"]["kind"] == "tokens"


# ----------------------------------------------------------------------------- (e) (f) refusals and stores


def test_tokens_on_a_resnet_are_refused_in_one_line(tmp_path, cifar10_npz, capsys):
    checkpoint = tmp_path / "resnet.pt"
    save_checkpoint(helpers.tiny_model(), checkpoint)
    common = ["--model", str(checkpoint), "--data", "cifar10", "--data-root", str(cifar10_npz.parent),
              "--device", "cpu", "--tokens"]
    for command, extra in ((convergence.main, ["--out", str(tmp_path)]), (heatmap.main, ["--out", str(tmp_path)]),
                           (extract.main, ["--store", str(tmp_path / "store")])):
        with pytest.raises(SystemExit) as stop:
            command(common + extra)
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert "--tokens needs a Vision Transformer; resnet is a ResNet: its patches go through the network as " \
               "crops" in err
    with pytest.raises(SystemExit) as stop:
        convergence.main(common[:-1] + ["--block", "1", "--out", str(tmp_path)])
    assert stop.value.code == 2 and "--block 1 applies to --tokens only" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png")) and not (tmp_path / "store").exists()


def test_token_store_resumes_is_reused_and_is_never_taken_for_a_crop_store(tmp_path, cifar, raw_vit, cifar10_npz,
                                                                           monkeypatch, capsys):
    _, path = raw_vit
    model = load_model(path, num_heads=3, verbose=False)
    options = dict(image_ids=range(6), batch_size=2, dtype="float32", device="cpu", progress=False)
    whole = extract_token_embeddings(model, cifar, **options)

    forward, calls = extract._TokenNetwork.forward, []

    def dies_on_the_second_batch(self, x):
        calls.append(len(x))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return forward(self, x)

    monkeypatch.setattr(extract._TokenNetwork, "forward", dies_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        extract_token_embeddings(model, cifar, out=tmp_path / "store", **options)
    monkeypatch.setattr(extract._TokenNetwork, "forward", forward)
    resumed = extract_token_embeddings(model, cifar, out=tmp_path / "store", **options)
    assert "1 of 3 batches already written" in capsys.readouterr().err
    np.testing.assert_array_equal(resumed.h, whole.h)
    np.testing.assert_array_equal(resumed.boxes, whole.boxes)

    def must_not_run(self, x):
        raise AssertionError("a complete store with the same settings is reused, not extracted again")

    monkeypatch.setattr(extract._TokenNetwork, "forward", must_not_run)
    again = extract_token_embeddings(model, cifar, out=tmp_path / "store", **options)
    assert again.meta["store_id"] == resumed.meta["store_id"]
    cli_args = ["--model", str(path), "--num-heads", "3", "--data", "cifar10", "--data-root", str(cifar10_npz.parent),
                "--device", "cpu", "--num-images", "6", "--batch-size", "2", "--dtype", "float32",
                "--store", str(tmp_path / "store")]
    extract.main(cli_args + ["--tokens"])  # the command line's store is the library's
    assert "store:" in capsys.readouterr().out
    monkeypatch.setattr(extract._TokenNetwork, "forward", forward)

    for other in (["--grid", "8"], ["--tokens", "--block", "0"], ["--central"]):
        with pytest.raises(SystemExit) as stop:
            extract.main(cli_args + other)
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert "made with other settings" in err and "sampler" in err, err
    with pytest.raises(ValueError, match=r"other settings \(different: sampler\)"):  # the library says the same
        extract_patch_embeddings(model, cifar, grid(8), out=tmp_path / "store", **options)
    crops = extract_patch_embeddings(model, cifar, grid(8), out=tmp_path / "crops", **options)
    with pytest.raises(ValueError, match="made with other settings"):
        extract_token_embeddings(model, cifar, out=tmp_path / "crops", **options)
    # 8 px crops of a 32 px image fed at 32 px are not the tokens (the crop sees no context)
    assert crops.h.shape == whole.h.shape and not np.allclose(crops.h, whole.h, atol=1e-2)
    assert isinstance(token_sampler(model), TokenSampler)


def test_tokens_out_of_memory_halves_the_images_per_pass_and_changes_nothing(cifar, raw_vit, monkeypatch):
    """CUDA running out of memory on a pass of more than 2 images: the chunk is halved (one warning) and the
    tokens and whole-image embeddings are those of the unhindered run; at one image, one line says what to do."""
    _, path = raw_vit
    model = load_model(path, verbose=False)
    ids = np.arange(5)
    expected = extract_token_embeddings(model, cifar, image_ids=ids, dtype="float32", progress=False, chunk_size=8)
    expected_whole = whole_image_embeddings(model, cifar, image_ids=ids, chunk_size=8)
    network_forward = extract._TokenNetwork.forward
    passes = []

    def forward(self, x, limit=2):
        passes.append(x.shape[0])
        if x.shape[0] > limit:
            raise torch.OutOfMemoryError("simulated")
        return network_forward(self, x)

    monkeypatch.setattr(extract._TokenNetwork, "forward", forward)
    with pytest.warns(RuntimeWarning, match="chunks of 4 images") as caught:
        tokens = extract_token_embeddings(model, cifar, image_ids=ids, dtype="float32", progress=False, chunk_size=8)
    assert len(caught) == 1 and passes[:4] == [5, 4, 2, 2]  # 8 > 5 images: the first pass tries all five
    np.testing.assert_array_equal(tokens.layer("h"), expected.layer("h"))
    passes.clear()
    with pytest.warns(RuntimeWarning):
        whole = whole_image_embeddings(model, cifar, image_ids=ids, chunk_size=8)
    np.testing.assert_array_equal(whole["h"], expected_whole["h"])

    monkeypatch.setattr(extract._TokenNetwork, "forward", lambda self, x: forward(self, x, limit=0))
    with pytest.raises(RuntimeError, match="out of memory embedding a single image's tokens: use a smaller"), \
            pytest.warns(RuntimeWarning):
        extract_token_embeddings(model, cifar, image_ids=ids, dtype="float32", progress=False, chunk_size=8)
