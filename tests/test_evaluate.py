"""Patch-protocol evaluation: k-NN votes by hand, a probe that separates what is separable, patch means by hand."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from ssl_patch_analysis.checkpoints import save_checkpoint
from ssl_patch_analysis.data import TensorImageDataset
from ssl_patch_analysis.evaluate import (
    PatchScale, ProbeSchedule, evaluate_features, evaluate_protocols, knn_eval, linear_probe, main, patch_boost,
    pretraining_scale, protocol_features, protocol_sampler, subset_ids,
)
from ssl_patch_analysis.models import (
    CIFAR10_MEAN, CIFAR10_STD, ModelInfo, Preprocess, SSLModel, build_backbone, build_mlp,
)
from ssl_patch_analysis.patches import CentralSampler, GridSampler, RandomFixedSampler, RandomResizedSampler

# Three training features and two queries in the plane (see test_knn_eval_matches_hand_computation).
HAND_TRAIN = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]], dtype=np.float32)
HAND_TRAIN_LABELS = np.array([0, 1, 1])
HAND_TEST = np.array([[1.0, 0.9], [0.9, 1.0]], dtype=np.float32)
HAND_TEST_LABELS = np.array([0, 1])


def numpy_weighted_knn(train, train_labels, test, num_classes, k, temperature):
    """The DINO vote written out in numpy: top-k cosine neighbours, each votes exp(similarity / T)."""
    bank = train / np.linalg.norm(train, axis=1, keepdims=True)
    queries = test / np.linalg.norm(test, axis=1, keepdims=True)
    predictions = []
    for similarity in queries @ bank.T:
        nearest = np.argsort(-similarity)[:k]
        votes = np.zeros(num_classes)
        for j in nearest:
            votes[train_labels[j]] += np.exp(similarity[j] / temperature)
        predictions.append(int(np.argmax(votes)))
    return np.array(predictions)


def linear_gap_model(channels: int = 6, seed: int = 0) -> SSLModel:
    """A model linear in the pixels: 1x1 convolution, then global average pooling; raw [0, 1] input."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Conv2d(3, channels, kernel_size=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return SSLModel(backbone, preprocess=Preprocess(input_size=32, mean=None, std=None),
                    info=ModelInfo(method="linear", embedding_dim=channels)).eval()


def random_dataset(n: int = 6, size: int = 32, seed: int = 0, classes: int = 3) -> TensorImageDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
    return TensorImageDataset(images, torch.arange(n) % classes, [f"class{c}" for c in range(classes)],
                              name="random", split="test")


def tiny_model(train: dict | None = None) -> SSLModel:
    """A narrow CIFAR ResNet-18 with batch-norm statistics measured on random images (normal activations)."""
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18", stem="cifar", width=0.125)
    info = ModelInfo(method="test", arch="resnet18", stem="cifar", width=0.125, embedding_dim=dim,
                     extra={"train": train or {}})
    model = SSLModel(backbone, build_mlp([dim, 32, 16]), preprocess=Preprocess(32, CIFAR10_MEAN, CIFAR10_STD),
                     info=info)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None
    with torch.no_grad():
        model.train()(torch.rand(64, 3, 32, 32))
    return model.eval()


def gaussian_blobs(per_class: int, seed: int, dim: int = 5, classes: int = 3, spread: float = 0.3):
    """Well-separated blobs: class c is centred at 10 * e_c."""
    rng = np.random.default_rng(seed)
    centres = 10.0 * np.eye(classes, dim)
    labels = np.repeat(np.arange(classes), per_class)
    return (centres[labels] + spread * rng.standard_normal((len(labels), dim))).astype(np.float32), labels


# ----------------------------------------------------------------------------- k-NN


