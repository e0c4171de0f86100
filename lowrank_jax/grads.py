r"""Analytic gradient formulas of the low-rank methods, as plain functions (the research reference).

Everything is in Flax orientation: ``W: [in, out]``, ``y = x W``, ``A: [in, r]``,
``B: [r, out]``, and ``G = dL/dW = x^T (dL/dy)`` is the gradient a full
fine-tuning step would compute. Each function is checked against ``jax.grad``
in ``tests/test_grads.py``.

LoRA (Hu et al, `LoRA <https://arxiv.org/abs/2106.09685>`_, 2021), with
``W' = W + s A B``:

.. math::
    \frac{\partial L}{\partial A} = s\, G B^T, \qquad \frac{\partial L}{\partial B} = s\, A^T G

and, never forming ``G`` (what factored execution computes), with ``g = dL/dy``:
``dA = s x^T (g B^T)``, ``dB = s (x A)^T g``.

DoRA (Liu et al, `DoRA <https://arxiv.org/abs/2402.09353>`_, 2024), with
``W' = m \odot V / \|V\|_c`` column-wise (``\|V\|_c`` the norm of each output
column over the input axis) and ``G' = dL/dW'``:

.. math::
    \frac{\partial L}{\partial m} = \frac{\langle G', V \rangle_c}{\|V\|_c}, \qquad
    \frac{\partial L}{\partial V} = \frac{m}{\|V\|_c}\Big(G' - \frac{\langle G', V\rangle_c}{\|V\|_c^2} V\Big)

(the second is the paper's ``(m/||V'||)(I - V'V'^T/||V'||^2) dL/dW'`` written per
column); with the norm detached (the paper's section 4.3, peft's default) the
projection term disappears: ``dL/dV = (m / ||V||_c) G'``.

GaLore (Zhao et al, `GaLore <https://arxiv.org/abs/2403.03507>`_, 2024) on a
gradient matrix ``G: [m, n]`` as galore-torch sees it (torch orientation, a Flax
kernel's transpose), with ``U \Sigma V^T = svd(G_{t_0})`` at the last refresh:

.. math::
    R = \begin{cases} G V_r & m \ge n \text{ (std: right)} \\ U_r^\top G & m < n \text{ (std: left)} \end{cases},
    \qquad \Delta W = \alpha \cdot \mathrm{back}(\rho(R)),
    \quad \mathrm{back}(N) = N V_r^\top \text{ or } U_r N

where ``rho`` is the optimizer run on ``R`` (Adam in the paper) and ``alpha`` the scale.
At a refresh with ``rho = id``, ``back(R)`` is ``G``'s best rank-``r`` approximation
(Eckart-Young).

LoRA-Pro (Wang et al, `LoRA-Pro <https://arxiv.org/abs/2407.18242>`_, 2024), in
torch orientation ``W' = W + s B A`` with LoRA gradients ``g^A = s B^T G``,
``g^B = s G A^T``: the equivalent gradient ``\tilde g = s (B g^{A'} + g^{B'} A)``
closest to ``G`` is reached by

.. math::
    g^{A'} = \tfrac{1}{s^2} (B^\top B)^{-1} g^A + X A, \qquad
    g^{B'} = \tfrac{1}{s^2} \big[I - B (B^\top B)^{-1} B^\top\big] g^B (A A^\top)^{-1} - B X,

    (B^\top B) X + X (A A^\top) = -\tfrac{1}{s^2} (B^\top B)^{-1} g^A A^\top

(the Sylvester equation picks, among the minimisers, the one closest to the LoRA
gradients); then ``\tilde g = P_B G + G P_A - P_B G P_A``, the orthogonal projection
of ``G`` onto the tangent space ``{B Y + X A}`` (``P_B``, ``P_A`` the projectors on
``B``'s columns and ``A``'s rows).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import lax

__all__ = [
    "GaLoreProjection",
    "dora_grads",
    "galore_project",
    "galore_project_back",
    "galore_projection",
    "galore_update",
    "lora_grads",
    "lora_grads_from_activations",
    "lora_pro_equivalent_gradient",
    "lora_pro_grads",
]

_HI = lax.Precision.HIGHEST


def lora_grads(G, a, b, scale: float):
    """``(dL/dA, dL/dB) = (s G B^T, s A^T G)`` from the full weight gradient ``G: [in, out]``."""
    return scale * G @ b.T, scale * a.T @ G


def lora_grads_from_activations(x, g, a, b, scale: float):
    """``(dL/dA, dL/dB)`` from the layer input ``x: [n, in]`` and output gradient ``g: [n, out]``,
    in ``O(n r (in + out))``: ``dA = s x^T (g B^T)``, ``dB = s (x A)^T g``. Equal to
    :func:`lora_grads` with ``G = x^T g``, which is never formed."""
    return scale * x.T @ (g @ b.T), scale * (x @ a).T @ g


def dora_grads(G_prime, m, V, *, detach_norm: bool = False):
    """``(dL/dm, dL/dV)`` of ``W' = m V / ||V||_c`` from ``G' = dL/dW'`` (all ``[in, out]``, ``m: [out]``)."""
    norm = jnp.linalg.norm(V, axis=0)
    inner = jnp.sum(G_prime * V, axis=0)
    dm = inner / norm
    if detach_norm:
        return dm, (m / norm) * G_prime
    return dm, (m / norm) * (G_prime - (inner / norm**2) * V)


class GaLoreProjection(NamedTuple):
    """GaLore's projector of one matrix: ``side`` ("left", "right" or "full") and the kept singular vectors
    (``u: [m, r]`` for left/full, ``vh: [r, n]`` for right/full, ``None`` otherwise)."""

    side: str
    u: Any
    vh: Any


