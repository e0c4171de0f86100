r"""Matrix and tensor decompositions behind the low-rank methods, as plain ``jax.numpy`` functions.

Matrices are ``w: [..., m, n]`` (leading axes are a batch wherever that is natural),
real floating point; integer input is cast to float32, other dtypes are kept.
Nothing here is jitted at the top level, so every function composes inside the
caller's ``jax.jit`` (rank-like arguments are static Python ints).

Bad input. Shapes and ranks are validated eagerly and raise ``ValueError`` with
the offending value. Values are not checked (a check cannot run under ``jit``):
NaN or Inf in the input gives NaN in the output (the SVD of a non-finite matrix is
all NaN, and :func:`pinv` returns NaN explicitly rather than a silently
truncated inverse). Call :func:`check_finite` outside ``jit`` for a clear error.

Signs. An SVD fixes each singular pair ``(u_i, v_i)`` only up to a common sign and
LAPACK builds choose differently; :func:`svd`, :func:`randomized_svd`, the Tucker
factors and the Monarch factors apply :func:`canonical_signs`, so their results
depend only on the input matrix.
"""

from __future__ import annotations

import functools
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "CP",
    "Monarch",
    "Tucker",
    "approximation_error",
    "best_rank_r",
    "canonical_signs",
    "check_finite",
    "cp_als",
    "cp_reconstruct",
    "cr_product",
    "magnitude_direction",
    "monarch_dense",
    "monarch_matmul",
    "monarch_project",
    "pinv",
    "qr",
    "randomized_svd",
    "reduced_svd",
    "svd",
    "tucker_hooi",
    "tucker_hosvd",
    "tucker_reconstruct",
]

HIGHEST = lax.Precision.HIGHEST


def _as_float(x):
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.inexact) else x.astype(jnp.float32)


def _as_matrix(name: str, w):
    w = _as_float(w)
    if w.ndim < 2 or 0 in w.shape[-2:]:
        raise ValueError(f"`{name}` must be a non-empty matrix [..., m, n], got shape {w.shape}")
    return w


def _check_int(name: str, value, low: int, high: int | None = None, why: str = "") -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"`{name}` must be an integer, got {value!r}") from None
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"`{name}` must be {bound}{why}, got {value}")
    return value


def check_finite(x, name: str = "x"):
    """Returns ``x`` unchanged; raises ``ValueError`` if the concrete array ``x`` holds NaN or Inf.

    A no-op on tracers (inside ``jit``, ``grad``, ``vmap``), where values are unknown;
    use it at the boundary where data enters, outside the compiled function.

    Example:
      >>> import jax.numpy as jnp
      >>> check_finite(jnp.array([1.0, jnp.nan]), "w")
      Traceback (most recent call last):
      ...
      ValueError: `w` has 1 NaN and 0 Inf entries (of 2)
    """
    if isinstance(x, jax.core.Tracer):
        return x
    arr = jnp.asarray(x)
    if not jnp.issubdtype(arr.dtype, jnp.inexact):
        return x
    counts = jnp.stack([jnp.sum(jnp.isnan(arr)), jnp.sum(jnp.isinf(arr))])
    if isinstance(counts, jax.core.Tracer):  # a concrete array closed over by a trace: its counts are traced too
        return x
    nan, inf = (int(c) for c in counts)
    if nan or inf:
        raise ValueError(f"`{name}` has {nan} NaN and {inf} Inf entries (of {arr.size})")
    return x


def _one_matrix_at_a_time(decompose, w):
    """Runs ``decompose`` over the batch axes of ``w: [..., m, n]`` with :func:`jax.lax.map` on CPU.

    On the CPU backend (jax/jaxlib 0.10.2) a program holding *batched* LAPACK
    factorisations (QR, SVD) can deadlock in XLA's runtime: e.g. four
    ``[2, 576, 576]`` QRs in one ``jit``, or GaLore's ``[L, m, n]`` SVD on eight
    simulated devices, where every device thread waits in the custom call for work
    queued on the saturated intra-op pool. Unbatched calls do not, and cost the same
    FLOPs. Other backends use the batched kernel. Under an outer ``jax.vmap`` the
    call is batched again, so map over stacked matrices with ``lax.map`` instead.
    """
    if w.ndim <= 2 or jax.default_backend() != "cpu":
        return decompose(w)
    batch = w.shape[:-2]
    outs = lax.map(decompose, w.reshape(-1, *w.shape[-2:]))
    return tuple(o.reshape(*batch, *o.shape[1:]) for o in outs)


def qr(w):
    """Reduced QR ``w = q r`` of ``w: [..., m, n]``, as :func:`jnp.linalg.qr`, one matrix at a time on CPU
    (see :func:`_one_matrix_at_a_time`)."""
    return _one_matrix_at_a_time(jnp.linalg.qr, w)


def reduced_svd(w):
    """``u, s, vh = jnp.linalg.svd(w, full_matrices=False)`` for ``w: [..., m, n]``, one matrix at a time on
    CPU (see :func:`_one_matrix_at_a_time`); no sign convention (:func:`svd` adds one)."""
    return _one_matrix_at_a_time(lambda x: tuple(jnp.linalg.svd(x, full_matrices=False)), w)


def _column_signs(u):
    """``+-1`` per column of ``u: [..., m, k]`` making the first largest-magnitude entry positive."""
    idx = jnp.argmax(jnp.abs(u), axis=-2)  # [..., k]
    pick = jnp.take_along_axis(u, idx[..., None, :], axis=-2)[..., 0, :]
    return jnp.where(pick < 0, -1.0, 1.0).astype(u.dtype)


