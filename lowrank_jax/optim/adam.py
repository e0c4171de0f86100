r"""The Adam of transformers' legacy ``AdamW`` ("adamw_hf"), which galore-torch and peft's LoRA-FA use.

galore-torch's ``GaLoreAdamW`` and peft's ``LoraFAOptimizer`` are copies of the
``AdamW`` that ``transformers.optimization`` shipped before it was deprecated.
It differs from :func:`optax.adamw` (and ``torch.optim.AdamW``) in two places:

* ``eps`` is added to the *uncorrected* ``sqrt(v)`` and the bias corrections are
  folded into the step size, with ``eps = 1e-6`` by default:

  .. math::
      m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
      v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \quad
      d_t = \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t} \, \frac{m_t}{\sqrt{v_t} + \epsilon};

* decoupled weight decay is applied to the parameter *after* the step:
  ``p <- p - lr d``, then ``p <- p - lr wd p``, that is
  ``p_{t+1} = (p_t - lr d_t)(1 - lr wd)``, where optax (and torch) decay first,
  ``p_{t+1} = p_t (1 - lr wd) - lr d_t``. The two differ by ``lr^2 wd d_t``.

:func:`scale_by_adam_hf` is the first, :func:`add_decayed_weights_after_step`
the second and :func:`adamw_hf` chains them with the learning rate.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.optim import _blockwise8 as q8
from lowrank_jax.optim import _common

__all__ = [
    "ScaleByAdamHFState",
    "DecayAfterStepState",
    "scale_by_adam_hf",
    "add_decayed_weights_after_step",
    "adamw_hf",
]


class ScaleByAdamHFState(NamedTuple):
    """State of :func:`scale_by_adam_hf`.

    count: ``[]`` int32, updates applied so far (``t - 1`` during the t-th update).
    mu: first moments, a tree like the updates: arrays of ``mu_dtype`` (default:
      the update's dtype), or :class:`QuantizedMoment` (uint8 ``[n_blocks, block]``
      codes + float32 ``[n_blocks]`` maxima) with ``eight_bit=True``.
    nu: second moments (not bias-corrected), like ``mu`` (the update's dtype).
    """

    count: jax.Array
    mu: Any
    nu: Any


def scale_by_adam_hf(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    *,
    mu_dtype: Any = None,
    eight_bit: bool = False,
    block_size: int = 256,
    min_8bit_size: int = 4096,
) -> optax.GradientTransformation:
    r"""Rescales updates by transformers' legacy AdamW rule (galore-torch, peft LoRA-FA).

    .. math::
        d_t = \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t} \, \frac{m_t}{\sqrt{v_t} + \epsilon}

    (see the module docstring for how this differs from :func:`optax.scale_by_adam`).
    Moments are updated in float32 and stored in their dtype; the output has the
    update's dtype. Non-finite gradients propagate into the moments and the output
    (wrap the optimizer in :func:`optax.apply_if_finite` to skip such steps).

    With ``eight_bit=True`` every moment tensor with at least ``min_8bit_size``
    entries is stored blockwise-quantised in 8 bits, as 8-bit Adam and 8-bit GaLore
    do (dynamic code book, ``block_size`` values per float32 maximum; signed for
    ``m``, unsigned for ``v``; bitsandbytes' defaults are 256 and 4096): each
    update dequantises, applies the rule above in float32 and re-quantises. Smaller
    tensors keep full-precision moments, as in bitsandbytes.

    Args:
      b1, b2: exponential decay rates of the moments.
      eps: added to ``sqrt(v_t)``; the reference default is ``1e-6``.
      mu_dtype: dtype of the first moment (default: the update's dtype).
      eight_bit: store large moments in 8 bits.
      block_size, min_8bit_size: the 8-bit layout.

    Returns:
      An :class:`optax.GradientTransformation`.

    Example:
      >>> import jax.numpy as jnp, optax, lowrank_jax as lrj
      >>> tx = lrj.optim.scale_by_adam_hf()
      >>> g = {"w": jnp.array([0.5, -2.0])}
      >>> d, _ = tx.update(g, tx.init(g))
      >>> d["w"]  # at t = 1: g / (|g| + eps / sqrt(1 - b2)), about sign(g)
      Array([ 0.99993  , -0.9999775], dtype=float32)
    """
    _common.check_beta("b1", b1)
    _common.check_beta("b2", b2)
    _common.check_nonnegative("eps", eps)
    block_size = _common.check_positive_int("block_size", block_size)
    min_8bit_size = _common.check_positive_int("min_8bit_size", min_8bit_size)

    def quantized(x) -> bool:
        return eight_bit and x.size >= min_8bit_size

    def init_fn(params):
        def mu0(p):
            return q8.zeros(p.shape, block_size) if quantized(p) else jnp.zeros_like(p, dtype=mu_dtype or p.dtype)

        def nu0(p):
            return q8.zeros(p.shape, block_size) if quantized(p) else jnp.zeros_like(p)

        return ScaleByAdamHFState(jnp.zeros([], jnp.int32), jax.tree.map(mu0, params), jax.tree.map(nu0, params))

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        step = jnp.sqrt(1.0 - jnp.asarray(b2, jnp.float32) ** t) / (1.0 - jnp.asarray(b1, jnp.float32) ** t)
        is_q = lambda x: isinstance(x, q8.QuantizedMoment)  # noqa: E731

        def one(g, m, v):
            g32 = g.astype(jnp.float32)
            m32 = q8.dequantize(m, g.shape, signed=True) if is_q(m) else m.astype(jnp.float32)
            v32 = q8.dequantize(v, g.shape, signed=False) if is_q(v) else v.astype(jnp.float32)
            m32 = b1 * m32 + (1.0 - b1) * g32
            v32 = b2 * v32 + (1.0 - b2) * g32 * g32
            d = step * m32 / (jnp.sqrt(v32) + eps)
            m_new = q8.quantize(m32, signed=True, block_size=block_size) if is_q(m) else _common.reshard_like(
                m32.astype(m.dtype), m)
            v_new = q8.quantize(v32, signed=False, block_size=block_size) if is_q(v) else _common.reshard_like(
                v32.astype(v.dtype), v)
            return _common.reshard_like(d.astype(g.dtype), g), m_new, v_new

        out = jax.tree.map(one, updates, state.mu, state.nu, is_leaf=is_q)
        treedef = jax.tree.structure(updates)
        flat = treedef.flatten_up_to(out)
        d, mu, nu = (treedef.unflatten([f[i] for f in flat]) for i in range(3))
        return d, ScaleByAdamHFState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


class DecayAfterStepState(NamedTuple):
    """State of :func:`add_decayed_weights_after_step`: ``count``, ``[]`` int32, for the schedule."""

    count: jax.Array


def add_decayed_weights_after_step(
    weight_decay: float | jax.Array = 0.0,
    learning_rate: _common.ScalarOrSchedule = 1.0,
    mask: Any = None,
) -> optax.GradientTransformation:
    r"""Decoupled weight decay applied after the step, as transformers' legacy AdamW does.

    Given the full step ``u_t`` (learning rate already applied), returns

    .. math::
        u'_t = u_t - \eta_t \lambda \, (p_t + u_t), \qquad
        \text{so} \quad p_{t+1} = (p_t + u_t)(1 - \eta_t \lambda),

    where :func:`optax.add_decayed_weights` (before the learning rate) gives
    ``p_{t+1} = p_t (1 - eta_t lambda) + u_t``. Put it last in a chain.

    Args:
      weight_decay: ``lambda``.
      learning_rate: ``eta_t``, a number or a schedule of the update count.
      mask: a tree (or a callable of the params returning one) of booleans: where
        to decay (default: every leaf).

    Returns:
      An :class:`optax.GradientTransformation` that needs ``params`` in ``update``.
    """
    _common.check_nonnegative("weight_decay", weight_decay)

    def init_fn(params):
        del params
        return DecayAfterStepState(jnp.zeros([], jnp.int32))

    no_decay = isinstance(weight_decay, (int, float)) and weight_decay == 0

    def update_fn(updates, state, params=None):
        count = optax.safe_increment(state.count)
        if no_decay:
            return updates, DecayAfterStepState(count)
        if params is None:
            raise ValueError("add_decayed_weights_after_step needs `params` in `update(updates, state, params)`")
        rate = _common.value_at(learning_rate, state.count) * weight_decay

        def decay(u, p):
            u32 = u.astype(jnp.float32)
            return (u32 - rate * (p.astype(jnp.float32) + u32)).astype(u.dtype)

        return jax.tree.map(decay, updates, params), DecayAfterStepState(count)

    tx = optax.GradientTransformation(init_fn, update_fn)
    return optax.masked(tx, mask) if mask is not None else tx


def adamw_hf(
    learning_rate: _common.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    mask: Any = None,
    *,
    mu_dtype: Any = None,
    eight_bit: bool = False,
) -> optax.GradientTransformation:
    r"""transformers' legacy ``AdamW`` ("adamw_hf") as an optax chain.

    ``chain(scale_by_adam_hf(b1, b2, eps), scale_by_learning_rate(lr),
    add_decayed_weights_after_step(weight_decay, lr, mask))``: the update of
    galore-torch's ``GaLoreAdamW`` for parameters outside the GaLore group, and of
    peft's ``LoraFAOptimizer`` for parameters that are not LoRA factors.

    Example:
      >>> import jax.numpy as jnp, optax, lowrank_jax as lrj
      >>> tx = lrj.optim.adamw_hf(0.1, weight_decay=0.5)
      >>> p = {"w": jnp.array([1.0, -1.0])}
      >>> u, _ = tx.update({"w": jnp.array([3.0, -3.0])}, tx.init(p), p)
      >>> [round(float(x), 4) for x in optax.apply_updates(p, u)["w"]]  # (1 - 0.1 * 1) * (1 - 0.1 * 0.5)
      [0.855, -0.855]

    References:
      Loshchilov and Hutter, `Decoupled Weight Decay Regularization
      <https://arxiv.org/abs/1711.05101>`_, 2019. Reference implementation matched:
      ``transformers.optimization.AdamW`` (removed in transformers 4.x; copied as
      galore-torch's ``GaLoreAdamW`` and peft's ``LoraFAOptimizer``).
    """
    _common.check_learning_rate(learning_rate)
    return optax.chain(
        scale_by_adam_hf(b1, b2, eps, mu_dtype=mu_dtype, eight_bit=eight_bit),
        optax.scale_by_learning_rate(learning_rate),
        add_decayed_weights_after_step(weight_decay, learning_rate, mask),
    )
