r"""LoRA-Pro: equivalent gradients that make the LoRA step the best low-rank approximation of full fine-tuning.

A LoRA step changes the weight by ``s (dB A + B dA)`` (torch orientation). With
``g^A = s B^T G`` and ``g^B = s G A^T`` the LoRA gradients of the full gradient
``G = dL/dW``, LoRA-Pro replaces them by ``(g^A', g^B')`` minimising
``|| s (B g^A' + g^B' A) - G ||_F`` and, among the minimisers, closest to
``(g^A, g^B)``:

.. math::
    g^{A\prime} = \frac{1}{s^2} (B^\top B)^{-1} g^A + X A, \qquad
    g^{B\prime} = \frac{1}{s^2} \big[I - B (B^\top B)^{-1} B^\top\big] g^B (A A^\top)^{-1} - B X,

    (B^\top B) X + X (A A^\top) = -\frac{1}{s^2} (B^\top B)^{-1} g^A A^\top,

with inverses computed as ``pinv(M + delta I)``. Everything depends on ``G`` only
through ``g^A`` and ``g^B`` (``P_B G = B (B^T B)^{-1} g^A / s`` and
``G P_A = g^B (A A^T)^{-1} A / s``), so **no full weight gradient is needed**:
the transform maps the ordinary LoRA gradients and keeps the factored execution of
:func:`lrj.make_train_step`. Only ``r x r`` matrices are inverted.

Reference: Wang et al, `LoRA-Pro: Are Low-Rank Adapters Properly Optimized?
<https://arxiv.org/abs/2407.18242>`_, 2024 (ICLR 2025). Reference implementation
followed: the official repository's ``peta/optim_efficient_adamw_only.py``
(``LoRAProAdamW``: equivalent gradients, then AdamW on the factors). Its other
variant keeps Adam moments of the full ``[out, in]`` equivalent gradient and is
not implemented here. Tested by the defining property against an independent
least-squares solve, not against recorded values.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

from lowrank_jax.optim import _common, _linalg

__all__ = ["lora_pro_gradients", "scale_by_lora_pro", "lora_pro", "X_MODES"]

X_MODES = ("sylvester", "symmetry", "zero")
_HI = _linalg.HIGHEST


def _mm(spec, *xs):
    return jnp.einsum(spec, *xs, precision=_HI)


def lora_pro_gradients(a, b, ga, gb, scale: float, *, x_mode: str = "sylvester", delta: float = 1e-8):
    r"""LoRA-Pro's equivalent gradients in Flax orientation, from the LoRA gradients alone.

    With ``a: [..., in, r]``, ``b: [..., r, out]`` (``W' = W + s a b``; peft/torch:
    ``A = a^T``, ``B = b^T``) and their gradients ``ga``, ``gb``, writing
    ``P = b b^T`` (torch ``B^T B``) and ``Q = a^T a`` (torch ``A A^T``):

    .. math::
        g_a' = \tfrac{1}{s^2}\, g_a P^{+} + a X^\top, \qquad
        g_b' = \tfrac{1}{s^2}\, Q^{+} \big(g_b - (g_b b^\top) P^{+} b\big) - X^\top b,

    where ``P^+ = pinv(P + delta I)``, ``Q^+ = pinv(Q + delta I)`` and, for
    ``x_mode="sylvester"``, ``P X + X Q = -(1/s^2) P^+ g_a^\top a`` (solved with
    :func:`solve_sylvester_sym`); ``"symmetry"``: ``X = -(1/(2 s^2)) P^+ b g_b^\top Q``;
    ``"zero"``: ``X = 0`` (the reference's three modes). Then
    ``s (g_a' b + a g_b')`` is the orthogonal projection of the full gradient ``G``
    onto ``{X b + a Y}`` whenever ``a`` and ``b`` have full rank ``r``.
    Computed in float32; returns ``ga``'s and ``gb``'s dtypes.

    Example:
      >>> import jax, jax.numpy as jnp, lowrank_jax as lrj
      >>> ka, kb, kg = jax.random.split(jax.random.key(0), 3)
      >>> a, b = jax.random.normal(ka, (6, 2)), jax.random.normal(kb, (2, 5))
      >>> G = jax.random.normal(kg, (6, 5))          # dL/dW, Flax orientation [in, out]
      >>> s = 2.0
      >>> ga, gb = s * G @ b.T, s * a.T @ G          # what jax.grad gives for W + s a b
      >>> ga2, gb2 = lrj.optim.lora_pro_gradients(a, b, ga, gb, s)
      >>> approx = s * (ga2 @ b + a @ gb2)           # the best approximation of G in the tangent space
      >>> bool(jnp.allclose(approx.T @ a, G.T @ a, atol=1e-4))  # the residual is orthogonal to it
      True
    """
    if x_mode not in X_MODES:
        raise ValueError(f"`x_mode` must be one of {X_MODES}, got {x_mode!r}")
    s2 = float(scale) ** 2
    f32 = lambda x: _common.replicated(x.astype(jnp.float32))  # noqa: E731
    a32, b32, ga32, gb32 = f32(a), f32(b), ga.astype(jnp.float32), gb.astype(jnp.float32)
    p = _mm("...ro,...so->...rs", b32, b32)  # b b^T  (torch B^T B)
    q = _mm("...ir,...is->...rs", a32, a32)  # a^T a  (torch A A^T)
    p_inv = _linalg.pinv_psd(p, delta)
    q_inv = _linalg.pinv_psd(q, delta)
    if x_mode == "sylvester":
        c = -_mm("...rs,...is,...iu->...ru", p_inv, ga32, a32) / s2  # -(1/s^2) P^+ (ga^T a)
        x = _linalg.solve_sylvester_sym(p, q, c)
    elif x_mode == "symmetry":
        x = -0.5 / s2 * _mm("...rs,...so,...to,...tu->...ru", p_inv, b32, gb32, q)  # -(1/2s^2) P^+ (b gb^T) Q
    else:
        x = jnp.zeros_like(p)
    new_a = _mm("...ir,...rs->...is", ga32, p_inv) / s2 + _mm("...ir,...sr->...is", a32, x)
    gbbt = _mm("...ro,...so->...rs", gb32, b32)  # gb b^T
    resid = gb32 - _mm("...rs,...st,...to->...ro", gbbt, p_inv, b32)
    new_b = _mm("...rs,...so->...ro", q_inv, resid) / s2 - _mm("...sr,...so->...ro", x, b32)
    return (_common.reshard_like(new_a.astype(ga.dtype), ga), _common.reshard_like(new_b.astype(gb.dtype), gb))


def scale_by_lora_pro(
    scale: Any, *, x_mode: str = "sylvester", delta: float = 1e-8, layouts: Any = None
) -> optax.GradientTransformation:
    r"""Replaces the gradients of every LoRA target's ``a``/``b`` by LoRA-Pro's equivalent gradients.

    See :func:`lora_pro_gradients` for the formula. Every mapping in the update tree
    holding both ``a`` and ``b`` is a target (given an adapter as ``scale``, the leaves
    its roles declare ``("stack", "in", "rank")`` and ``("stack", "rank", "out")``;
    other leaves pass through); N-D factors
    ``a: [*stack, *inputs, r]``, ``b: [*stack, r, *outputs]`` are flattened to
    ``[*stack, in, r]``/``[*stack, r, out]`` and handled per stacked slice. Needs
    the current factors: ``update(grads, state, params)``. Stateless.

    Args:
      scale: the LoRA scaling ``s``: a number, the :class:`lrj.Adapter` that made the
        factors, or ``path -> s``.
      x_mode: ``"sylvester"`` (the paper's optimum), ``"symmetry"`` or ``"zero"``.
      delta: the ridge in ``pinv(M + delta I)`` (reference: 1e-8).
      layouts: ``{path regex: lrj.Layout}`` or ``path -> Layout`` if stacked axes are ambiguous.
    """
    if x_mode not in X_MODES:
        raise ValueError(f"`x_mode` must be one of {X_MODES}, got {x_mode!r}")
    _common.check_nonnegative("delta", delta)
    scale_of = _common.lora_scale_fn(scale)
    adapter = _common.adapter_of(scale)
    a_name, b_name = _common.lora_factor_names(adapter)

    def init_fn(params):
        if not _common.lora_pair_paths(params, adapter=adapter):
            raise _common.no_factors_error("LoRA-Pro", adapter)
        return optax.EmptyState()

    def one(path, g, p):
        a, b = p[a_name], p[b_name]
        stack = _common.lora_stack(path, a.shape, b.shape, layouts, adapter)
        r = a.shape[-1]
        lead = a.shape[:stack]
        flat = lambda x, first: x.reshape(*lead, -1, r) if first else x.reshape(*lead, r, -1)  # noqa: E731
        ga, gb = lora_pro_gradients(flat(a, True), flat(b, False), flat(g[a_name], True), flat(g[b_name], False),
                                    scale_of(path, a), x_mode=x_mode, delta=delta)
        return {a_name: _common.reshard_like(ga.reshape(g[a_name].shape), g[a_name]),
                b_name: _common.reshard_like(gb.reshape(g[b_name].shape), g[b_name])}

    def update_fn(updates, state, params=None):
        new, _ = _common.map_lora_pairs(one, updates, params, adapter=adapter)
        return new, state

    return optax.GradientTransformation(init_fn, update_fn)


def lora_pro(
    learning_rate: _common.ScalarOrSchedule,
    scale: Any,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Any = None,
    x_mode: str = "sylvester",
    delta: float = 1e-8,
    layouts: Any = None,
) -> optax.GradientTransformation:
    r"""LoRA-Pro with AdamW on the factors: ``chain(scale_by_lora_pro(scale), optax.adamw(...))``.

    As the reference ``LoRAProAdamW`` (efficient variant): the equivalent gradients
    ``(g_a', g_b')`` of :func:`lora_pro_gradients` feed a standard AdamW
    (``torch.optim.AdamW`` = :func:`optax.adamw`: decay before the step, ``eps``
    1e-8), with moments of the factors' shapes. Leaves outside LoRA targets get the
    same AdamW on their raw gradients.

    Args:
      learning_rate: number or schedule.
      scale: the LoRA scaling ``s`` (number, :class:`lrj.Adapter`, or ``path -> s``).
      b1, b2, eps, weight_decay, mask: :func:`optax.adamw`'s.
      x_mode, delta, layouts: see :func:`scale_by_lora_pro`.

    Returns:
      An :class:`optax.GradientTransformation` whose ``update`` needs ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lowrank_jax as lrj
      >>> lp = {"q": {"kernel": {"a": jnp.eye(4, 2), "b": jnp.ones((2, 3))}}}
      >>> tx = lrj.optim.lora_pro(1e-2, scale=2.0)
      >>> grads = jax.tree.map(jnp.ones_like, lp)
      >>> updates, _ = jax.jit(tx.update)(grads, tx.init(lp), lp)
      >>> jax.tree.map(jnp.shape, updates)
      {'q': {'kernel': {'a': (4, 2), 'b': (2, 3)}}}

    References:
      Wang et al, `LoRA-Pro: Are Low-Rank Adapters Properly Optimized?
      <https://arxiv.org/abs/2407.18242>`_, 2024.
    """
    _common.check_learning_rate(learning_rate)
    return optax.chain(
        scale_by_lora_pro(scale, x_mode=x_mode, delta=delta, layouts=layouts),
        optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask),
    )