def test_knn_eval_matches_hand_computation():
    # Query 0 = (1, 0.9) has cosine 1/sqrt(1.81) = 0.7433 to its one class-0 neighbour and 0.9/sqrt(1.81) =
    # 0.6690 to the two class-1 neighbours. k=1 picks class 0. With k=3 the vote is exp(0.7433/T) for class 0
    # against 2 exp(0.6690/T) for class 1: at T=0.07 the ratio is exp(1.061) = 2.89 > 2 (class 0, right);
    # at T=1 it is exp(0.0743) = 1.08 < 2 (class 1, wrong). Query 1 = (0.9, 1) is class 1 every way.
    sharp = knn_eval(HAND_TRAIN, HAND_TRAIN_LABELS, HAND_TEST, HAND_TEST_LABELS, 2, ks=(1, 3, 200), temperature=0.07,
                     device="cpu")
    flat = knn_eval(HAND_TRAIN, HAND_TRAIN_LABELS, HAND_TEST, HAND_TEST_LABELS, 2, ks=(1, 3, 200), temperature=1.0,
                    device="cpu")
    assert sharp == {1: 100.0, 3: 100.0, 200: 100.0}  # k above the bank size uses the whole bank
    assert flat == {1: 100.0, 3: 50.0, 200: 50.0}
    for temperature in (0.07, 1.0):
        for k in (1, 2, 3):
            expected = numpy_weighted_knn(HAND_TRAIN, HAND_TRAIN_LABELS, HAND_TEST, 2, k, temperature)
            accuracy = knn_eval(HAND_TRAIN, HAND_TRAIN_LABELS, HAND_TEST, HAND_TEST_LABELS, 2, ks=(k,),
                                temperature=temperature, device="cpu")[k]
            assert accuracy == pytest.approx(100.0 * np.mean(expected == HAND_TEST_LABELS))


def test_knn_eval_matches_numpy_vote_on_random_features():
    rng = np.random.default_rng(1)
    train, test = rng.standard_normal((80, 7)).astype(np.float32), rng.standard_normal((40, 7)).astype(np.float32)
    train_labels, test_labels = rng.integers(0, 4, 80), rng.integers(0, 4, 40)
    scores = knn_eval(train, train_labels, test, test_labels, 4, ks=(5, 20), temperature=0.1, device="cpu")
    for k in (5, 20):
        expected = numpy_weighted_knn(train, train_labels, test, 4, k, 0.1)
        assert scores[k] == pytest.approx(100.0 * np.mean(expected == test_labels))
    as_tensors = [torch.from_numpy(a) for a in (train, train_labels, test, test_labels)]
    assert knn_eval(*as_tensors, 4, ks=(5, 20), temperature=0.1, device="cpu") == scores


def test_evaluate_features_end_to_end_on_hand_made_features():
    scores = evaluate_features(HAND_TRAIN, HAND_TRAIN_LABELS, HAND_TEST, HAND_TEST_LABELS, 2, ks=(1, 3),
                               temperature=1.0, schedule=ProbeSchedule(epochs=300, lr=0.05, batch_size=3),
                               device="cpu")
    assert scores["knn"] == {1: 100.0, 3: 50.0}
    # Standardised, the train points are (1.41, -1.22), (-0.71, 0), (-0.71, 1.22) and the queries
    # (1.41, -0.12), (1.27, 0): a boundary that separates the train points puts both queries on class 0's side.
    assert scores["linear_train"] == 100.0
    assert scores["linear"] == 50.0


# ----------------------------------------------------------------------------- linear probe


def test_linear_probe_separates_separable_blobs_and_is_deterministic():
    train_x, train_y = gaussian_blobs(40, seed=0)
    test_x, test_y = gaussian_blobs(20, seed=1)
    schedule = ProbeSchedule(epochs=20, lr=0.05, batch_size=16)
    first = linear_probe(train_x, train_y, test_x, test_y, 3, schedule, seed=0, device="cpu")
    again = linear_probe(train_x, train_y, test_x, test_y, 3, schedule, seed=0, device="cpu")
    other = linear_probe(train_x, train_y, test_x, test_y, 3, schedule, seed=1, device="cpu")
    assert first.accuracy == 100.0 and first.train_accuracy == 100.0 and other.accuracy == 100.0
    assert np.array_equal(first.weight, again.weight) and np.array_equal(first.bias, again.bias)
    assert first.final_loss == again.final_loss
    assert not np.array_equal(first.weight, other.weight)  # the seed orders the minibatches
    assert first.final_loss < 0.05  # converged, not merely on the right side