def canonical_signs(u, vh, *, by: str = "u"):
    r"""Flips each singular pair ``(u[..., :, i], vh[..., i, :])`` so that one of its vectors has its largest-magnitude entry positive.

    ``by="u"`` decides by the left vector ``u[..., :, i]``, ``by="vh"`` by the right
    vector ``vh[..., i, :]`` (ties: the first largest entry). ``u s vh`` is unchanged.
    An SVD fixes each pair only up to a common sign, and LAPACK builds (CPU, GPU,
    TPU, MKL vs OpenBLAS) choose differently; with this rule the result depends
    only on the matrix (for distinct singular values).

    Example:
      >>> import jax.numpy as jnp
      >>> u, vh = canonical_signs(jnp.array([[-0.8], [0.6]]), jnp.array([[1.0, 2.0]]))
      >>> print(u.ravel(), vh.ravel())
      [ 0.8 -0.6] [-1. -2.]
    """
    if by == "u":
        sign = _column_signs(u)
    elif by == "vh":
        sign = _column_signs(jnp.swapaxes(vh, -1, -2))
    else:
        raise ValueError(f"`by` must be 'u' or 'vh', got {by!r}")
    return u * sign[..., None, :], vh * sign[..., :, None]


def svd(w, rank: int | None = None):
    r"""Truncated SVD ``w ~ u diag(s) vh`` with ``u: [..., m, k]``, ``s: [..., k]``, ``vh: [..., k, n]``.

    ``k = rank`` (default ``min(m, n)``), ``s`` descending, signs canonical
    (:func:`canonical_signs`, by ``u``), so the result is the same on every
    backend. ``rank > min(m, n)`` raises ``ValueError``. A rank above the numerical
    rank of ``w`` is allowed: the trailing singular values are ~0 and their vectors
    are an arbitrary orthonormal completion (still orthonormal, not unique).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> w = jax.random.normal(jax.random.key(0), (5, 3))
      >>> u, s, vh = svd(w, 2)
      >>> u.shape, s.shape, vh.shape
      ((5, 2), (2,), (2, 3))
      >>> bool(jnp.allclose(svd(w)[0] * svd(w)[1] @ svd(w)[2], w, atol=1e-5))
      True
    """
    w = _as_matrix("w", w)
    k = min(w.shape[-2:])
    rank = k if rank is None else _check_int("rank", rank, 1, k, f" (min(m, n) of a {w.shape[-2:]} matrix)")
    return _svd(w, rank=rank)


@functools.partial(jax.jit, static_argnames=("rank",))
def _svd(w, *, rank: int):
    u, s, vh = reduced_svd(w)
    u, vh = canonical_signs(u[..., :, :rank], vh[..., :rank, :], by="u")
    return u, s[..., :rank], vh


def randomized_svd(key, w, rank: int, *, oversample: int = 8, niter: int = 2, canonical: bool = True):
    r"""Approximate top-``rank`` SVD of ``w: [..., m, n]`` by randomized subspace iteration.

    With ``l = min(rank + oversample, m, n)`` Gaussian probes ``Omega: [n, l]``:

    .. math::
        Q = \operatorname{qr}(w \Omega), \quad
        Q \leftarrow \operatorname{qr}\big(w\, \operatorname{qr}(w^T Q)\big) \;(\text{niter times}), \quad
        Q^T w = \tilde U S V^T, \quad u = Q \tilde U

    truncated to ``rank``. Costs ``O(m n l (1 + 2\,niter))`` instead of
    ``O(m n \min(m, n))``; exact when ``rank(w) <= l``, and the error approaches the
    optimum :func:`approximation_error` geometrically in ``niter`` (at rate
    ``(s_{l+1} / s_{rank})^{2 niter + 1}``). This is ``torch.svd_lowrank``'s
    algorithm (used by peft's fast PiSSA init, there with ``oversample=0``) and
    GaLore's randomized projector. Batched over leading axes with independent
    probes (``jax.random.normal(key, (*batch, n, l))``). ``canonical=False`` skips
    :func:`canonical_signs` and returns the raw LAPACK signs.

    Args:
      key: a PRNG key.
      w: ``[..., m, n]``.
      rank: ``1 <= rank <= min(m, n)``.
      oversample: extra probes beyond ``rank`` (>= 0).
      niter: power iterations (>= 0); 1-2 suffice unless the spectrum decays slowly.
      canonical: apply :func:`canonical_signs` (by ``u``).

    Returns:
      ``(u [..., m, rank], s [..., rank], vh [..., rank, n])``.

    References:
      Halko, Martinsson and Tropp, `Finding structure with randomness: probabilistic
      algorithms for constructing approximate matrix decompositions
      <https://arxiv.org/abs/0909.4061>`_, 2011 (algorithm 4.4).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ka, kb = jax.random.split(jax.random.key(0))
      >>> w = jax.random.normal(ka, (20, 3)) @ jax.random.normal(kb, (3, 15))  # rank 3
      >>> u, s, vh = randomized_svd(jax.random.key(1), w, 3, niter=1)
      >>> bool(jnp.allclose(s, svd(w, 3)[1], rtol=1e-4))
      True
    """
    w = _as_matrix("w", w)
    m, n = w.shape[-2:]
    rank = _check_int("rank", rank, 1, min(m, n), f" (min(m, n) of a {(m, n)} matrix)")
    oversample = _check_int("oversample", oversample, 0)
    niter = _check_int("niter", niter, 0)
    return _randomized_svd(key, w, rank=rank, oversample=oversample, niter=niter, canonical=bool(canonical))


