r"""LaMDA's gradual freezing of ``b``'s rank components, as an optax wrapper (jit-able, no Python branch on the step).

Reference: Azizi et al, `LaMDA <https://arxiv.org/abs/2406.12832>`_, 2024; official code
https://github.com/ArminAzizi98/LaMDA, ``custom_trainer.py`` (``gradual_freeze_B``, called after
every backward, before clipping and ``optimizer.step()``)::

    t = int(total_iters / (eta * max_steps * gradient_accumulation_steps))   # total_iters: 1-based micro-batches
    if t >= rank: lora_B.weight.requires_grad = False
    else:         lora_B.weight.grad[:, :t] = 0        # torch [out, r]: the first t rank components

Here the step is the optimizer step ``k = 1, 2, ...`` (with ``optax.MultiSteps`` around this
wrapper, the optimizer steps, as the official formula with accumulation up to its float rounding),
``t_k = int(k / (freeze_fraction * max_steps))`` in float64 exactly as the official Python
computes it (``0.1 * 3 = 0.30000000000000004``, so step 3 of ``max_steps=3, freeze_fraction=0.1``
has ``t = 9``, not 10):
the first step of each ``t`` is precomputed, and the traced step compares against those.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import base

__all__ = ["LamdaFreezeState", "freeze_step_thresholds", "frozen_components", "lamda_freeze"]

_MODES = ("gradient", "update")


class LamdaFreezeState(NamedTuple):
    count: jax.Array  # int32 []: optimizer steps taken
    inner: Any  # the wrapped optimizer's state


def frozen_components(step: int, max_steps: int, freeze_fraction: float = 0.3) -> int:
    """``t``: the official ``int(step / (freeze_fraction * max_steps))`` (Python floats, ``step`` 1-based)."""
    return int(step / (freeze_fraction * max_steps))


def freeze_step_thresholds(rank: int, max_steps: int, freeze_fraction: float = 0.3) -> np.ndarray:
    """``[rank]`` int64: entry ``j - 1`` is the first (1-based) step with ``t >= j``, so ``t_k = sum(k >= thresholds)``
    for ``t_k <= rank``, exactly as :func:`frozen_components` rounds."""
    out = []
    for j in range(1, rank + 1):
        k = max(1, math.floor(j * freeze_fraction * max_steps) - 2)
        while frozen_components(k, max_steps, freeze_fraction) < j:
            k += 1
        out.append(k)
    return np.asarray(out, np.int64)


def lamda_freeze(adapter: base.Adapter, optimizer: optax.GradientTransformation, *,
                 mode: str = "gradient") -> optax.GradientTransformationExtraArgs:
    r"""``optimizer`` with LaMDA's gradual freezing of ``b`` (the schedule from ``adapter.config``).

    At optimizer step ``k`` (1-based), ``t = int(k / (freeze_fraction * max_steps))``; ``b: [*stack, r, *out]``
    (Flax orientation, rows = rank components; the official ``B.grad[:, :t]`` of ``B = b^T``). For ``t < r``
    the first ``t`` rank components are frozen; from the first step with ``t >= r`` all of ``b``.

    mode:
      ``"gradient"`` (default, the official code): the gradient of ``b[..., :t, :]`` is zeroed before
        ``optimizer``. With momentum (AdamW) the frozen rows still move: their moments decay but are
        not zero, and AdamW's weight decay applies. At the first step with ``t >= r`` the official code
        sets ``requires_grad = False`` after that step's backward, so that step's gradient is applied in
        full (no rows zeroed); from the next step ``b`` is out of the optimizer (grad ``None``): zero update.
      ``"update"``: frozen means frozen: the same gradient zeroing (so clipping and norms inside
        ``optimizer`` see what the official code's do), and also the *update* of the frozen rows
        (all of ``b`` once ``t >= r``, that step included) is zeroed after ``optimizer``: they never
        change again, to the bit, whatever the optimizer's momentum or weight decay.
      ``"gradient"`` is the default because the project matches each method's official code
      (where a paper and its code differ, the code's behaviour is the default); ``"update"`` is
      the paper's freezing, and what the issue asks for when frozen must mean unchanged.

    Every target of the update tree (a mapping holding the adapter's ``s`` and ``b``) is handled;
    other leaves pass through. ``s`` and ``b`` of a target must both be trainable (LaMDA's roles).
    Per-layer ranks (LaMDA++) freeze by each target's own ``r``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from lowrank_jax.adapters.lamda import lamda
      >>> adapter = lamda(rank=2, alpha=2.0, targets=".*", max_steps=4, freeze_fraction=0.25)
      >>> tx = lamda_freeze(adapter, optax.sgd(1.0))
      >>> grads = {"w": {"s": jnp.ones((2, 2)), "b": jnp.ones((2, 3))}}
      >>> state = tx.init(grads)
      >>> updates, state = tx.update(grads, state)       # step 1: t = 1, row 0 of b frozen
      >>> updates["w"]["b"]
      Array([[-0., -0., -0.],
             [-1., -1., -1.]], dtype=float32)
    """
    if mode not in _MODES:
        raise ValueError(f"`mode` must be one of {_MODES}, got {mode!r}")
    cfg = adapter.config
    if "max_steps" not in cfg or "freeze_fraction" not in cfg:
        raise ValueError(f"lamda_freeze needs a LaMDA adapter (config with max_steps, freeze_fraction); got "
                         f"method {cfg.get('method')!r}")
    max_steps, fraction = int(cfg["max_steps"]), float(cfg["freeze_fraction"])
    names = adapter.leaf_names
    inner = optax.with_extra_args_support(optimizer)

    def targets_of(tree):
        found = []
        for keys, leaves in tree_lib.adapter_paths(tree, names):
            if "b" in leaves:
                if "s" not in leaves:
                    raise ValueError(f"lamda_freeze: {tree_lib.path_str(keys)!r} has b but no s; pass the trainable "
                                     f"tree (lrj.split(adapter, adapter_params)[0]) holding both")
                found.append((keys, leaves))
        return found

    def masked(tree, count, *, before: bool):
        """``tree`` with each target's frozen rows of ``b`` zeroed, for the step ``count + 1``."""
        k = count + 1
        new = {}
        for keys, leaves in targets_of(tree):
            s, b = leaves["s"], leaves["b"]
            stack, r = s.ndim - 2, s.shape[-1]
            thresholds = jnp.asarray(freeze_step_thresholds(r, max_steps, fraction), jnp.int32)
            t = jnp.sum(k >= thresholds)  # min(t_k, r)
            whole_since_last = k - 1 >= thresholds[-1]  # t_{k-1} >= r: b left the optimizer
            rows = jnp.arange(r).reshape((r,) + (1,) * (b.ndim - stack - 1))
            if before:  # the official zeroing of the gradient: rows < t while t < r; all of b once b left
                frozen = jnp.where(whole_since_last, True, (rows < t) & (t < r))
            elif mode == "gradient":  # only once b is out of the optimizer
                frozen = jnp.broadcast_to(whole_since_last, rows.shape)
            else:  # exact: every frozen row, all of b from the first step with t >= r
                frozen = (rows < t) | (t >= r)
            new[keys + ("b",)] = jnp.where(frozen, jnp.zeros_like(b), b)
        return base.replace_leaves(tree, new) if new else tree

    def init_fn(params):
        return LamdaFreezeState(count=jnp.zeros([], jnp.int32), inner=inner.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        grads = masked(updates, state.count, before=True)
        out, inner_state = inner.update(grads, state.inner, params, **extra_args)
        out = masked(out, state.count, before=False)
        return out, LamdaFreezeState(count=optax.safe_increment(state.count), inner=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