def test_linear_probe_standardises_features():
    # Per-feature affine changes vanish after standardisation with the train mean/std: same probe.
    train_x, train_y = gaussian_blobs(30, seed=2)
    test_x, test_y = gaussian_blobs(10, seed=3)
    scale = np.array([1e3, 1e-2, 7.0, 1.0, 50.0], dtype=np.float32)
    offset = np.array([1e4, -1.0, 30.0, 0.0, -200.0], dtype=np.float32)
    schedule = ProbeSchedule(epochs=10, lr=0.05, batch_size=32)
    plain = linear_probe(train_x, train_y, test_x, test_y, 3, schedule, device="cpu")
    moved = linear_probe(train_x * scale + offset, train_y, test_x * scale + offset, test_y, 3, schedule, device="cpu")
    assert moved.accuracy == plain.accuracy == 100.0
    np.testing.assert_allclose(moved.weight, plain.weight, atol=1e-3)
    np.testing.assert_allclose(moved.mean, train_x.mean(0) * scale + offset, rtol=1e-4)


def test_linear_probe_rejects_bad_input():
    x, y = gaussian_blobs(5, seed=0)
    with pytest.raises(ValueError, match="lie in 0..2"):
        linear_probe(x, y + 1, x, y, 3, device="cpu")
    with pytest.raises(ValueError, match="NaN or infinite"):
        linear_probe(np.full_like(x, np.nan), y, x, y, 3, device="cpu")
    with pytest.raises(ValueError, match="one dimension"):
        linear_probe(x, y, x[:, :2], y, 3, device="cpu")
    with pytest.raises(ValueError, match="epochs >= 1"):
        ProbeSchedule(epochs=0)


# ----------------------------------------------------------------------------- protocols


def test_protocol_samplers_follow_the_pretraining_scale():
    fixed = tiny_model({"patch_size": 16, "min_scale": None, "max_scale": None})
    multi = tiny_model({"patch_size": None, "min_scale": 0.2, "max_scale": 0.9})
    assert pretraining_scale(fixed) == PatchScale(patch_size=16)
    assert pretraining_scale(multi) == PatchScale(scale=(0.2, 0.9))
    with pytest.raises(ValueError, match="--patch-size"):
        pretraining_scale(tiny_model({}))

    assert isinstance(protocol_sampler("central"), CentralSampler)
    one = protocol_sampler("1", pretraining_scale(fixed), seed=4)
    assert isinstance(one, RandomFixedSampler) and (one.n, one.patch_size, one.seed) == (1, 16, 4)
    many = protocol_sampler("16", pretraining_scale(multi), seed=2)
    assert isinstance(many, RandomResizedSampler) and (many.n, many.scale, many.seed) == (16, (0.2, 0.9), 2)
    tiles = protocol_sampler("grid:8")
    assert isinstance(tiles, GridSampler) and tiles.num_patches((32, 32)) == 16
    for bad in ("patches", "0", "grid:", "grid:-2", "1.5"):
        with pytest.raises(ValueError, match="protocol"):
            protocol_sampler(bad, PatchScale(patch_size=8))
    with pytest.raises(ValueError, match="exactly one"):
        PatchScale(patch_size=8, scale=(0.1, 1.0))