@functools.partial(jax.jit, static_argnames=("rank", "oversample", "niter", "canonical"))
def _randomized_svd(key, w, *, rank: int, oversample: int, niter: int, canonical: bool):
    m, n = w.shape[-2:]
    l = min(rank + oversample, m, n)
    omega = jax.random.normal(key, (*w.shape[:-2], n, l), w.dtype)
    wt = jnp.swapaxes(w, -1, -2)
    q, _ = qr(jnp.matmul(w, omega, precision=HIGHEST))
    for _ in range(niter):
        z, _ = qr(jnp.matmul(wt, q, precision=HIGHEST))
        q, _ = qr(jnp.matmul(w, z, precision=HIGHEST))
    b = jnp.matmul(jnp.swapaxes(q, -1, -2), w, precision=HIGHEST)  # [..., l, n]
    ub, s, vh = reduced_svd(b)
    u = jnp.matmul(q, ub, precision=HIGHEST)
    u, s, vh = u[..., :, :rank], s[..., :rank], vh[..., :rank, :]
    if canonical:
        u, vh = canonical_signs(u, vh, by="u")
    return u, s, vh


def best_rank_r(w, rank: int):
    r"""The best rank-``rank`` approximation of ``w: [..., m, n]`` (Eckart-Young-Mirsky).

    .. math::
        w_r = \sum_{i \le r} s_i u_i v_i^T = \operatorname*{arg\,min}_{\operatorname{rank}(x) \le r} \|w - x\|

    in the Frobenius and the spectral norm (any unitarily invariant norm), with the
    error given by :func:`approximation_error`. ``0 <= rank <= min(m, n)``
    (``rank=0`` gives zeros). When ``s_r = s_{r+1}`` the minimiser is not unique;
    this returns one of them.

    References:
      Eckart and Young, `The approximation of one matrix by another of lower rank
      <https://doi.org/10.1007/BF02288367>`_, 1936.

    Example:
      >>> import jax.numpy as jnp
      >>> print(best_rank_r(jnp.diag(jnp.array([3.0, 2.0, 1.0])), 2))
      [[3. 0. 0.]
       [0. 2. 0.]
       [0. 0. 0.]]
    """
    w = _as_matrix("w", w)
    k = min(w.shape[-2:])
    rank = _check_int("rank", rank, 0, k, f" (min(m, n) of a {w.shape[-2:]} matrix)")
    if rank == 0:
        return jnp.zeros_like(w)
    return _best_rank_r(w, rank=rank)


@functools.partial(jax.jit, static_argnames=("rank",))
def _best_rank_r(w, *, rank: int):
    u, s, vh = _svd(w, rank=rank)
    return jnp.matmul(u * s[..., None, :], vh, precision=HIGHEST)


def approximation_error(w, rank: int, *, norm: str = "fro"):
    r"""``min_{rank(x) <= r} ||w - x||``, from the singular values of ``w`` alone.

    .. math::
        \|w - w_r\|_F = \Big(\sum_{i > r} s_i^2\Big)^{1/2}, \qquad \|w - w_r\|_2 = s_{r+1}

    (``norm="fro"`` or ``norm="spectral"``; 0 when ``rank = min(m, n)``). Computing it
    from ``s`` avoids the cancellation of ``||w - best_rank_r(w, r)||`` in float32.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.diag(jnp.array([4.0, 2.0, 1.0]))
      >>> round(float(approximation_error(w, 1)), 4), float(approximation_error(w, 1, norm="spectral"))
      (2.2361, 2.0)
    """
    w = _as_matrix("w", w)
    k = min(w.shape[-2:])
    rank = _check_int("rank", rank, 0, k, f" (min(m, n) of a {w.shape[-2:]} matrix)")
    if norm not in ("fro", "spectral"):
        raise ValueError(f"`norm` must be 'fro' or 'spectral', got {norm!r}")
    return _approximation_error(w, rank=rank, norm=norm)


@functools.partial(jax.jit, static_argnames=("rank", "norm"))
def _approximation_error(w, *, rank: int, norm: str):
    s = jnp.linalg.svd(w, compute_uv=False)
    tail = s[..., rank:]
    if norm == "fro":
        return jnp.sqrt(jnp.sum(tail * tail, axis=-1))
    return tail[..., 0] if rank < s.shape[-1] else jnp.zeros(s.shape[:-1], s.dtype)


def pinv(w, *, rtol=None):
    r"""Moore-Penrose pseudo-inverse of ``w: [..., m, n]`` by SVD, ``[..., n, m]``.

    .. math::
        w^+ = V \operatorname{diag}(\sigma_i^+) U^T, \qquad
        \sigma_i^+ = \begin{cases} 1/\sigma_i & \sigma_i > \mathrm{rtol}\cdot\sigma_{\max} \\ 0 & \text{otherwise}\end{cases}

    with ``rtol = max(m, n) * eps(dtype)`` by default (numpy's and torch's
    convention). ``w^+`` is the unique matrix with ``w w^+ w = w``,
    ``w^+ w w^+ = w^+`` and ``w w^+``, ``w^+ w`` symmetric, and ``w^+ y`` is the
    minimum-norm least-squares solution of ``w x = y``; singular and
    rank-deficient ``w`` are fine, the zero matrix gives zeros. Non-finite input
    gives an all-NaN result for that matrix (never a silently truncated
    inverse); see :func:`check_finite`.

    References:
      Penrose, `A generalized inverse for matrices
      <https://doi.org/10.1017/S0305004100030401>`_, 1955.

    Example:
      >>> import jax.numpy as jnp
      >>> print(pinv(jnp.array([[2.0, 0.0], [0.0, 0.0]])))
      [[0.5 0. ]
       [0.  0. ]]
    """
    w = _as_matrix("w", w)
    m, n = w.shape[-2:]
    if rtol is None:
        rtol = max(m, n) * jnp.finfo(w.dtype).eps
    return _pinv(w, jnp.asarray(rtol, w.dtype))


