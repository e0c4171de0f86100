"""Small linear-algebra helpers for the optimizers: canonical SVD signs, randomized SVD, Sylvester, pinv."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

HIGHEST = lax.Precision.HIGHEST


def canonical_signs(u, vh, *, by: str):
    r"""Flips each singular pair ``(u[:, i], vh[i, :])`` so that one of its vectors has its largest-magnitude entry positive.

    ``by="u"`` decides by the left vector ``u[..., :, i]``, ``by="vh"`` by the right
    vector ``vh[..., i, :]`` (ties: the first largest entry). An SVD fixes each pair
    only up to a common sign, and LAPACK builds (CPU, GPU, TPU, MKL vs OpenBLAS)
    choose differently; with this rule the result depends only on the matrix.
    """
    if by == "u":
        ref = jnp.swapaxes(u, -1, -2)  # [..., k, m]
    elif by == "vh":
        ref = vh
    else:
        raise ValueError(f"`by` must be 'u' or 'vh', got {by!r}")
    idx = jnp.argmax(jnp.abs(ref), axis=-1)
    pick = jnp.take_along_axis(ref, idx[..., None], axis=-1)[..., 0]
    sign = jnp.where(pick < 0, -1.0, 1.0).astype(u.dtype)  # [..., k]
    return u * sign[..., None, :], vh * sign[..., :, None]


def randomized_svd(a, k: int, key, *, oversample: int = 8, power_iters: int = 2):
    r"""Top-``k`` SVD of ``a: [..., m, n]`` by randomized range finding (Halko et al, 2011).

    ``l = min(k + oversample, m, n)`` Gaussian probes, ``power_iters`` subspace
    iterations re-orthonormalised by QR, then an exact SVD of the ``[l, n]``
    projection ``Q^T a``. Costs ``O(m n l)`` instead of ``O(m n min(m, n))``.

    Reference: Halko, Martinsson and Tropp, `Finding structure with randomness
    <https://arxiv.org/abs/0909.4061>`_, 2011.
    """
    m, n = a.shape[-2:]
    l = min(k + oversample, m, n)
    omega = jax.random.normal(key, (*a.shape[:-2], n, l), a.dtype)
    at = jnp.swapaxes(a, -1, -2)
    q, _ = jnp.linalg.qr(jnp.matmul(a, omega, precision=HIGHEST))
    for _ in range(power_iters):
        z, _ = jnp.linalg.qr(jnp.matmul(at, q, precision=HIGHEST))
        q, _ = jnp.linalg.qr(jnp.matmul(a, z, precision=HIGHEST))
    b = jnp.matmul(jnp.swapaxes(q, -1, -2), a, precision=HIGHEST)  # [..., l, n]
    ub, s, vh = jnp.linalg.svd(b, full_matrices=False)
    u = jnp.matmul(q, ub, precision=HIGHEST)
    return u[..., :, :k], s[..., :k], vh[..., :k, :]


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
