"""Weighted k-nearest-neighbour classification on cosine similarity (the online monitor of training).

The vote is the one of DINO's ``eval_knn.py`` and solo-learn's ``WeightedKNNClassifier``: the
``k`` training features most cosine-similar to a test feature each vote for their class with
weight ``exp(similarity / temperature)``; the class with the largest summed weight wins. Test
features are processed in chunks, so memory is ``chunk_size x num_train`` similarities at a time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_features(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                    num_classes: int, k: int, temperature: float, chunk_size: int) -> None:
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError(f"features must be 2-D (N x D), got train {tuple(train_features.shape)} and "
                         f"test {tuple(test_features.shape)}")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train and test features differ in dimension: {train_features.shape[1]} vs "
                         f"{test_features.shape[1]}; embed both with the same model and layer")
    if train_labels.shape != (train_features.shape[0],) or train_labels.is_floating_point():
        raise ValueError(f"train_labels must be {train_features.shape[0]} integers (one per train feature), "
                         f"got {train_labels.dtype} of shape {tuple(train_labels.shape)}")
    if train_features.shape[0] == 0:
        raise ValueError("the k-NN bank is empty: pass at least one train feature")
    if len(train_labels) and not (0 <= int(train_labels.min()) and int(train_labels.max()) < num_classes):
        raise ValueError(f"train_labels must lie in 0..{num_classes - 1} (num_classes={num_classes}), got "
                         f"{int(train_labels.min())}..{int(train_labels.max())}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")


@torch.no_grad()
def weighted_knn_votes(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Summed vote weights per class, ``num_test x num_classes`` (float32): each of the ``k`` nearest neighbours
    votes for its class with weight ``exp(similarity / temperature)`` (DINO's and solo-learn's k-NN).

    Each query's votes are in units of its nearest neighbour's weight (divided by ``exp(s_max / temperature)``),
    which leaves the prediction unchanged and keeps them finite at any temperature (``exp(1 / 0.005)`` overflows
    float32: classes tied at inf, the prediction the lowest-numbered). Features are L2-normalised here (cosine
    similarity); ``k`` is capped at the bank size. Runs on the device of ``train_features``.
    """
    _check_features(train_features, train_labels, test_features, num_classes, k, temperature, chunk_size)
    device = train_features.device
    bank = F.normalize(train_features.float(), dim=1)
    labels = train_labels.to(device)
    k = min(k, bank.shape[0])
    votes = []
    for start in range(0, test_features.shape[0], chunk_size):
        query = F.normalize(test_features[start:start + chunk_size].to(device).float(), dim=1)
        similarity, index = (query @ bank.T).topk(k, dim=1)
        weights = ((similarity - similarity[:, :1]) / temperature).exp()  # topk is sorted: column 0 is the largest
        chunk_votes = torch.zeros(query.shape[0], num_classes, device=device)
        votes.append(chunk_votes.scatter_add_(1, labels[index], weights))
    if not votes:
        return torch.zeros(0, num_classes, device=device)
    return torch.cat(votes)


def weighted_knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Predicted class of every test feature (int64, on the device of ``train_features``)."""
    return weighted_knn_votes(train_features, train_labels, test_features, num_classes, k, temperature,
                              chunk_size).argmax(dim=1)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> float:
    """Top-1 accuracy in percent of :func:`weighted_knn_predict` on ``test_labels``."""
    if test_labels.shape != (test_features.shape[0],):
        raise ValueError(f"test_labels must hold one label per test feature ({test_features.shape[0]}), got "
                         f"shape {tuple(test_labels.shape)}")
    if test_features.shape[0] == 0:
        raise ValueError("no test features: k-NN accuracy needs at least one")
    predictions = weighted_knn_predict(train_features, train_labels, test_features, num_classes, k, temperature,
                                       chunk_size)
    return 100.0 * float((predictions.cpu() == test_labels.cpu()).float().mean())


if __name__ == "__main__":  # a library module: python -m ssl_patch_analysis.knn says so, exit 2
    from ssl_patch_analysis.__main__ import not_a_command

    not_a_command(__spec__.name)