@jax.jit
def _pinv(w, rtol):
    u, s, vh = reduced_svd(w)
    keep = s > rtol[..., None] * s[..., :1]
    s_inv = jnp.where(keep, 1.0 / jnp.where(keep, s, 1.0), 0.0)
    out = jnp.matmul(jnp.swapaxes(vh, -1, -2) * s_inv[..., None, :], jnp.swapaxes(u, -1, -2), precision=HIGHEST)
    finite = jnp.all(jnp.isfinite(w), axis=(-2, -1), keepdims=True)
    return jnp.where(finite, out, jnp.nan)


def cr_product(key, a, b, samples: int, *, probabilities: str = "norm", return_probabilities: bool = False):
    r"""Monte Carlo approximation of ``a @ b`` (``a: [m, K]``, ``b: [K, n]``) from ``samples`` column-row pairs.

    Draws ``k_1, ..., k_c`` i.i.d. with ``P(k) = p_k`` and returns

    .. math::
        C R = \sum_{t=1}^{c} \frac{a_{:, k_t}\, b_{k_t, :}}{c\, p_{k_t}}, \qquad
        \mathbb{E}[C R] = a b, \qquad
        \mathbb{E}\|C R - a b\|_F^2 = \frac{1}{c}\Big(\sum_k \frac{\|a_{:,k}\|^2 \|b_{k,:}\|^2}{p_k} - \|a b\|_F^2\Big).

    ``probabilities="norm"``: ``p_k \propto \|a_{:,k}\| \|b_{k,:}\|``, the
    distribution minimising that variance (to ``((\sum_k \|a_{:,k}\|\|b_{k,:}\|)^2 -
    \|ab\|_F^2) / c``); pairs with a zero norm have ``p_k = 0`` and are never drawn
    (they contribute nothing to ``a b``); if every pair is zero, ``p`` is uniform
    and the result is 0. ``probabilities="uniform"``: ``p_k = 1/K``. Unbatched:
    ``jax.vmap`` over keys or matrices. ``return_probabilities=True`` also
    returns ``p: [K]``.

    References:
      Drineas, Kannan and Mahoney, `Fast Monte Carlo algorithms for matrices I:
      approximating matrix multiplication <https://doi.org/10.1137/S0097539704442684>`_, 2006.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> a, b = jnp.eye(3)[:, :2] * jnp.array([1.0, 0.0]), jnp.ones((2, 4))  # one nonzero pair: exact
      >>> approx, p = cr_product(jax.random.key(0), a, b, 5, return_probabilities=True)
      >>> bool(jnp.allclose(approx, a @ b)), p.tolist()
      (True, [1.0, 0.0])
    """
    a, b = _as_float(a), _as_float(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"`a` and `b` must be [m, K] and [K, n] matrices, got shapes {a.shape} and {b.shape}")
    if a.shape[1] == 0:
        raise ValueError("the inner dimension K of `a @ b` must be positive, got 0")
    samples = _check_int("samples", samples, 1)
    if probabilities not in ("norm", "uniform"):
        raise ValueError(f"`probabilities` must be 'norm' or 'uniform', got {probabilities!r}")
    out, p = _cr_product(key, a, b, samples=samples, probabilities=probabilities)
    return (out, p) if return_probabilities else out


@functools.partial(jax.jit, static_argnames=("samples", "probabilities"))
def _cr_product(key, a, b, *, samples: int, probabilities: str):
    dtype = jnp.result_type(a, b)
    inner = a.shape[1]
    if probabilities == "norm":
        weight = jnp.linalg.norm(a, axis=0).astype(dtype) * jnp.linalg.norm(b, axis=1).astype(dtype)
        total = jnp.sum(weight)
        p = jnp.where(total > 0, weight / jnp.where(total > 0, total, 1.0), 1.0 / inner)
    else:
        p = jnp.full((inner,), 1.0 / inner, dtype)
    idx = jax.random.choice(key, inner, (samples,), replace=True, p=p)
    scale = 1.0 / (samples * p[idx])
    out = jnp.matmul(a[:, idx] * scale.astype(a.dtype), b[idx, :], precision=HIGHEST).astype(dtype)
    return out, p


def magnitude_direction(w, axis: int | tuple[int, ...] = 0):
    r"""DoRA's split ``w = m \cdot d`` into magnitudes ``m = ||w||`` along ``axis`` and unit-norm directions ``d``.

    .. math::
        m = \|w\|_{\text{axis}}, \qquad d = w / m, \qquad w = \operatorname{expand\_dims}(m, \text{axis}) \cdot d

    For a Flax kernel ``[in, out]``, ``axis=0`` gives one magnitude per output unit
    (``m: [out]``), DoRA's column norm (peft's ``weight_norm`` of the torch
    ``[out, in]`` weight along dim 1). ``axis`` may be a tuple for N-D kernels.
    A zero slice gets ``m = 0`` and direction 0 (not NaN), so the reconstruction
    stays exact and gradients stay finite (0 through the zero slice's norm);
    NaN entries give NaN in their slice.

    References:
      Liu et al, `DoRA: Weight-Decomposed Low-Rank Adaptation
      <https://arxiv.org/abs/2402.09353>`_, 2024.

    Example:
      >>> import jax.numpy as jnp
      >>> m, d = magnitude_direction(jnp.array([[3.0, 0.0], [4.0, 0.0]]))
      >>> print(m, d[:, 0], d[:, 1])
      [5. 0.] [0.6 0.8] [0. 0.]
    """
    return _magnitude_direction(_as_float(w), axis=tuple(axis) if isinstance(axis, (list, tuple)) else axis)


