"""Training-loop helpers: gradients w.r.t. the adapter tree only, penalties, summaries."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import base

__all__ = ["average_gradient", "make_train_step", "trainable_summary"]


def make_train_step(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    *,
    adapter: base.Adapter | None = None,
    penalty: float = 0.0,
    has_aux: bool = False,
    return_grads: bool = False,
):
    r"""A train step that differentiates only the adapter's trainable leaves.

    ``loss_fn(adapter_params, params, batch, rng)`` returns the loss (or
    ``(loss, aux)`` with ``has_aux``). The base ``params`` enter as constants, and so
    does the adapter's frozen state when ``adapter`` is given (``lrj.split`` by the
    leaves' declared roles, e.g. after ``lrj.freeze(adapter, {"a"})``): no gradient of a
    frozen weight is ever computed. The optimizer sees the trainable part only (make its
    state with ``optimizer.init(lrj.split(adapter, adapter_params)[0])``); transforms that
    need the frozen state, like LoRA-FA's preconditioner, receive it as optax's extra
    argument ``frozen=``. With ``penalty = lambda > 0``
    the objective is

    .. math:: L + \lambda \sum_{\text{targets}} \| s A B \|_F^2

    (the Frobenius regulariser of seed 000), computed from ``r x r`` products.

    Returns ``step(adapter_params, opt_state, params, batch, rng) ->
    (adapter_params, opt_state, metrics)`` (``metrics["grads"]``: the trainable part's gradients,
    with ``return_grads``), not jitted: jit it with the
    shardings you want, e.g. ``jax.jit(step, donate_argnums=(0, 1))``.
    """
    if penalty < 0:
        raise ValueError(f"`penalty` must be >= 0, got {penalty}")
    if penalty > 0 and adapter is None:
        raise ValueError("`penalty` > 0 needs the `adapter` whose penalty to add")

    def objective(trainable, frozen, params, batch, rng):
        adapter_params = base.join(adapter, trainable, frozen) if frozen else trainable
        out = loss_fn(adapter_params, params, batch, rng)
        loss, aux = out if has_aux else (out, None)
        reg = adapter.penalty(params, adapter_params) if penalty > 0 else jnp.zeros((), jnp.float32)
        return loss + penalty * reg, (loss, reg, aux)

    transform = optax.with_extra_args_support(optimizer)

    def step(adapter_params, opt_state, params, batch, rng):
        has_frozen = adapter is not None and bool(base.frozen_names(adapter))
        trainable, frozen = base.split(adapter, adapter_params) if has_frozen else (adapter_params, {})
        if has_frozen:
            _check_state(opt_state, trainable)
        (total, (loss, reg, aux)), grads = jax.value_and_grad(objective, has_aux=True)(
            trainable, frozen, params, batch, rng
        )
        # Optimizers that read frozen state (LoRA-FA's preconditioner reads the frozen A) get it as optax's
        # extra argument `frozen`; the others ignore it. Optimizer state exists for the trainable leaves only.
        extra = {"frozen": frozen} if frozen else {}
        updates, opt_state = transform.update(grads, opt_state, trainable, **extra)
        trainable = optax.apply_updates(trainable, updates)
        adapter_params = base.join(adapter, trainable, frozen) if has_frozen else trainable
        metrics = {"loss": loss, "objective": total, "penalty": reg, "grad_norm": optax.tree.norm(grads)}
        if has_aux:
            metrics["aux"] = aux
        if return_grads:  # e.g. for AdaLoRA's allocator, which runs after the step on its gradients
            metrics["grads"] = grads
        return adapter_params, opt_state, metrics

    def _check_state(opt_state, trainable):
        want = jax.tree.structure(jax.eval_shape(optimizer.init, trainable))
        if jax.tree.structure(opt_state) != want:
            raise ValueError(
                "`opt_state` does not match the adapter's trainable leaves: with frozen leaves make it with "
                "`optimizer.init(lrj.split(adapter, adapter_params)[0])`, so no optimizer state is kept for frozen ones"
            )

    return step


def average_gradient(loss_fn: Callable[..., Any], params, batches, *, targets: tree_lib.Targets | None = None, layouts=None):
    r"""The full gradient averaged over batches, ``G = (1/K) sum_k dL(params; batch_k)/dparams``.

    What LoRA-GA initialises from (``lrj.lora(init="lora_ga").init(key, params, grads=G)``),
    as both its official repository (``estimate_gradient``) and peft (``preprocess_loraga``)
    estimate it: the mean of per-batch gradients of the per-batch loss.
    ``loss_fn(params, batch) -> scalar``; ``batches``: an iterable (a list, a generator);
    the gradient is jitted once and accumulated in float32. With ``targets`` only the
    matching leaves are kept (a tree with the targets' paths), so just one full gradient
    and the accumulator for the targets are alive at a time.

    Example:
      >>> import jax.numpy as jnp, lowrank_jax as lrj
      >>> params = {"w": jnp.array([1.0, 2.0])}
      >>> loss = lambda p, x: jnp.sum(p["w"] * x)
      >>> lrj.average_gradient(loss, params, [jnp.array([1.0, 0.0]), jnp.array([3.0, 2.0])])
      {'w': Array([2., 1.], dtype=float32)}
    """
    if targets is not None:
        paths = {t.keys for t in tree_lib.select_targets(params, targets, layouts)}

        def keep(g):
            return tree_lib.nest({keys: leaf for keys, _, leaf in tree_lib.flatten_with_paths(g) if keys in paths})
    else:
        keep = lambda g: g  # noqa: E731

    @jax.jit
    def batch_gradient(p, batch):
        return jax.tree.map(lambda x: x.astype(jnp.float32), keep(jax.grad(loss_fn)(p, batch)))

    add = jax.jit(lambda total, g: jax.tree.map(jnp.add, total, g), donate_argnums=0)
    total, count = None, 0
    for batch in batches:
        g = batch_gradient(params, batch)
        total = g if total is None else add(total, g)
        count += 1
    if count == 0:
        raise ValueError("`batches` is empty: the gradient needs at least one batch")
    return jax.tree.map(lambda x: x / count, total)


def trainable_summary(params, adapter_params, *, adapter: base.Adapter | None = None) -> dict:
    """Counts like peft's ``print_trainable_parameters``: trainable, all, and the percentage.

    ``all`` counts the base params plus the adapter's, frozen state included (as peft
    counts a frozen LoRA-FA ``A``), and each parameter once: a leaf that *is* a base
    parameter (role ``("param",)``, :func:`lrj.full_finetune`, LongLoRA's embeddings)
    replaces it rather than adding to it (peft's ``modules_to_save`` keeps both copies and
    counts both). ``trainable`` counts the leaves the adapter's roles declare trainable
    (every leaf when ``adapter`` is not given); ``frozen_adapter_params`` the others.
    """
    trainable_tree = base.split(adapter, adapter_params)[0] if adapter is not None else adapter_params
    trainable = tree_lib.num_params(trainable_tree)
    adapter_total = tree_lib.num_params(adapter_params)
    replaced = tree_lib.num_params(list(base.substitutions(adapter, adapter_params)[1].values())) if adapter else 0
    total = tree_lib.num_params([leaf for _, _, leaf in tree_lib.flatten_with_paths(params)]) + adapter_total - replaced
    return {
        "trainable_params": trainable,
        "all_params": total,
        "frozen_adapter_params": adapter_total - trainable,
        "trainable_percent": 100.0 * trainable / total,
        "text": f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100.0 * trainable / total:.4f}",
    }