def galore_projection(G, rank: int, proj_type: str = "std") -> GaLoreProjection:
    """GaLore's projector from the float32 SVD of ``G: [m, n]`` (galore-torch's ``GaLoreProjector``).

    ``proj_type``: ``"std"`` (right when ``m >= n``, else left), ``"reverse_std"`` (the
    opposite), ``"left"``, ``"right"``, ``"full"``; the rank is ``min(rank, m, n)``.
    Signs are canonical (the kept vector's largest-magnitude entry positive), as in
    :func:`lrj.optim.scale_by_galore`.
    """
    from lowrank_jax import linalg

    m, n = G.shape
    sides = {"std": "right" if m >= n else "left", "reverse_std": "left" if m >= n else "right"}
    side = sides.get(proj_type, proj_type)
    if side not in ("left", "right", "full"):
        raise ValueError(f"`proj_type` must be one of ('std', 'reverse_std', 'left', 'right', 'full'), got {proj_type!r}")
    k = min(rank, m, n)
    u, _, vh = jnp.linalg.svd(G.astype(jnp.float32), full_matrices=False)
    u, vh = linalg.canonical_signs(u[:, :k], vh[:k], by="vh" if side == "right" else "u")
    return GaLoreProjection(side, u if side != "right" else None, vh if side != "left" else None)


def galore_project(G, proj: GaLoreProjection):
    """``R = G V_r`` (right), ``U_r^T G`` (left) or ``U_r^T G V_r`` (full)."""
    if proj.side == "right":
        return jnp.matmul(G, proj.vh.T, precision=_HI)
    r = jnp.matmul(proj.u.T, G, precision=_HI)
    return r if proj.side == "left" else jnp.matmul(r, proj.vh.T, precision=_HI)


def galore_project_back(N, proj: GaLoreProjection):
    """``N V_r^T`` (right), ``U_r N`` (left) or ``U_r N V_r^T`` (full): the transpose of :func:`galore_project`."""
    if proj.side == "right":
        return jnp.matmul(N, proj.vh, precision=_HI)
    back = jnp.matmul(proj.u, N, precision=_HI)
    return back if proj.side == "left" else jnp.matmul(back, proj.vh, precision=_HI)


def galore_update(G, proj: GaLoreProjection, *, scale: float = 0.25, inner: Callable = lambda R: R):
    """GaLore's update direction ``scale * back(inner(project(G)))`` (before the learning rate and sign).

    ``inner`` maps the projected gradient to the optimizer's direction (identity: projected
    SGD; Adam's ``m_hat / (sqrt(v_hat) + eps)`` in the paper).
    """
    return scale * galore_project_back(inner(galore_project(G, proj)), proj)


def _pinv_ridge(m, delta: float):
    return jnp.linalg.pinv(m + delta * jnp.eye(m.shape[-1], dtype=m.dtype))


def lora_pro_grads(G, a, b, scale: float, *, delta: float = 1e-8):
    r"""LoRA-Pro's equivalent gradients ``(g_a', g_b')`` from the full gradient ``G = dL/dW: [in, out]``.

    Flax orientation (``W' = W + s a b``, ``a: [in, r]``, ``b: [r, out]``; torch ``A = a^T``,
    ``B = b^T``): with ``P = b b^T``, ``Q = a^T a``, ``g_a = s G b^T``, ``g_b = s a^T G``,

    .. math::
        g_a' = \tfrac{1}{s^2} g_a P^{+} + a X^\top, \qquad
        g_b' = \tfrac{1}{s^2} Q^{+} g_b (I - b^\top P^{+} b) - X^\top b, \qquad
        P X + X Q = -\tfrac{1}{s^2} P^{+} g_a^\top a

    with ``M^+ = pinv(M + delta I)``. The Sylvester equation is solved here as the
    ``r^2 x r^2`` linear system ``(I (x) P + Q^T (x) I) vec X = vec C`` (a direct
    formulation, independent of :func:`lrj.optim.lora_pro_gradients`, which
    diagonalises ``P`` and ``Q`` and never needs ``G``).
    """
    G, a, b = (jnp.asarray(x, jnp.float32) for x in (G, a, b))
    s = float(scale)
    r = a.shape[-1]
    ga, gb = lora_grads(G, a, b, s)
    p, q = b @ b.T, a.T @ a
    p_inv, q_inv = _pinv_ridge(p, delta), _pinv_ridge(q, delta)
    c = -(p_inv @ ga.T @ a) / s**2
    eye = jnp.eye(r, dtype=jnp.float32)
    system = jnp.kron(eye, p) + jnp.kron(q.T, eye)  # column-major vec: vec(P X + X Q)
    x = jnp.linalg.lstsq(system, c.T.reshape(-1))[0].reshape(r, r).T
    ga_new = ga @ p_inv / s**2 + a @ x.T
    gb_new = q_inv @ gb @ (jnp.eye(b.shape[-1], dtype=jnp.float32) - b.T @ p_inv @ b) / s**2 - x.T @ b
    return ga_new, gb_new


def lora_pro_equivalent_gradient(G, a, b, scale: float, *, delta: float = 1e-8):
    r"""``\tilde G = s (g_a' b + a g_b')``: the full-weight change direction a LoRA-Pro step follows.

    For full-rank ``a``, ``b`` it is the orthogonal projection of ``G`` onto the tangent
    space ``{X b + a Y}`` of the rank-``r`` manifold, ``G P_b + P_a G - P_a G P_b`` with
    ``P_a = a (a^T a)^{-1} a^T``, ``P_b = b^T (b b^T)^{-1} b``.
    """
    ga_new, gb_new = lora_pro_grads(G, a, b, scale, delta=delta)
    return scale * (ga_new @ jnp.asarray(b, jnp.float32) + jnp.asarray(a, jnp.float32) @ gb_new)