@functools.partial(jax.jit, static_argnames=("axis",))
def _magnitude_direction(w, *, axis):
    squares = jnp.sum(w * w, axis=axis, keepdims=True)
    zero = squares == 0
    norm = jnp.where(zero, 0.0, jnp.sqrt(jnp.where(zero, 1.0, squares)))
    direction = jnp.where(zero, 0.0, w / jnp.where(zero, 1.0, norm))
    return jnp.squeeze(norm, axis=axis), direction


# ---------------------------------------------------------------------------- tensors


def _unfold(x, mode: int):
    """Mode-``mode`` unfolding ``[I_mode, prod of the other sizes]`` (columns in C order)."""
    return jnp.moveaxis(x, mode, 0).reshape(x.shape[mode], -1)


def _mode_dot(x, matrix, mode: int):
    """``x \\times_{mode} matrix``: contracts axis ``mode`` of ``x`` with ``matrix: [J, I_mode]``."""
    return jnp.moveaxis(jnp.tensordot(matrix, x, axes=((1,), (mode,)), precision=HIGHEST), 0, mode)


def _leading_left_vectors(a, r: int):
    """The top-``r`` left singular vectors of ``a: [I, P]``, canonical signs; ``r <= I`` also when ``I > P``."""
    u, _, _ = jnp.linalg.svd(a, full_matrices=a.shape[0] > a.shape[1])
    u = u[:, :r]
    return u * _column_signs(u)


class CP(NamedTuple):
    """A CP (CANDECOMP/PARAFAC) decomposition from :func:`cp_als`."""

    weights: jax.Array  # [R] >= 0, the column norms taken out of the factors
    factors: tuple  # one [I_n, R] per mode, columns of unit norm
    rel_errors: jax.Array  # [iters] ||x - x_t|| / ||x|| after sweep t, NaN after the last sweep run
    num_iters: jax.Array  # int32, sweeps run


def cp_reconstruct(factors, weights=None):
    r"""The tensor ``\sum_r w_r\, a^{(1)}_r \circ \cdots \circ a^{(N)}_r`` of factors ``[I_n, R]`` (``weights`` default 1).

    Example:
      >>> import jax.numpy as jnp
      >>> cp_reconstruct((jnp.ones((2, 1)), jnp.ones((3, 1))), jnp.array([2.0])).tolist()
      [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]
    """
    factors = tuple(_as_float(f) for f in factors)
    rank = factors[0].shape[-1]
    if any(f.ndim != 2 or f.shape[1] != rank for f in factors):
        raise ValueError(f"CP factors must all be [I_n, R] with one R, got shapes {[f.shape for f in factors]}")
    return _cp_reconstruct(factors, weights)


@jax.jit
def _cp_reconstruct(factors, weights):
    if weights is not None:
        factors = (factors[0] * weights,) + factors[1:]
    letters = "abcdefghijklmnopqstuvwxyz"[: len(factors)]
    spec = ",".join(f"{c}r" for c in letters) + "->" + letters
    return jnp.einsum(spec, *factors, precision=HIGHEST)


def cp_als(key, x, rank: int, *, iters: int = 100, tol: float | None = 1e-6) -> CP:
    r"""Rank-``rank`` CP decomposition ``x ~ \sum_r w_r a^{(1)}_r \circ \cdots \circ a^{(N)}_r`` by alternating least squares.

    Each sweep solves, mode by mode, the linear least-squares problem for one
    factor with the others fixed (Kolda and Bader's algorithm CP-ALS):

    .. math::
        A^{(n)} \leftarrow X_{(n)} \big(A^{(N)} \odot \cdots \odot A^{(n+1)} \odot A^{(n-1)} \odot \cdots \odot A^{(1)}\big)
        \big(\ast_{k \ne n} A^{(k)T} A^{(k)}\big)^{+}

    (``⊙`` Khatri-Rao, ``∗`` Hadamard product, ``+`` :func:`pinv`), then moves the
    column norms of ``A^{(n)}`` into ``w``. Every update is an exact minimisation,
    so ``||x - x_t||`` never increases (up to rounding). Factors start i.i.d.
    standard normal from ``key``. Stops after ``iters`` sweeps or when the relative
    error decreases by less than ``tol`` in one sweep (``tol=None``: run all sweeps;
    near convergence float32 rounding makes the error flicker by ~1e-7, so a
    ``tol`` of 0 stops there).
    ALS finds a local minimum; a best rank-R CP approximation need not exist for
    R > 1 (degeneracy), so restart from other keys if the error stalls. A NaN in
    ``x`` stops after one sweep with NaN factors. Jitted internally (``rank``,
    ``iters`` static), ``lax.while_loop`` over sweeps.

    Returns:
      :class:`CP` ``(weights, factors, rel_errors, num_iters)``.

    References:
      Kolda and Bader, `Tensor decompositions and applications
      <https://doi.org/10.1137/07070111X>`_, 2009 (section 3.4, figure 3.3).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = cp_reconstruct((jnp.arange(1.0, 4.0)[:, None], jnp.ones((4, 1)), jnp.array([[1.0], [-2.0]])))
      >>> cp = cp_als(jax.random.key(0), x, 1)
      >>> bool(jnp.allclose(cp_reconstruct(cp.factors, cp.weights), x, atol=1e-5))
      True
    """
    x = _as_float(x)
    if x.ndim < 2 or 0 in x.shape:
        raise ValueError(f"`x` must be a non-empty tensor with at least 2 axes, got shape {x.shape}")
    if x.ndim > 25:
        raise ValueError(f"`x` may have at most 25 axes, got {x.ndim}")
    rank = _check_int("rank", rank, 1)
    iters = _check_int("iters", iters, 1)
    tol = -jnp.inf if tol is None else tol
    return _cp_als(key, x, jnp.asarray(tol, x.dtype), rank=rank, iters=iters)


