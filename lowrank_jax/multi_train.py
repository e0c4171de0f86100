r"""m-LoRA: train N LoRA adapters in ONE jitted step on one shared base forward and backward.

Each adapter ``k`` has its own batch, optax optimizer (learning rate, schedule, state) and loss.
The step concatenates the batches, runs the model once with a :func:`lrj.multi_lora` bank and
``adapter_index = [k] * len(batch_k)``, and minimises

.. math:: L = \sum_k L_k, \qquad L_k = \frac{1}{|b_k|} \sum_{i \in b_k} \ell_i

Adapter ``k``'s factors touch only its own rows, so ``dL/d(A_k, B_k) = dL_k/d(A_k, B_k)``: the
gradient of training it alone on ``b_k`` (and the bank's padded rank columns get exactly zero).
Each optimizer then updates its own slot only, so N steps equal N separate runs.

Reference: Ye et al., `mLoRA: Fine-Tuning LoRA Adapters via Highly-Efficient Pipeline Parallelism
in Multiple GPUs <https://arxiv.org/abs/2312.02515>`_ (https://github.com/TUDB-Labs/mLoRA, its
``BatchLoRA`` shared-base forward), 2023.

Usage::

    bank = lrj.multi_lora([lora_a, lora_b], capacity=4)
    state = multi_train.init(bank, bank.init(key, params), [optax.adam(1e-3), optax.sgd(1e-2)])

    def loss_fn(bank_params, params, batch, adapter_index, rng):   # -> [batch] per-example losses
        logits = lrj.linen.apply(model, bank, params, bank_params, batch["x"], adapter_index=adapter_index,
                                 dropout_rng=rng)
        return per_example_cross_entropy(logits, batch["y"])

    step = multi_train.make_step(loss_fn, bank, optimizers)
    state, metrics = step(state, params, [batch_a, batch_b])      # metrics["loss"]: [2], one per adapter
    multi_train.save(run_dir, bank, state)                         # run_dir/adapter_0, adapter_1 ...
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax import checkpoint
from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import base
from lowrank_jax.adapters import multi

__all__ = ["MultiState", "init", "make_grads", "make_step", "restore", "save", "slot", "with_slot"]


class MultiState(NamedTuple):
    """trainable / frozen: the bank tree's two parts (:func:`lrj.split`); opt_states: one optax state per
    trained slot ``0..N-1``, over that slot's leaves; step: the number of steps taken."""

    trainable: Any
    frozen: Any
    opt_states: tuple
    step: Any


def _axes(bank_tree, frozen):
    """A tree like ``bank_tree`` holding each leaf's adapter axis (the number of stacked axes before it)."""
    stacks = {keys: leaves[multi.S].ndim - 2 for keys, leaves in tree_lib.adapter_paths(frozen, frozenset(multi.ROLES))}
    out = {keys: {n: stacks[keys] for n in leaves} for keys, leaves in tree_lib.adapter_paths(bank_tree, frozenset(multi.ROLES))}
    return tree_lib.nest(out)


def slot(bank_tree, k: int, frozen):
    """Slot ``k`` of a bank-shaped tree (params, gradients): every leaf indexed at its adapter axis."""
    return jax.tree.map(lambda v, axis: jnp.take(v, k, axis=axis), bank_tree, _axes(bank_tree, frozen))


def with_slot(bank_tree, k: int, value, frozen):
    """``bank_tree`` with slot ``k`` replaced by ``value`` (a tree like :func:`slot`'s)."""
    def put(v, new, axis):
        return v.at[(slice(None),) * axis + (k,)].set(new.astype(v.dtype))

    return jax.tree.map(put, bank_tree, value, _axes(bank_tree, frozen))


def init(bank: multi.Bank, bank_params, optimizers: Sequence[optax.GradientTransformation]) -> MultiState:
    """The training state of slots ``0..len(optimizers)-1``: each optimizer's state over its own slot."""
    optimizers = _check(bank, optimizers)
    trainable, frozen = base.split(bank, bank_params)
    states = tuple(opt.init(slot(trainable, k, frozen)) for k, opt in enumerate(optimizers))
    return MultiState(trainable, frozen, states, jnp.zeros((), jnp.int32))


def _check(bank, optimizers) -> list:
    optimizers = list(optimizers)
    if not optimizers:
        raise ValueError("m-LoRA training needs one optimizer per trained adapter, got none")
    if len(optimizers) > bank.capacity:
        raise ValueError(f"{len(optimizers)} optimizers for a bank of capacity {bank.capacity}")
    return optimizers


def _concat(batches):
    sizes = []
    for k, batch in enumerate(batches):
        leaves = jax.tree.leaves(batch)
        if not leaves:
            raise ValueError(f"batch {k} is empty")
        n = {int(np.shape(v)[0]) for v in leaves}
        if len(n) != 1 or 0 in n:
            raise ValueError(f"batch {k}'s leaves disagree on (or lack) the example axis: sizes {sorted(n)}")
        sizes.append(n.pop())
    ids = jnp.concatenate([jnp.full((s,), k, jnp.int32) for k, s in enumerate(sizes)])
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *batches), ids, sizes


