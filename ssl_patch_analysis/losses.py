"""The joint-embedding SSL losses of the paper's methods, as small typed modules.

Each module returns a :class:`LossOutput`: the differentiable ``total`` and the raw (unweighted,
detached) value of every named term, for logging. Term names follow the papers:

- :class:`VICRegLoss` (Bardes et al. 2022): invariance, variance, covariance over two views;
- :class:`BagSSLLoss` (Chen et al. 2022): VICReg's terms over ``n`` fixed-scale patches per image,
  each patch projection pulled towards its image's mean projection;
- :class:`EMPSSLLoss` (Tong et al. 2023): cosine similarity of each patch to its image mean plus the
  total coding rate (TCR) of every patch index;
- :class:`NTXentLoss` (Chen et al. 2020): SimCLR's normalised-temperature cross entropy.

Notation: ``B`` images per process, ``n`` patches (views) per image, ``D`` projection dimensions.
With ``gather_distributed=True`` (the default) the terms that compare an image with *other* images
(variance, covariance, TCR, NT-Xent's negatives) see the global batch of all DDP ranks through
:func:`gather_with_grad`; the per-image terms stay local, as in facebookresearch/vicreg. With the
usual DDP gradient averaging this gives the gradient of the loss of the global batch. On a single
process the gathering is the identity.

All losses are computed in float32 (or float64 if given) with autocast turned off: the log
determinant of the TCR and the squared covariances are not safe in float16.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class LossOutput:
    """A loss value and its named terms.

    ``total`` is the differentiable scalar to minimise; ``terms`` holds every named term as a
    detached scalar, *raw* (before its coefficient is applied), for logging.
    """

    total: Tensor
    terms: dict[str, Tensor]


class _GatherWithGrad(torch.autograd.Function):
    """``all_gather`` whose backward sums every rank's gradient of its own slice.

    Each rank computes the loss of the global batch, so the gradient of a rank's inputs is the sum
    of the gradients the other ranks' losses send them (facebookresearch/vicreg's FullGatherLayer).
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, ...]:
        gathered = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, x.contiguous())
        return tuple(gathered)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> Tensor:
        all_grads = torch.stack(grads)
        dist.all_reduce(all_grads)
        return all_grads[dist.get_rank()]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` of every DDP rank along dim 0, keeping gradients (ranks in rank order).

    Every rank must pass a tensor of the same shape. Returns ``x`` itself when torch.distributed
    is not initialised or has a single process.
    """
    if not _distributed():
        return x
    return torch.cat(_GatherWithGrad.apply(x), dim=0)


def _rank_offset(local_batch: int, gather: bool) -> int:
    """Index of this rank's first sample in the gathered batch."""
    return dist.get_rank() * local_batch if gather and _distributed() else 0


@contextmanager
def _full_precision(device: torch.device) -> Iterator[None]:
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def _at_least_float32(z: Tensor) -> Tensor:
    if not z.is_floating_point():
        raise ValueError(f"projections must be a floating-point tensor, got dtype {z.dtype}")
    return z if z.dtype in (torch.float32, torch.float64) else z.float()


def _check_pair(z_a: Tensor, z_b: Tensor, min_batch: int) -> None:
    if z_a.ndim != 2 or z_b.ndim != 2:
        raise ValueError(
            f"z_a and z_b must be B x D projections of the two views, got shapes {tuple(z_a.shape)} "
            f"and {tuple(z_b.shape)}; for n patches per image use a B x n x D loss (BagSSLLoss, "
            "EMPSSLLoss)"
        )
    if z_a.shape != z_b.shape:
        raise ValueError(
            f"z_a and z_b must have the same shape (row i of both = two views of image i), got "
            f"{tuple(z_a.shape)} and {tuple(z_b.shape)}"
        )
    if z_a.shape[0] < min_batch:
        raise ValueError(f"the batch needs at least {min_batch} images, got {z_a.shape[0]}")


def _check_patches(z: Tensor) -> None:
    if z.ndim != 3:
        raise ValueError(
            f"z must be B x n x D (n patch projections per image), got shape {tuple(z.shape)}; "
            "stack the patches of each image on dim 1"
        )
    if z.shape[1] < 2:
        raise ValueError(f"z needs n >= 2 patches per image to compare them, got n = {z.shape[1]}")
    if z.shape[0] < 2:
        raise ValueError(f"the batch needs at least 2 images, got {z.shape[0]}")


def variance_hinge(z: Tensor, eps: float = 1e-4) -> Tensor:
    """VICReg's variance term of ``z`` (``B x D``): ``mean_d relu(1 - sqrt(Var_b z[:, d] + eps))``.

    ``Var`` is the unbiased batch variance. It is 0 once every dimension has std >= 1 and close to
    1 when the batch collapses to one point.
    """
    std = torch.sqrt(z.var(dim=0) + eps)
    return F.relu(1.0 - std).mean()


def covariance_penalty(z: Tensor) -> Tensor:
    """VICReg's covariance term of ``z`` (``B x D``): ``(1/D) sum_{i != j} C_ij^2``.

    ``C = Zc^T Zc / (B - 1)`` is the batch covariance of the centred ``Zc``; the term is 0 when the
    dimensions are decorrelated.
    """
    batch, dim = z.shape
    centred = z - z.mean(dim=0)
    cov = centred.T @ centred / (batch - 1)
    off_diagonal = cov.pow(2).sum() - cov.diagonal().pow(2).sum()
    return off_diagonal / dim


def total_coding_rate(z: Tensor, eps: float) -> Tensor:
    """EMP-SSL's TCR of each patch index: ``R(Z_i) = 1/2 logdet(I_D + D / (m eps) Z_i^T Z_i)``.

    ``z`` is ``m x n x D`` (``m`` images); returns the ``n`` rates. ``eps`` is *not* squared,
    matching tsb0601/EMP-SSL's ``TotalCodingRate`` (the paper writes ``eps^2``); lightly follows
    the code too.
    """
    m, _, dim = z.shape
    scale = dim / (m * eps)
    per_index = z.transpose(0, 1)
    # Sylvester's identity det(I_D + c Z^T Z) = det(I_m + c Z Z^T): take the smaller matrix.
    if m < dim:
        gram = per_index @ per_index.transpose(1, 2)
    else:
        gram = per_index.transpose(1, 2) @ per_index
    identity = torch.eye(gram.shape[-1], dtype=z.dtype, device=z.device)
    return 0.5 * torch.logdet(identity + scale * gram)


class VICRegLoss(nn.Module):
    """VICReg (Bardes et al. 2022) over two views ``z_a``, ``z_b`` (``B x D``).

    ``total = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance`` with

    - invariance ``= (1/(B D)) sum_b ||z_a[b] - z_b[b]||^2`` (``F.mse_loss``, local batch);
    - variance ``= (v(Z_a) + v(Z_b)) / 2``, ``v`` = :func:`variance_hinge`;
    - covariance ``= c(Z_a) + c(Z_b)``, ``c`` = :func:`covariance_penalty`.

    This is facebookresearch/vicreg's ``main_vicreg.py`` exactly; lightly's ``VICRegLoss`` gives the
    same value with ``lambda_param, mu_param, nu_param = sim_coeff, std_coeff, cov_coeff``.
    """

    def __init__(
        self,
        sim_coeff: float = 25.0,
        std_coeff: float = 25.0,
        cov_coeff: float = 1.0,
        eps: float = 1e-4,
        gather_distributed: bool = True,
    ):
        super().__init__()
        self.sim_coeff = sim_coeff
        self.std_coeff = std_coeff
        self.cov_coeff = cov_coeff
        self.eps = eps
        self.gather_distributed = gather_distributed

    def forward(self, z_a: Tensor, z_b: Tensor) -> LossOutput:
        _check_pair(z_a, z_b, min_batch=2)
        with _full_precision(z_a.device):
            z_a, z_b = _at_least_float32(z_a), _at_least_float32(z_b)
            invariance = F.mse_loss(z_a, z_b)
            if self.gather_distributed:
                z_a, z_b = gather_with_grad(z_a), gather_with_grad(z_b)
            variance = 0.5 * (variance_hinge(z_a, self.eps) + variance_hinge(z_b, self.eps))
            covariance = covariance_penalty(z_a) + covariance_penalty(z_b)
            total = self.sim_coeff * invariance + self.std_coeff * variance + self.cov_coeff * covariance
        terms = {"invariance": invariance, "variance": variance, "covariance": covariance}
        return LossOutput(total, {k: v.detach() for k, v in terms.items()})


class BagSSLLoss(nn.Module):
    """BagSSL, the intra-instance VICReg of Chen et al. (2022), over ``z`` (``B x n x D``).

    The ``n`` fixed-scale patches of an image co-occur: each patch projection is pulled towards the
    mean projection of its image, ``m_b = (1/n) sum_i z[b, i]``, and VICReg's anti-collapse terms
    keep the images of the batch apart:

    - invariance ``= (1/(B n D)) sum_{b,i} ||z[b, i] - m_b||^2`` (local batch). Its gradient is the
      same whether or not it flows through ``m_b``, because the residuals sum to zero over ``i``;
    - variance ``= (1/n) sum_i v(z[:, i])`` and covariance ``= (1/n) sum_i c(z[:, i])``: VICReg's
      terms computed over the batch for each patch index ``i`` separately, then averaged over the
      ``n`` indices.

    With ``n = 2`` and ``m`` the mean of the two views ``a, b``: ``||a - m||^2 + ||b - m||^2 =
    ||a - b||^2 / 2``, so the invariance is VICReg's divided by 4, the variance equals VICReg's, and
    the covariance is VICReg's divided by 2 (an average over two views, not a sum):
    ``BagSSLLoss(4 s, t, 2 c)`` equals ``VICRegLoss(s, t, c)``.
    """

    def __init__(
        self,
        sim_coeff: float = 25.0,
        std_coeff: float = 25.0,
        cov_coeff: float = 1.0,
        eps: float = 1e-4,
        gather_distributed: bool = True,
    ):
        super().__init__()
        self.sim_coeff = sim_coeff
        self.std_coeff = std_coeff
        self.cov_coeff = cov_coeff
        self.eps = eps
        self.gather_distributed = gather_distributed

    def forward(self, z: Tensor) -> LossOutput:
        _check_patches(z)
        with _full_precision(z.device):
            z = _at_least_float32(z)
            invariance = (z - z.mean(dim=1, keepdim=True)).pow(2).mean()
            if self.gather_distributed:
                z = gather_with_grad(z)
            n = z.shape[1]
            # Mean over indices and dimensions of the hinge = mean over i of v(z[:, i]).
            std = torch.sqrt(z.var(dim=0) + self.eps)
            variance = F.relu(1.0 - std).mean()
            # One D x D covariance at a time: n of them at once would not fit for D = 8192.
            covariance = torch.stack([covariance_penalty(z[:, i]) for i in range(n)]).mean()
            total = self.sim_coeff * invariance + self.std_coeff * variance + self.cov_coeff * covariance
        terms = {"invariance": invariance, "variance": variance, "covariance": covariance}
        return LossOutput(total, {k: v.detach() for k, v in terms.items()})


class EMPSSLLoss(nn.Module):
    """EMP-SSL (Tong et al. 2023) over ``z`` (``B x n x D``), L2-normalised here.

    ``total = -tcr - invariance_coeff * invariance`` as in tsb0601/EMP-SSL's ``main.py`` with
    ``--tcr 1 --patch_sim 200``:

    - invariance ``= (1/(B n)) sum_{b,i} cos(z[b, i], m_b)``, ``m_b`` the mean of the image's ``n``
      normalised patch projections (not detached, as in EMP-SSL; local batch);
    - tcr ``= (1/n) sum_i R(Z_i)``, :func:`total_coding_rate` of each patch index over the batch.

    Both terms are maximised. Note lightly 1.6's ``EMPSSLLoss`` *adds* the TCR (it returns
    ``tcr - coeff * invariance``), which minimises the coding rate; this module keeps EMP-SSL's sign.
    """

    def __init__(self, invariance_coeff: float = 200.0, tcr_eps: float = 0.2, gather_distributed: bool = True):
        super().__init__()
        if tcr_eps <= 0:
            raise ValueError(f"tcr_eps must be positive, got {tcr_eps}")
        self.invariance_coeff = invariance_coeff
        self.tcr_eps = tcr_eps
        self.gather_distributed = gather_distributed

    def forward(self, z: Tensor) -> LossOutput:
        _check_patches(z)
        with _full_precision(z.device):
            z = F.normalize(_at_least_float32(z), dim=-1)
            image_mean = z.mean(dim=1, keepdim=True)
            invariance = F.cosine_similarity(z, image_mean, dim=-1).mean()
            if self.gather_distributed:
                z = gather_with_grad(z)
            tcr = total_coding_rate(z, self.tcr_eps).mean()
            total = -tcr - self.invariance_coeff * invariance
        return LossOutput(total, {"invariance": invariance.detach(), "tcr": tcr.detach()})


class NTXentLoss(nn.Module):
    """SimCLR's NT-Xent / InfoNCE (Chen et al. 2020) over two views ``z_a``, ``z_b`` (``B x D``).

    With ``u`` the L2-normalised projections of all ``2N`` views of the (global) batch, each view
    ``k`` of the local batch is an anchor whose positive ``k+`` is the other view of its image:

    ``ntxent = mean_k -log( exp(u_k.u_{k+} / T) / sum_{j != k} exp(u_k.u_j / T) )``,

    the ``2N - 2`` other views being the negatives. Equals lightly's ``NTXentLoss`` (same
    temperature, ``memory_bank_size=0``).
    """

    def __init__(self, temperature: float = 0.5, gather_distributed: bool = True):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, z_a: Tensor, z_b: Tensor) -> LossOutput:
        _check_pair(z_a, z_b, min_batch=1)
        batch = z_a.shape[0]
        with _full_precision(z_a.device):
            u_a = F.normalize(_at_least_float32(z_a), dim=1)
            u_b = F.normalize(_at_least_float32(z_b), dim=1)
            all_a, all_b = (gather_with_grad(u_a), gather_with_grad(u_b)) if self.gather_distributed else (u_a, u_b)
            global_batch = all_a.shape[0]
            if global_batch < 2:
                raise ValueError("NT-Xent needs at least 2 images in the (global) batch for negatives")
            anchors = torch.cat([u_a, u_b])
            candidates = torch.cat([all_a, all_b])
            logits = anchors @ candidates.T / self.temperature
            local = torch.arange(batch, device=z_a.device) + _rank_offset(batch, self.gather_distributed)
            own_index = torch.cat([local, local + global_batch])
            positive_index = torch.cat([local + global_batch, local])
            rows = torch.arange(2 * batch, device=z_a.device)
            is_self = torch.zeros_like(logits, dtype=torch.bool)
            is_self[rows, own_index] = True
            logits = logits.masked_fill(is_self, float("-inf"))
            ntxent = F.cross_entropy(logits, positive_index)
        return LossOutput(ntxent, {"ntxent": ntxent.detach()})


if __name__ == "__main__":  # a library module: python -m ssl_patch_analysis.losses says so, exit 2
    from ssl_patch_analysis.__main__ import not_a_command

    not_a_command(__spec__.name)