def test_all_grid_patches_of_a_linear_model_give_the_central_feature():
    # 1x1 conv + global average pooling is linear in the pixels, so the mean embedding of tiles that
    # cover the image exactly once, each at its native size, is the embedding of the whole image.
    model, data = linear_gap_model(), random_dataset()
    whole, labels = protocol_features(model, data, "central", device="cpu", progress=False)
    for tile in (4, 8, 16):
        tiles, tile_labels = protocol_features(model, data, f"grid:{tile}", resize_to=tile, device="cpu",
                                               progress=False)
        np.testing.assert_allclose(tiles, whole, rtol=0, atol=2e-5)
        assert np.array_equal(tile_labels, labels)
    assert np.array_equal(labels, data.labels.numpy())
    # Tiles that skip pixels (8 px tiles every 16 px, i.e. 4 of 16 tiles) are a different feature: the test can fail.
    sparse, _ = protocol_features(model, data, "4", patch_scale=PatchScale(patch_size=8), resize_to=8, device="cpu",
                                  progress=False)
    assert np.abs(sparse - whole).max() > 1e-3


def test_n_patch_feature_is_the_mean_over_the_drawn_patches():
    # For the linear model at native size, a patch embeds to W * (mean pixel of the box) + b: the
    # n-patch feature is that of the average of the boxes' mean pixels, computed here from the boxes.
    model, data = linear_gap_model(), random_dataset(n=5)
    ids = np.array([4, 0, 2])
    features, labels = protocol_features(model, data, "6", patch_scale=PatchScale(patch_size=8), image_ids=ids,
                                         seed=3, resize_to=8, device="cpu", progress=False)
    boxes = protocol_sampler("6", PatchScale(patch_size=8), seed=3).boxes(ids.tolist(), (32, 32)).long()
    conv = model.backbone[0]
    for row, image_id in enumerate(ids):
        pixels = data.images[image_id].double() / 255
        box_means = torch.stack([pixels[:, y0:y1, x0:x1].mean(dim=(1, 2)) for x0, y0, x1, y1 in boxes[row].tolist()])
        expected = conv.weight[:, :, 0, 0].double() @ box_means.mean(0) + conv.bias.double()
        np.testing.assert_allclose(features[row], expected.detach().numpy(), atol=2e-5)
    assert np.array_equal(labels, data.labels.numpy()[ids])
    reseeded, _ = protocol_features(model, data, "6", patch_scale=PatchScale(patch_size=8), image_ids=ids, seed=4,
                                    resize_to=8, device="cpu", progress=False)
    assert not np.allclose(reseeded, features)


def test_store_dir_caches_features(tmp_path):
    model, data = tiny_model({"patch_size": 16}), random_dataset(n=4)
    options = dict(device="cpu", progress=False, store_dir=tmp_path, seed=1)
    first, _ = protocol_features(model, data, "3", **options)
    assert len(list(tmp_path.iterdir())) == 1
    again, _ = protocol_features(model, data, "3", **options)
    assert len(list(tmp_path.iterdir())) == 1 and np.array_equal(first, again)
    in_memory, _ = protocol_features(model, data, "3", device="cpu", progress=False, seed=1)
    np.testing.assert_array_equal(first, in_memory)
    protocol_features(model, data, "3", **{**options, "seed": 2})  # other patches: a store of their own
    assert len(list(tmp_path.iterdir())) == 2


def test_subset_ids_are_stratified_seeded_and_disjoint():
    labels = np.repeat(np.arange(10), 100)
    chosen = subset_ids(labels, 50, seed=0)
    assert len(chosen) == 50 and np.array_equal(chosen, np.sort(chosen))
    assert np.array_equal(np.bincount(labels[chosen], minlength=10), np.full(10, 5))
    assert np.array_equal(chosen, subset_ids(labels, 50, seed=0))
    assert not np.array_equal(chosen, subset_ids(labels, 50, seed=1))
    rest = subset_ids(labels, 900, seed=1, exclude=chosen)
    assert len(rest) == 900 and not set(rest) & set(chosen)
    uneven = np.array([0] * 90 + [1] * 10)
    for seed in range(5):  # quotas 20 and 2, and the 1 left over goes to either class
        assert np.bincount(uneven[subset_ids(uneven, 23, seed=seed)]).tolist() in ([21, 2], [20, 3])
    assert np.array_equal(subset_ids(labels, None), np.arange(1000))
    with pytest.raises(ValueError, match="between 1 and 1000"):
        subset_ids(labels, 1001)


