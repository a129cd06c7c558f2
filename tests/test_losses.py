"""The SSL losses against lightly's independent implementations and against known answers.

Conventions where lightly differs (each adapted below, and stated in the losses' docstrings):
- VICReg: lightly names the coefficients lambda/mu/nu (= sim/std/cov); same eps = 1e-4.
- EMP-SSL: lightly takes a list of n views of shape B x D (we take B x n x D), does not normalise,
  and its EMPSSLLoss *adds* the TCR; we follow EMP-SSL's main.py, which subtracts it. We compare
  against lightly's tcr_loss and invariance_loss pieces on normalised inputs.
- NT-Xent: same temperature meaning, lightly without memory bank.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp
from lightly.loss import NTXentLoss as LightlyNTXent
from lightly.loss import VICRegLoss as LightlyVICReg
from lightly.loss import emp_ssl_loss as lightly_emp
from lightly.loss import vicreg_loss as lightly_vicreg

from ssl_patch_analysis.losses import (
    BagSSLLoss,
    EMPSSLLoss,
    LossOutput,
    NTXentLoss,
    VICRegLoss,
    covariance_penalty,
    gather_with_grad,
    total_coding_rate,
    variance_hinge,
)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _value_and_grads(fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    value = fn(*leaves)
    value.backward()
    return value.detach(), [x.grad for x in leaves]


def _assert_same_value_and_grads(ours, reference, *inputs: torch.Tensor) -> None:
    value, grads = _value_and_grads(ours, *inputs)
    ref_value, ref_grads = _value_and_grads(reference, *inputs)
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-12)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("coeffs", [(25.0, 25.0, 1.0), (1.0, 3.0, 0.5)])
def test_vicreg_matches_lightly(coeffs):
    sim, std, cov = coeffs
    z_a, z_b = _randn(32, 16, seed=0), 0.5 * _randn(32, 16, seed=1)
    ours = VICRegLoss(sim, std, cov)
    theirs = LightlyVICReg(lambda_param=sim, mu_param=std, nu_param=cov, eps=1e-4)
    _assert_same_value_and_grads(lambda a, b: ours(a, b).total, theirs, z_a, z_b)

    terms = ours(z_a, z_b).terms
    torch.testing.assert_close(terms["invariance"], lightly_vicreg.invariance_loss(z_a, z_b))
    torch.testing.assert_close(
        terms["variance"], 0.5 * (lightly_vicreg.variance_loss(z_a) + lightly_vicreg.variance_loss(z_b))
    )
    torch.testing.assert_close(
        terms["covariance"], lightly_vicreg.covariance_loss(z_a) + lightly_vicreg.covariance_loss(z_b)
    )
    assert all(not t.requires_grad for t in terms.values())


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_ntxent_matches_lightly(temperature):
    z_a, z_b = _randn(24, 8, seed=2), _randn(24, 8, seed=3)
    ours = NTXentLoss(temperature=temperature)
    theirs = LightlyNTXent(temperature=temperature)
    _assert_same_value_and_grads(lambda a, b: ours(a, b).total, theirs, z_a, z_b)
    assert set(ours(z_a, z_b).terms) == {"ntxent"}


def test_ntxent_known_answer_for_orthogonal_pairs():
    # Two images, both views identical, the images orthogonal: each anchor sees its positive at
    # similarity 1 and two negatives at similarity 0, so the loss is log(1 + 2 exp(-1/T)).
    z = torch.eye(2, dtype=torch.float64)
    t = 0.5
    expected = torch.log1p(2 * torch.exp(torch.tensor(-1 / t, dtype=torch.float64)))
    torch.testing.assert_close(NTXentLoss(temperature=t)(z, z.clone()).total, expected)


@pytest.mark.parametrize("batch, dim", [(16, 32), (48, 8)])  # both branches of Sylvester's identity
def test_empssl_matches_lightly_pieces(batch, dim):
    n, coeff, eps = 5, 200.0, 0.2
    z = _randn(batch, n, dim, seed=4)
    views = torch.nn.functional.normalize(z, dim=-1).transpose(0, 1)  # lightly: n x B x D
    out = EMPSSLLoss(invariance_coeff=coeff, tcr_eps=eps)(z)
    torch.testing.assert_close(out.terms["tcr"], lightly_emp.tcr_loss(views, eps=eps))
    torch.testing.assert_close(out.terms["invariance"], -lightly_emp.invariance_loss(views))

    def reference(x):
        v = torch.nn.functional.normalize(x, dim=-1).transpose(0, 1)
        return -lightly_emp.tcr_loss(v, eps=eps) + coeff * lightly_emp.invariance_loss(v)

    _assert_same_value_and_grads(lambda x: EMPSSLLoss(coeff, eps)(x).total, reference, z)
    # lightly's own module adds the TCR (minimising the coding rate); ours subtracts it as EMP-SSL.
    lightly_total = lightly_emp.EMPSSLLoss(tcr_eps=eps, inv_coef=coeff)(list(views))
    torch.testing.assert_close(lightly_total, out.terms["tcr"] - coeff * out.terms["invariance"])


def test_total_coding_rate_of_orthonormal_batch():
    # m = D orthonormal rows: Z^T Z = I, so R = D/2 * log(1 + 1/eps).
    dim, eps = 6, 0.2
    q, _ = torch.linalg.qr(_randn(dim, dim, seed=5))
    rate = total_coding_rate(q.unsqueeze(1), eps)
    expected = dim / 2 * math.log(1 + 1 / eps)
    torch.testing.assert_close(rate, torch.tensor([expected], dtype=torch.float64))


def test_variance_term_zero_when_std_at_least_one_and_positive_when_collapsed():
    z = _randn(64, 10, seed=6)
    z = (z - z.mean(0)) / z.std(0) * torch.linspace(1.0, 3.0, 10, dtype=torch.float64)
    assert variance_hinge(z).item() == 0.0
    out = VICRegLoss()(z, z.flip(0))
    assert out.terms["variance"].item() == 0.0

    collapsed = torch.ones(64, 10, dtype=torch.float64)
    # std = sqrt(0 + eps) in every dimension
    assert variance_hinge(collapsed, eps=1e-4).item() == pytest.approx(1 - 1e-2)
    assert VICRegLoss()(collapsed, collapsed).terms["variance"].item() == pytest.approx(1 - 1e-2)


def test_covariance_term_zero_for_decorrelated_and_known_for_duplicated_dimensions():
    # Columns 1..4 of a Sylvester-Hadamard matrix: zero mean, mutually orthogonal.
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    hadamard = torch.kron(torch.kron(h2, h2), h2)
    decorrelated = 3.0 * hadamard[:, 1:5]
    assert covariance_penalty(decorrelated).item() == pytest.approx(0.0, abs=1e-24)
    assert VICRegLoss()(decorrelated, decorrelated).terms["covariance"].item() == pytest.approx(0.0, abs=1e-24)

    # Two copies of one column of variance v: C = [[v, v], [v, v]], off-diagonal sum 2 v^2, / D = v^2.
    x = _randn(40, 1, seed=7)
    v = x.var().item()
    assert covariance_penalty(torch.cat([x, x], dim=1)).item() == pytest.approx(v**2)


def test_bagssl_with_two_patches_is_vicreg_up_to_documented_factors():
    z_a, z_b = _randn(20, 12, seed=8), _randn(20, 12, seed=9)
    vic = VICRegLoss(sim_coeff=3.0, std_coeff=5.0, cov_coeff=0.7)(z_a, z_b)
    bag = BagSSLLoss(sim_coeff=4 * 3.0, std_coeff=5.0, cov_coeff=2 * 0.7)(torch.stack([z_a, z_b], dim=1))
    torch.testing.assert_close(bag.total, vic.total)
    torch.testing.assert_close(bag.terms["invariance"], vic.terms["invariance"] / 4)
    torch.testing.assert_close(bag.terms["variance"], vic.terms["variance"])
    torch.testing.assert_close(bag.terms["covariance"], vic.terms["covariance"] / 2)


def test_bagssl_terms_against_a_loop_over_patches():
    batch, n, dim = 10, 4, 6
    z = _randn(batch, n, dim, seed=10)
    out = BagSSLLoss()(z)
    squared = 0.0
    for b in range(batch):
        mean = sum(z[b, i] for i in range(n)) / n
        squared += sum(((z[b, i] - mean) ** 2).sum() for i in range(n))
    torch.testing.assert_close(out.terms["invariance"], squared / (batch * n * dim))
    torch.testing.assert_close(
        out.terms["variance"], sum(lightly_vicreg.variance_loss(z[:, i]) for i in range(n)) / n
    )
    torch.testing.assert_close(
        out.terms["covariance"], sum(lightly_vicreg.covariance_loss(z[:, i]) for i in range(n)) / n
    )


def _noisy_views(n_views: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    clean = _randn(64, 8, seed=seed).float()
    noise = torch.Generator().manual_seed(seed + 1)
    return clean, [clean + 0.3 * torch.randn(clean.shape, generator=noise) for _ in range(n_views)]


@pytest.mark.parametrize(
    "loss, n_views, lr",
    [
        (VICRegLoss(), 2, 0.01),
        (NTXentLoss(), 2, 0.5),
        (BagSSLLoss(), 4, 0.01),
        (EMPSSLLoss(invariance_coeff=20.0), 4, 0.1),
    ],
    ids=["vicreg", "ntxent", "bagssl", "empssl"],
)
def test_loss_decreases_under_sgd_on_two_noisy_views(loss, n_views, lr):
    torch.manual_seed(0)
    _, views = _noisy_views(n_views, seed=11)
    encoder = torch.nn.Linear(8, 16)
    optimizer = torch.optim.SGD(encoder.parameters(), lr=lr)

    def evaluate() -> LossOutput:
        z = [encoder(v) for v in views]
        return loss(*z) if n_views == 2 else loss(torch.stack(z, dim=1))

    first = evaluate().total.item()
    for _ in range(30):
        optimizer.zero_grad()
        evaluate().total.backward()
        optimizer.step()
    last = evaluate().total.item()
    assert last < first - 0.03 * abs(first), (first, last)


def test_shape_errors_are_clear():
    a = torch.randn(8, 4)
    with pytest.raises(ValueError, match="same shape"):
        VICRegLoss()(a, torch.randn(8, 5))
    with pytest.raises(ValueError, match="B x D"):
        VICRegLoss()(torch.randn(8, 2, 4), torch.randn(8, 2, 4))
    with pytest.raises(ValueError, match="at least 2 images"):
        VICRegLoss()(a[:1], a[:1])
    with pytest.raises(ValueError, match="same shape"):
        NTXentLoss()(a, a[:4])
    with pytest.raises(ValueError, match="B x n x D"):
        BagSSLLoss()(a)
    with pytest.raises(ValueError, match="n >= 2"):
        EMPSSLLoss()(torch.randn(8, 1, 4))
    with pytest.raises(ValueError, match="at least 2 images"):
        BagSSLLoss()(torch.randn(1, 3, 4))
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(temperature=0.0)
    with pytest.raises(ValueError, match="floating-point"):
        VICRegLoss()(torch.ones(4, 3, dtype=torch.long), torch.ones(4, 3, dtype=torch.long))


def test_gathering_on_a_single_process_is_the_identity():
    x = torch.randn(5, 3)
    assert gather_with_grad(x) is x
    z_a, z_b, z = _randn(12, 6, seed=12), _randn(12, 6, seed=13), _randn(12, 3, 6, seed=14)
    for gathered, local, inputs in [
        (VICRegLoss(), VICRegLoss(gather_distributed=False), (z_a, z_b)),
        (NTXentLoss(), NTXentLoss(gather_distributed=False), (z_a, z_b)),
        (BagSSLLoss(), BagSSLLoss(gather_distributed=False), (z,)),
        (EMPSSLLoss(), EMPSSLLoss(gather_distributed=False), (z,)),
    ]:
        assert gathered(*inputs).total.item() == local(*inputs).total.item()


def test_half_precision_inputs_are_computed_in_float32():
    z = _randn(16, 3, 8, seed=15)
    out = EMPSSLLoss()(z.half())
    assert out.total.dtype == torch.float32
    torch.testing.assert_close(out.total, EMPSSLLoss()(z.half().float()).total)


WORLD = 2
LOSSES = {
    "vicreg": (lambda: VICRegLoss(), 2),
    "ntxent": (lambda: NTXentLoss(), 2),
    "bagssl": (lambda: BagSSLLoss(), 3),
    "empssl": (lambda: EMPSSLLoss(), 3),
}


def _global_inputs(name: str) -> list[torch.Tensor]:
    _, n = LOSSES[name]
    if n == 2:
        return [_randn(8, 5, seed=20), _randn(8, 5, seed=21)]
    return [_randn(8, n, 5, seed=22)]


def _distributed_worker(rank: int, init_file: str, results: dict) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for name, (make, _) in LOSSES.items():
            local = [x.chunk(WORLD)[rank].clone().requires_grad_(True) for x in _global_inputs(name)]
            total = make()(*local).total
            total.backward()
            results[(name, rank)] = (total.item(), [x.grad.clone() for x in local])
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two gloo processes
def test_gather_with_grad_gives_the_global_batch_loss_on_two_gloo_processes(tmp_path):
    """Each rank holds half the batch; the mean of the ranks' losses is the single-process loss of
    the whole batch, and each rank's input gradient is WORLD times the global one (DDP then
    averages parameter gradients over the ranks)."""
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_distributed_worker, args=(str(tmp_path / "rendezvous"), results), nprocs=WORLD, join=True)
    for name, (make, _) in LOSSES.items():
        value, grads = _value_and_grads(lambda *x, make=make: make()(*x).total, *_global_inputs(name))
        rank_values = [results[(name, r)][0] for r in range(WORLD)]
        assert sum(rank_values) / WORLD == pytest.approx(value.item(), rel=1e-10), name
        for r in range(WORLD):
            for rank_grad, grad in zip(results[(name, r)][1], grads, strict=True):
                torch.testing.assert_close(rank_grad / WORLD, grad.chunk(WORLD)[r], msg=name)