@functools.partial(jax.jit, static_argnames=("rank", "iters"))
def _cp_als(key, x, tol, *, rank: int, iters: int) -> CP:
    order = x.ndim
    letters = "abcdefghijklmnopqstuvwxyz"[:order]
    keys = jax.random.split(key, order)
    factors = tuple(jax.random.normal(k, (size, rank), x.dtype) for k, size in zip(keys, x.shape))
    norm_x = jnp.linalg.norm(x)

    def sweep(factors):
        factors = list(factors)
        for n in range(order):
            others = [k for k in range(order) if k != n]
            gram = functools.reduce(operator.mul, [factors[k].T @ factors[k] for k in others])
            spec = letters + "," + ",".join(f"{letters[k]}r" for k in others) + f"->{letters[n]}r"
            mttkrp = jnp.einsum(spec, x, *[factors[k] for k in others], precision=HIGHEST)
            a = jnp.matmul(mttkrp, pinv(gram), precision=HIGHEST)
            weights, a = magnitude_direction(a, axis=0)
            factors[n] = a
        return tuple(factors), weights

    def rel_error(factors, weights):
        residual = jnp.linalg.norm(x - _cp_reconstruct(factors, weights))
        return jnp.where(norm_x > 0, residual / jnp.where(norm_x > 0, norm_x, 1.0), residual)

    def cond(state):
        t, _, _, _, _, decrease = state
        return (t < iters) & (decrease >= tol)

    def body(state):
        t, factors, _, errors, err, _ = state
        factors, weights = sweep(factors)
        new_err = rel_error(factors, weights)
        return t + 1, factors, weights, errors.at[t].set(new_err), new_err, err - new_err

    inf = jnp.asarray(jnp.inf, x.dtype)
    init = (jnp.int32(0), factors, jnp.ones(rank, x.dtype), jnp.full(iters, jnp.nan, x.dtype), inf, inf)
    t, factors, weights, errors, _, _ = lax.while_loop(cond, body, init)
    return CP(weights, factors, errors, t)


class Tucker(NamedTuple):
    """A Tucker decomposition ``x ~ core x_1 U_1 ... x_N U_N`` from :func:`tucker_hosvd` / :func:`tucker_hooi`."""

    core: jax.Array  # [r_1, ..., r_N]
    factors: tuple  # one [I_n, r_n] per mode, orthonormal columns


def _check_tucker_ranks(x, ranks) -> tuple[int, ...]:
    if x.ndim < 2 or 0 in x.shape:
        raise ValueError(f"`x` must be a non-empty tensor with at least 2 axes, got shape {x.shape}")
    ranks = tuple(ranks)
    if len(ranks) != x.ndim:
        raise ValueError(f"`ranks` needs one rank per axis of x {x.shape}, got {ranks}")
    return tuple(
        _check_int(f"ranks[{n}]", r, 1, size, f" (axis {n} of x has size {size})") for n, (r, size) in enumerate(zip(ranks, x.shape))
    )


def _tucker_core(x, factors):
    for n, u in enumerate(factors):
        x = _mode_dot(x, u.T, n)
    return x


def tucker_reconstruct(core, factors):
    r"""The tensor ``core \times_1 U_1 \cdots \times_N U_N`` (``U_n: [I_n, r_n]``), of shape ``[I_1, ..., I_N]``.

    Example:
      >>> import jax.numpy as jnp
      >>> tucker_reconstruct(jnp.ones((1, 1)), (jnp.ones((2, 1)), jnp.full((3, 1), 2.0))).tolist()
      [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]
    """
    core = _as_float(core)
    if len(factors) != core.ndim:
        raise ValueError(f"need one factor per axis of the core {core.shape}, got {len(factors)}")
    return _tucker_reconstruct(core, tuple(factors))


@jax.jit
def _tucker_reconstruct(core, factors):
    for n, u in enumerate(factors):
        core = _mode_dot(core, u, n)
    return core