def test_evaluate_protocols_and_boost_on_tiny_model():
    model = tiny_model({"patch_size": 16})
    train, test = random_dataset(n=12, seed=0), random_dataset(n=6, seed=1)
    results = evaluate_protocols(model, train, test, ["central", "1", "3"], ks=(2, 20), device="cpu",
                                 schedule=ProbeSchedule(epochs=2), progress=False)
    assert [row["patches_per_image"] for row in results["protocols"]] == [1, 1, 3]
    assert results["train_size"] == 12 and results["test_size"] == 6
    assert results["patch_scale"] == {"patch_size": 16, "scale": None}
    for row in results["protocols"]:
        assert set(row["knn"]) == {2, 20} and row["feature_dim"] == model.embedding_dim
        for accuracy in [*row["knn"].values(), row["linear"]]:
            assert accuracy * 6 / 100 == pytest.approx(round(accuracy * 6 / 100))  # k of the 6 test images
    boost = patch_boost(results)
    assert boost["patch_protocol"] == "3"
    central, patches = results["protocols"][0], results["protocols"][2]
    assert [r["delta"] for r in boost["rows"]] == pytest.approx(
        [patches["knn"][2] - central["knn"][2], patches["knn"][20] - central["knn"][20],
         patches["linear"] - central["linear"]])
    with pytest.raises(ValueError, match="central and N"):
        patch_boost({**results, "protocols": results["protocols"][:2]})
    with pytest.raises(ValueError, match="unknown protocol"):
        evaluate_protocols(model, train, test, ["central", "many"], device="cpu")


# ----------------------------------------------------------------------------- command line


def test_cli_writes_figures_and_json(tmp_path, cifar10_npz, data_root, capsys):
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(tiny_model(), checkpoint, train={"patch_size": 16, "min_scale": None, "max_scale": None})
    out = tmp_path / "figures"
    argv = ["--model", str(checkpoint), "--data", "cifar10", "--data-root", str(data_root), "--split", "test",
            "--train-split", "test", "--train-size", "40", "--test-size", "20", "--protocols", "central,1,4",
            "--k", "5,20", "--epochs", "3", "--boost", "--out", str(out), "--device", "cpu", "--no-progress",
            "--store-dir", str(tmp_path / "store"), "--pdf"]
    results = main(argv)
    printed = capsys.readouterr().out
    assert "| protocol" in printed and "kNN k=5" in printed and "Adam, 3 epochs" in printed
    for stem in ("evaluate_tiny_cifar10", "evaluate_boost_tiny_cifar10"):
        for suffix in (".png", ".pdf", ".json"):
            assert (out / (stem + suffix)).stat().st_size > 0
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "evaluate_tiny_cifar10.json").read_text())
    assert saved["train_size"] == 40 and saved["test_size"] == 20 and saved["test_data"] == "CIFAR-10 (JPEG copy) test"
    assert [row["protocol"] for row in saved["protocols"]] == ["central", "1", "4"]
    assert saved["probe_schedule"]["epochs"] == 3
    assert saved["boost"]["rows"][-1]["delta"] == pytest.approx(
        saved["protocols"][2]["linear"] - saved["protocols"][0]["linear"])
    # The cached patch embeddings and the seeded probe give the same numbers again.
    rerun = main(argv)
    assert [(row["knn"], row["linear"]) for row in rerun["protocols"]] == [
        (row["knn"], row["linear"]) for row in results["protocols"]]
    with pytest.raises(SystemExit, match="unknown protocol"):
        main([*argv, "--protocols", "central,lots"])
