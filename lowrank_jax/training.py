"""Training-loop helpers: gradients w.r.t. the adapter tree only, penalties, summaries."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import base

__all__ = ["make_train_step", "trainable_summary"]


def make_train_step(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    *,
    adapter: base.Adapter | None = None,
    penalty: float = 0.0,
    has_aux: bool = False,
):
    r"""A train step that differentiates only the adapter tree.

    ``loss_fn(adapter_params, params, batch, rng)`` returns the loss (or
    ``(loss, aux)`` with ``has_aux``). The base ``params`` enter as constants, so
    no gradient of a frozen weight is ever computed. With ``penalty = lambda > 0``
    the objective is

    .. math:: L + \lambda \sum_{\text{targets}} \| s A B \|_F^2

    (the Frobenius regulariser of seed 000), computed from ``r x r`` products.

    Returns ``step(adapter_params, opt_state, params, batch, rng) ->
    (adapter_params, opt_state, metrics)``, not jitted: jit it with the
    shardings you want, e.g. ``jax.jit(step, donate_argnums=(0, 1))``.
    """
    if penalty < 0:
        raise ValueError(f"`penalty` must be >= 0, got {penalty}")
    if penalty > 0 and adapter is None:
        raise ValueError("`penalty` > 0 needs the `adapter` whose penalty to add")

    def objective(adapter_params, params, batch, rng):
        out = loss_fn(adapter_params, params, batch, rng)
        loss, aux = out if has_aux else (out, None)
        reg = adapter.penalty(params, adapter_params) if penalty > 0 else jnp.zeros((), jnp.float32)
        return loss + penalty * reg, (loss, reg, aux)

    def step(adapter_params, opt_state, params, batch, rng):
        (total, (loss, reg, aux)), grads = jax.value_and_grad(objective, has_aux=True)(
            adapter_params, params, batch, rng
        )
        updates, opt_state = optimizer.update(grads, opt_state, adapter_params)
        adapter_params = optax.apply_updates(adapter_params, updates)
        metrics = {"loss": loss, "objective": total, "penalty": reg, "grad_norm": optax.tree.norm(grads)}
        if has_aux:
            metrics["aux"] = aux
        return adapter_params, opt_state, metrics

    return step


def trainable_summary(params, adapter_params) -> dict:
    """Counts like peft's ``print_trainable_parameters``: trainable, all, and the percentage.

    ``all`` counts the base params plus the adapter's (as peft does).
    """
    trainable = tree_lib.num_params(adapter_params)
    total = tree_lib.num_params([leaf for _, _, leaf in tree_lib.flatten_with_paths(params)]) + trainable
    return {
        "trainable_params": trainable,
        "all_params": total,
        "trainable_percent": 100.0 * trainable / total,
        "text": f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100.0 * trainable / total:.4f}",
    }