def tucker_hosvd(x, ranks) -> Tucker:
    r"""Truncated higher-order SVD: ``U_n`` = the top-``r_n`` left singular vectors of the unfolding ``X_(n)``.

    .. math::
        U_n = \operatorname{svd}_{r_n}(X_{(n)}), \qquad G = x \times_1 U_1^T \cdots \times_N U_N^T,
        \qquad \|x - G \times_1 U_1 \cdots \times_N U_N\|_F^2 = \|x\|_F^2 - \|G\|_F^2
        \le \sum_n \sum_{i > r_n} \sigma_i(X_{(n)})^2

    Exact at full ranks; quasi-optimal (within ``sqrt(N)`` of the best
    multilinear rank-``(r_1..r_N)`` error), and the usual start for
    :func:`tucker_hooi`. ``1 <= r_n <= I_n``; when ``r_n`` exceeds the rank of
    ``X_(n)`` the extra columns are an orthonormal completion. Signs canonical.

    References:
      De Lathauwer, De Moor and Vandewalle, `A multilinear singular value
      decomposition <https://doi.org/10.1137/S0895479896305696>`_, 2000.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jax.random.normal(jax.random.key(0), (3, 4, 5))
      >>> core, factors = tucker_hosvd(x, (2, 2, 3))
      >>> core.shape, [u.shape for u in factors]
      ((2, 2, 3), [(3, 2), (4, 2), (5, 3)])
    """
    x = _as_float(x)
    return _tucker_hosvd(x, ranks=_check_tucker_ranks(x, ranks))


@functools.partial(jax.jit, static_argnames=("ranks",))
def _tucker_hosvd(x, *, ranks: tuple[int, ...]) -> Tucker:
    factors = tuple(_leading_left_vectors(_unfold(x, n), r) for n, r in enumerate(ranks))
    return Tucker(_tucker_core(x, factors), factors)


def tucker_hooi(x, ranks, *, iters: int = 20) -> Tucker:
    r"""Tucker approximation by higher-order orthogonal iteration, started from :func:`tucker_hosvd`.

    Each sweep updates every factor to the top-``r_n`` left singular vectors of
    the unfolding of ``x`` projected on the other factors,

    .. math::
        U_n \leftarrow \operatorname{svd}_{r_n}\big((x \times_{k \ne n} U_k^T)_{(n)}\big),

    the exact maximiser of ``||G||_F`` (so the minimiser of the error
    ``||x||^2 - ||G||^2``) over ``U_n`` with the others fixed: the error never
    increases and ends no worse than the HOSVD's. ``iters`` sweeps
    (``lax.fori_loop``, jitted internally with ``ranks`` static).

    References:
      De Lathauwer, De Moor and Vandewalle, `On the best rank-1 and
      rank-(R1, R2, ..., RN) approximation of higher-order tensors
      <https://doi.org/10.1137/S0895479898346995>`_, 2000.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jax.random.normal(jax.random.key(0), (4, 4, 4))
      >>> err = lambda t: float(jnp.linalg.norm(x - tucker_reconstruct(*t)))
      >>> err(tucker_hooi(x, (2, 2, 2), iters=5)) <= err(tucker_hosvd(x, (2, 2, 2))) + 1e-5
      True
    """
    x = _as_float(x)
    ranks = _check_tucker_ranks(x, ranks)
    iters = _check_int("iters", iters, 0)
    return _tucker_hooi(x, jnp.int32(iters), ranks=ranks)


@functools.partial(jax.jit, static_argnames=("ranks",))
def _tucker_hooi(x, iters, *, ranks: tuple[int, ...]) -> Tucker:
    def sweep(_, factors):
        factors = list(factors)
        for n in range(x.ndim):
            y = x
            for k in range(x.ndim):
                if k != n:
                    y = _mode_dot(y, factors[k].T, k)
            factors[n] = _leading_left_vectors(_unfold(y, n), ranks[n])
        return tuple(factors)

    factors = lax.fori_loop(0, iters, sweep, _tucker_hosvd(x, ranks=ranks).factors)
    return Tucker(_tucker_core(x, factors), factors)


# ---------------------------------------------------------------------------- Monarch


class Monarch(NamedTuple):
    """The factors of a Monarch matrix ``M = P L P^T R`` (see :func:`monarch_dense`), ``n = b s``."""

    left: jax.Array  # [..., s, b, b]: the s diagonal blocks of L
    right: jax.Array  # [..., b, s, s]: the b diagonal blocks of R


def _monarch_sizes(factors: Monarch) -> tuple[int, int]:
    s, b = factors.left.shape[-3:-1]
    if factors.left.shape[-3:] != (s, b, b) or factors.right.shape[-3:] != (b, s, s):
        raise ValueError(
            f"Monarch factors must be left [..., s, b, b] and right [..., b, s, s], "
            f"got {factors.left.shape} and {factors.right.shape}"
        )
    return b, s


def monarch_dense(factors: Monarch):
    r"""The dense ``[..., n, n]`` Monarch matrix ``M = P L P^T R`` of ``factors``, ``n = b s``.

    ``R = diag(R_1, ..., R_b)`` has ``b`` blocks ``[s, s]``, ``L = diag(L_1, ..., L_s)``
    has ``s`` blocks ``[b, b]``, and ``P`` is the stride permutation that reads a
    vector as an ``[s, b]`` array (C order) and returns its transpose flattened,
    so ``P^T`` reads ``[b, s]`` and transposes. Indexing rows by ``(i, u)`` and
    columns by ``(j, t)`` (``i, j < b``; ``u, t < s``; ``row = i s + u``,
    ``col = j s + t``):

    .. math::
        M_{(i, u), (j, t)} = (L_u)_{i j}\, (R_j)_{u t}

    For ``n = b^2`` (``s = b``) this is Dao et al's definition 3.1, with ``P = P^T``
    the transpose of a ``[sqrt(n), sqrt(n)]`` array. ``left = (L_u)_u``,
    ``right = (R_j)_j`` are the fly repository's ``w2_bfly`` and ``w1_bfly``
    (``blockdiag_butterfly_multiply``).

    References:
      Dao et al, `Monarch: expressive structured matrices for efficient and accurate
      training <https://arxiv.org/abs/2204.00595>`_, 2022.

    Example:
      >>> import jax.numpy as jnp
      >>> eye = Monarch(jnp.broadcast_to(jnp.eye(2), (3, 2, 2)), jnp.broadcast_to(jnp.eye(3), (2, 3, 3)))
      >>> bool((monarch_dense(eye) == jnp.eye(6)).all())
      True
    """
    _monarch_sizes(factors)
    return _monarch_dense(factors)