def make_grads(loss_fn: Callable, bank: multi.Bank) -> Callable:
    """``grads(trainable, frozen, params, batches, rng=None) -> (losses [N], grads)``: the per-adapter mean
    losses and the gradient of their sum w.r.t. the bank's trainable tree, in one forward and backward.

    ``loss_fn(bank_params, params, batch, adapter_index, rng)`` returns the per-example losses ``[examples]``,
    or ``(losses, {name: [examples] per-example metric})``; then ``grads`` returns
    ``(losses [N], grads, {name: [N]})``, each metric averaged over each adapter's own examples.
    """
    def grads(trainable, frozen, params, batches, rng=None):
        batch, ids, sizes = _concat(list(batches))
        offsets = np.cumsum([0, *sizes])

        def per_adapter(values, name):
            if values.shape != ids.shape:
                raise ValueError(f"loss_fn must return one {name} per example, shape {ids.shape}; got {values.shape}")
            return jnp.stack([values[offsets[k]:offsets[k + 1]].mean() for k in range(len(sizes))])

        def total(t):
            out = loss_fn(base.join(bank, t, frozen), params, batch, ids, rng)
            per_example, metrics = out if isinstance(out, tuple) else (out, None)
            losses = per_adapter(per_example, "loss")
            metrics = None if metrics is None else {k: per_adapter(v, repr(k)) for k, v in metrics.items()}
            return losses.sum(), (losses, metrics)

        (_, (losses, metrics)), g = jax.value_and_grad(total, has_aux=True)(trainable)
        return (losses, g) if metrics is None else (losses, g, metrics)

    return grads


def make_step(loss_fn: Callable, bank: multi.Bank, optimizers: Sequence[optax.GradientTransformation], *,
              jit: bool = True) -> Callable:
    """``step(state, params, batches, rng=None) -> (state, {"loss": [N], ...})``: one m-LoRA step (and the
    per-adapter means of the metrics ``loss_fn`` returns, see :func:`make_grads`).

    ``batches[k]`` (a pytree with a leading example axis; the examples may differ in count but not in
    their other axes) trains slot ``k`` with ``optimizers[k]``; one jitted program runs the shared
    forward, backward and the N optimizer updates. See :func:`make_grads` for ``loss_fn``.
    """
    optimizers = _check(bank, optimizers)
    grads_fn = make_grads(loss_fn, bank)

    def step(state: MultiState, params, batches, rng=None):
        if len(batches) != len(optimizers):
            raise ValueError(f"{len(batches)} batches for {len(optimizers)} adapters (one batch each)")
        losses, g, *metrics = grads_fn(state.trainable, state.frozen, params, batches, rng)
        trainable, states = state.trainable, []
        for k, opt in enumerate(optimizers):
            p_k = slot(trainable, k, state.frozen)
            updates, s_k = opt.update(slot(g, k, state.frozen), state.opt_states[k], p_k)
            trainable = with_slot(trainable, k, optax.apply_updates(p_k, updates), state.frozen)
            states.append(s_k)
        return MultiState(trainable, state.frozen, tuple(states), state.step + 1), {"loss": losses, **(metrics[0] if metrics else {})}

    return jax.jit(step) if jit else step


def save(directory: str | os.PathLike, bank: multi.Bank, state: MultiState, *, names: Sequence[str] | None = None,
         adapters: Sequence[base.Adapter] | None = None) -> list[str]:
    """One adapter checkpoint per trained slot (``lowrank_jax.checkpoint``): ``directory/<name>`` holds slot
    ``k``'s own LoRA tree (its own ranks and targets, :meth:`Bank.unstack`), its optimizer state and its
    config (``adapters[k].config``, default the bank's member ``k``). Returns the directories."""
    n = len(state.opt_states)
    names = [f"adapter_{k}" for k in range(n)] if names is None else list(names)
    if len(names) != n:
        raise ValueError(f"{len(names)} names for {n} trained adapters")
    members = bank.config["members"]
    configs = [a.config for a in adapters] if adapters is not None else \
        [members[k] if k < len(members) else None for k in range(n)]
    params = base.join(bank, state.trainable, state.frozen)
    out = []
    for k, name in enumerate(names):
        path = os.path.join(os.fspath(directory), name)
        mngr = checkpoint.manager(path)
        checkpoint.save(mngr, int(state.step), bank.unstack(params, k), state.opt_states[k], config=configs[k], force=True)
        mngr.close()
        out.append(path)
    return out


def restore(directory: str | os.PathLike, bank: multi.Bank, state: MultiState, *,
            names: Sequence[str] | None = None) -> MultiState:
    """``state`` with each trained slot's adapter and optimizer state read back from :func:`save`'s directories."""
    n = len(state.opt_states)
    names = [f"adapter_{k}" for k in range(n)] if names is None else list(names)
    params = base.join(bank, state.trainable, state.frozen)
    states, step = [], state.step
    for k, name in enumerate(names):
        mngr = checkpoint.manager(os.path.join(os.fspath(directory), name))
        target = checkpoint.abstract(bank.unstack(params, k))
        step_k, tree, opt_state, config = checkpoint.restore(mngr, target, checkpoint.abstract(state.opt_states[k]))
        mngr.close()
        params = bank.put(params, k, tree, config or None)
        states.append(opt_state)
        step = jnp.asarray(step_k, jnp.int32)
    trainable, frozen = base.split(bank, params)
    return MultiState(trainable, frozen, tuple(states), step)

