"""Entropic optimal transport between two feature batches (the RvS regularizer).

Baytaş & Deb, "Robustness-via-Synthesis", Neurocomputing 2023 (arXiv 2108.09713), §3.2:
the classifier is regularized, and the generator trained, with the entropic optimal-transport
cost between the penultimate features of the clean and the synthesized batches: uniform
marginals, squared Euclidean cost, log-domain Sinkhorn with ``reg = 0.01`` and a fixed 100
iterations, value ``<pi, C>``, gradients through the iterations.

Computed with POT (``ot.sinkhorn2(method="sinkhorn_log")``); with torch tensors POT runs on
the torch backend, so autograd differentiates through every Sinkhorn iteration. Not a core
module (it imports POT); :func:`atop.trainers.rvs.rvs_step` receives it as ``ot_fn``.
"""

from __future__ import annotations

import ot
import torch
from torch import Tensor


def entropic_ot(
    features_clean: Tensor, features_adv: Tensor, reg: float = 0.01, num_iter: int = 100
) -> Tensor:
    """Entropic OT cost ``<pi, C>`` between two feature batches (RvS §3.2).

    ``C[i, j] = ||features_clean[i] - features_adv[j]||^2``, marginals ``1/n`` and ``1/m``,
    ``pi`` from exactly ``num_iter`` log-domain Sinkhorn iterations (no early stop):
    ``ot.sinkhorn2(a, b, ot.dist(f_clean, f_adv), reg, method="sinkhorn_log",
    numItermax=num_iter, stopThr=0.0)``.

    Runs in float32 (float64 inputs stay float64) with autocast turned off: ``C / reg`` is
    large and half precision would ruin the plan. Differentiable with respect to both inputs.

    Args:
        features_clean: float ``[n, d]``, e.g. penultimate features of the clean batch.
        features_adv: float ``[m, d]``, e.g. penultimate features of the synthesized batch.
        reg: entropic regularization (> 0), in the units of the squared feature distance.
        num_iter: number of Sinkhorn iterations (>= 1).

    Returns:
        0-dim tensor (float32, or float64 for float64 inputs): the transport cost, >= 0.

    Raises:
        ValueError: inputs are not 2-D with the same feature size and at least one row,
            ``reg <= 0`` or ``num_iter < 1``.
    """
    if features_clean.ndim != 2 or features_adv.ndim != 2:
        raise ValueError(
            f"entropic_ot expects 2-D feature batches [n, d], got {tuple(features_clean.shape)} "
            f"and {tuple(features_adv.shape)}: flatten the features first."
        )
    if features_clean.shape[1] != features_adv.shape[1]:
        raise ValueError(
            f"Feature sizes differ: {features_clean.shape[1]} vs {features_adv.shape[1]}."
        )
    if len(features_clean) == 0 or len(features_adv) == 0:
        raise ValueError("entropic_ot needs at least one row in each batch.")
    if reg <= 0 or num_iter < 1:
        raise ValueError(f"reg must be > 0 and num_iter >= 1, got {reg} and {num_iter}.")
    dtype = torch.promote_types(features_clean.dtype, torch.float32)
    with torch.autocast(device_type=features_clean.device.type, enabled=False):
        f_clean = features_clean.to(dtype)
        f_adv = features_adv.to(dtype)
        a = torch.full((len(f_clean),), 1.0 / len(f_clean), dtype=dtype, device=f_clean.device)
        b = torch.full((len(f_adv),), 1.0 / len(f_adv), dtype=dtype, device=f_adv.device)
        cost = ot.dist(f_clean, f_adv, metric="sqeuclidean")
        return ot.sinkhorn2(
            a, b, cost, reg=reg, method="sinkhorn_log", numItermax=num_iter, stopThr=0.0
        )