@jax.jit
def _monarch_dense(factors: Monarch):
    b, s = factors.right.shape[-3], factors.right.shape[-1]
    m4 = jnp.einsum("...uij,...jut->...iujt", factors.left, factors.right, precision=HIGHEST)
    return m4.reshape(*m4.shape[:-4], b * s, b * s)


def monarch_matmul(factors: Monarch, x):
    r"""``M x`` for the Monarch matrix of ``factors`` and ``x: [..., n]`` (each row a vector), in ``O(n (b + s))``.

    Equal to ``x @ monarch_dense(factors).T``: block-diagonal ``R``, the stride
    permutation, block-diagonal ``L``, the inverse permutation (see
    :func:`monarch_dense`). ``factors`` are unbatched here.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> f = Monarch(jax.random.normal(jax.random.key(0), (3, 2, 2)), jax.random.normal(jax.random.key(1), (2, 3, 3)))
      >>> x = jax.random.normal(jax.random.key(2), (4, 6))
      >>> bool(jnp.allclose(monarch_matmul(f, x), x @ monarch_dense(f).T, atol=1e-5))
      True
    """
    b, s = _monarch_sizes(factors)
    if factors.left.ndim != 3 or factors.right.ndim != 3:
        raise ValueError(f"monarch_matmul takes unbatched factors, got {factors.left.shape} and {factors.right.shape}")
    x = _as_float(x)
    if x.ndim < 1 or x.shape[-1] != b * s:
        raise ValueError(f"`x` must be [..., {b * s}], got shape {x.shape}")
    return _monarch_matmul(factors, x)


@jax.jit
def _monarch_matmul(factors: Monarch, x):
    b, s = factors.right.shape[-3], factors.right.shape[-1]
    y = jnp.einsum("jut,...jt->...ju", factors.right, x.reshape(*x.shape[:-1], b, s), precision=HIGHEST)
    z = jnp.einsum("uij,...ju->...iu", factors.left, y, precision=HIGHEST)
    return z.reshape(x.shape)


def monarch_project(w, nblocks: int) -> Monarch:
    r"""The Monarch matrix nearest to ``w: [..., n, n]`` in Frobenius norm, with ``b = nblocks`` blocks in ``R``.

    By :func:`monarch_dense`, each sub-matrix ``w[(:, u), (j, :)]: [b, s]`` (fixed
    ``u < s``, ``j < b``) equals the rank-1 ``(L_u)_{:, j} (R_j)_{u, :}`` and every
    entry of ``w`` lies in exactly one of these ``n`` sub-matrices, so the
    projection splits into ``n`` independent best rank-1 approximations
    (Eckart-Young), solved by SVD:

    .. math::
        (L_u)_{:, j} = \sqrt{\sigma_1}\, u_1, \qquad (R_j)_{u, :} = \sqrt{\sigma_1}\, v_1^T
        \quad\text{of}\quad w_{(\cdot, u), (j, \cdot)} = \textstyle\sum_k \sigma_k u_k v_k^T

    with the singular value split evenly and canonical signs, so the result is
    deterministic; the error is ``sqrt(sum over sub-matrices of sum_{k>1} sigma_k^2)``.
    ``nblocks`` must divide ``n`` (``nblocks = sqrt(n)`` is the paper's square case).
    The minimiser is unique up to the scale shared by ``L`` and ``R`` whenever each
    sub-matrix has ``sigma_1 > sigma_2``.

    References:
      Dao et al, `Monarch: expressive structured matrices for efficient and accurate
      training <https://arxiv.org/abs/2204.00595>`_, 2022 (section 3.3, theorem 1).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> f = Monarch(jax.random.normal(jax.random.key(0), (2, 2, 2)), jax.random.normal(jax.random.key(1), (2, 2, 2)))
      >>> bool(jnp.allclose(monarch_dense(monarch_project(monarch_dense(f), 2)), monarch_dense(f), atol=1e-5))
      True
    """
    w = _as_matrix("w", w)
    n = w.shape[-1]
    if w.shape[-2] != n:
        raise ValueError(f"`w` must be square [..., n, n], got shape {w.shape}")
    b = _check_int("nblocks", nblocks, 1, n, f" (n = {n})")
    if n % b:
        raise ValueError(f"`nblocks` must divide n = {n}, got {nblocks}")
    return _monarch_project(w, nblocks=b)


@functools.partial(jax.jit, static_argnames=("nblocks",))
def _monarch_project(w, *, nblocks: int) -> Monarch:
    b = nblocks
    s = w.shape[-1] // b
    w4 = w.reshape(*w.shape[:-2], b, s, b, s)  # [..., i, u, j, t]
    blocks = jnp.einsum("...iujt->...ujit", w4)  # [..., u, j, b, s]
    u, sv, vh = reduced_svd(blocks)
    u, vh = canonical_signs(u[..., :1], vh[..., :1, :], by="u")
    root = jnp.sqrt(sv[..., :1])
    left = u[..., 0] * root  # [..., u, j, i]
    right = vh[..., 0, :] * root  # [..., u, j, t]
    return Monarch(jnp.swapaxes(left, -1, -2), jnp.swapaxes(right, -3, -2))
