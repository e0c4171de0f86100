"""Small linear-algebra helpers for the optimizers: Sylvester, pinv, and the SVD helpers of :mod:`lowrank_jax.linalg`."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from lowrank_jax import linalg

HIGHEST = lax.Precision.HIGHEST


def canonical_signs(u, vh, *, by: str):
    """:func:`lowrank_jax.linalg.canonical_signs`, with ``by`` required."""
    return linalg.canonical_signs(u, vh, by=by)


def randomized_svd(a, k: int, key, *, oversample: int = 8, power_iters: int = 2):
    """Top-``min(k, m, n)`` SVD of ``a: [..., m, n]`` with raw LAPACK signs (GaLore applies :func:`canonical_signs`).

    :func:`lowrank_jax.linalg.randomized_svd` (Halko et al, 2011) with ``niter = power_iters``
    and ``canonical=False``.
    """
    k = min(k, *a.shape[-2:])
    return linalg.randomized_svd(key, a, k, oversample=oversample, niter=power_iters, canonical=False)


def pinv_psd(m, delta: float):
    """``pinv(m + delta I)`` by SVD, as ``torch.linalg.pinv`` computes it (default tolerances)."""
    r = m.shape[-1]
    return jnp.linalg.pinv(m + delta * jnp.eye(r, dtype=m.dtype))


def solve_sylvester_sym(p, q, c):
    r"""``X`` with ``P X + X Q = C`` for symmetric positive semi-definite ``P: [r, r]``, ``Q: [s, s]``.

    With ``P = U diag(a) U^T`` and ``Q = V diag(b) V^T`` (``eigh``), ``Y = U^T X V``
    solves ``a_i Y_ij + Y_ij b_j = (U^T C V)_ij``, so
    ``X = U [ (U^T C V)_ij / (a_i + b_j) ] V^T``. Entries with ``a_i + b_j <= 0``
    (both matrices singular in the same direction) are set to 0: the
    minimum-norm least-squares solution. ``O(r^3)``, real arithmetic, batched over
    leading axes. (LoRA-Pro's reference solves the same equation with general
    complex ``eig``; both matrices are Gram matrices here, so ``eigh`` is exact and stable.)
    """
    a, u = jnp.linalg.eigh(p)
    b, v = jnp.linalg.eigh(q)
    f = jnp.einsum("...ji,...jk,...kl->...il", u, c, v, precision=HIGHEST)
    denom = a[..., :, None] + b[..., None, :]
    scale = jnp.maximum(jnp.max(jnp.abs(denom), axis=(-2, -1), keepdims=True), jnp.finfo(p.dtype).tiny)
    ok = denom > scale * jnp.finfo(p.dtype).eps
    y = jnp.where(ok, f / jnp.where(ok, denom, 1.0), 0.0)
    return jnp.einsum("...ij,...jk,...lk->...il", u, y, v, precision=HIGHEST)
