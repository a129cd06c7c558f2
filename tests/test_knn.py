"""Weighted k-NN: hand-computed votes, k=1 against numpy nearest neighbours, chunking invariance."""
import math

import numpy as np
import pytest
import torch

from ssl_patch_analysis.knn import knn_accuracy, weighted_knn_predict, weighted_knn_votes


def test_votes_match_a_hand_computation():
    # Bank of 2-D unit vectors at known angles; the query is along x (after normalisation).
    angles = torch.tensor([0.0, 60.0, 90.0, 180.0]) * math.pi / 180
    bank = torch.stack([angles.cos(), angles.sin()], dim=1) * torch.tensor([[2.0], [1.0], [3.0], [0.5]])
    labels = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[5.0, 0.0]])
    # Cosine similarities: 1, 0.5, 0, -1. Top-3 neighbours: items 0 (class 0), 1 and 2 (class 1).
    temperature = 0.5
    expected_class0 = math.exp(1.0 / temperature)
    expected_class1 = math.exp(0.5 / temperature) + math.exp(0.0 / temperature)
    votes = weighted_knn_votes(bank, labels, query, num_classes=3, k=3, temperature=temperature)
    assert votes.shape == (1, 3)
    # each query's votes in units of its nearest neighbour's weight, exp(1 / T) here (finite at any temperature)
    nearest = math.exp(1.0 / temperature)
    assert votes[0].tolist() == pytest.approx([expected_class0 / nearest, expected_class1 / nearest, 0.0], rel=1e-5)
    # exp(2) = 7.39 beats exp(1) + 1 = 3.72: class 0 wins although class 1 has more neighbours.
    assert weighted_knn_predict(bank, labels, query, num_classes=3, k=3, temperature=temperature).tolist() == [0]
    # With a high temperature every neighbour weighs about the same and the majority (class 1) wins.
    assert weighted_knn_predict(bank, labels, query, num_classes=3, k=3, temperature=100.0).tolist() == [1]


def test_k1_is_cosine_nearest_neighbour():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(300, 16)).astype(np.float32) * rng.uniform(0.1, 5, size=(300, 1)).astype(np.float32)
    labels = rng.integers(0, 7, size=300)
    queries = rng.normal(size=(90, 16)).astype(np.float32)
    unit_bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    unit_queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    expected = labels[np.argmax(unit_queries @ unit_bank.T, axis=1)]
    predicted = weighted_knn_predict(torch.from_numpy(bank), torch.from_numpy(labels), torch.from_numpy(queries),
                                     num_classes=7, k=1)
    np.testing.assert_array_equal(predicted.numpy(), expected)
    accuracy = knn_accuracy(torch.from_numpy(bank), torch.from_numpy(labels), torch.from_numpy(queries),
                            torch.from_numpy(expected), num_classes=7, k=1)
    assert accuracy == 100.0


def test_chunking_does_not_change_results():
    generator = torch.Generator().manual_seed(1)
    bank = torch.randn(500, 32, generator=generator)
    labels = torch.randint(0, 10, (500,), generator=generator)
    queries = torch.randn(257, 32, generator=generator)
    whole = weighted_knn_votes(bank, labels, queries, num_classes=10, chunk_size=10_000)
    for chunk_size in (1, 7, 256):
        chunked = weighted_knn_votes(bank, labels, queries, num_classes=10, chunk_size=chunk_size)
        # Only float rounding of the matrix product may differ (BLAS blocks by shape).
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
        assert torch.equal(chunked.argmax(dim=1), whole.argmax(dim=1))


def test_accuracy_counts_correct_predictions():
    bank = torch.eye(3)
    labels = torch.tensor([0, 1, 2])
    queries = torch.eye(3) + 0.1
    assert knn_accuracy(bank, labels, queries, torch.tensor([0, 1, 0]), num_classes=3, k=1) == pytest.approx(
        200 / 3)


def test_k_larger_than_bank_uses_the_whole_bank():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    votes = weighted_knn_votes(bank, torch.tensor([0, 1]), torch.tensor([[1.0, 0.0]]), num_classes=2, k=20,
                               temperature=1.0)
    assert votes[0].tolist() == pytest.approx([math.e / math.e, 1.0 / math.e])


def test_a_small_temperature_votes_as_a_float64_computation_would():
    """exp(similarity / T) overflowed float32 below T ~ 0.011: several classes summed to inf and argmax took the
    lowest-numbered one (a real model's k-NN fell from 39 to 17 % at T = 0.005). The votes are finite and the
    predictions those of the formula computed in float64."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(5, 32))
    labels = rng.integers(0, 5, size=600)
    bank = centres[labels] + 0.3 * rng.normal(size=(600, 32))
    query_labels = rng.integers(0, 5, size=200)
    queries = centres[query_labels] + 0.3 * rng.normal(size=(200, 32))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    similarity = unit(queries) @ unit(bank).T
    for temperature in (0.07, 0.005, 0.001):
        top = np.argsort(-similarity, axis=1)[:, :20]
        expected = []
        for row, neighbours in zip(similarity, top, strict=True):
            logs = row[neighbours] / temperature
            weights = np.exp(logs - logs.max())  # float64, shifted: the reference cannot overflow either
            expected.append(np.bincount(labels[neighbours], weights, minlength=5).argmax())
        votes = weighted_knn_votes(torch.from_numpy(bank).float(), torch.from_numpy(labels),
                                   torch.from_numpy(queries).float(), num_classes=5, k=20, temperature=temperature)
        assert torch.isfinite(votes).all(), temperature
        agree = (votes.argmax(dim=1).numpy() == np.array(expected)).mean()
        assert agree >= 0.99, (temperature, agree)  # float32 similarities may swap a near tie


@pytest.mark.parametrize("kwargs, message", [
    ({"train_labels": torch.tensor([0, 5])}, "lie in 0..2"),
    ({"test_features": torch.zeros(1, 3)}, "differ in dimension"),
    ({"k": 0}, "k must be at least 1"),
    ({"temperature": 0.0}, "temperature must be positive"),
])
def test_bad_input_is_rejected(kwargs, message):
    args = {"train_features": torch.eye(2), "train_labels": torch.tensor([0, 1]),
            "test_features": torch.eye(2), "num_classes": 3}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        weighted_knn_predict(**args)
