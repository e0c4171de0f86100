"""Optimizer state in host memory: the JAX analogue of bitsandbytes' paged optimizers.

Paged optimizers (Dettmers et al, `QLoRA <https://arxiv.org/abs/2305.14314>`_, 2023)
keep optimizer state in CUDA unified memory that pages to the host under
pressure. JAX has no demand paging; it has memory kinds. :func:`host_offload`
wraps any optax transformation so its state lives in host memory
(``jax.memory.Space.Host``, i.e. ``pinned_host``) between steps and is moved to
device memory only inside ``update`` (inside your jitted step), then written
back. On an accelerator this frees the state's accelerator memory at the cost
of two host-device transfers per step; XLA can overlap them with compute.

On CPU, host and device memory are the same DRAM: the state is tagged
``pinned_host`` and the transfers are plain copies, so the behaviour (numbers,
memory kinds, donation) is testable here, but no memory is saved and XLA's
memory analysis reports no separate host bytes.
"""

from __future__ import annotations

import jax
import optax

__all__ = ["host_offload", "to_memory"]


def to_memory(tree, space):
    """``jax.device_put`` of every array leaf of ``tree`` into ``space`` (``jax.memory.Space.Host`` or ``.Device``)."""
    return jax.tree.map(lambda x: jax.device_put(x, space) if isinstance(x, jax.Array) else x, tree)


def host_offload(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` with its state kept in host memory between steps and moved to the device inside ``update``.

    The updates are exactly ``tx``'s. Call ``update`` inside ``jax.jit`` (as in any train
    step); eagerly it works too, with a transfer per leaf.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from lowrank_jax.optim import host_offload
      >>> tx = host_offload(optax.adam(1e-2))
      >>> params = {"w": jnp.ones(3)}
      >>> state = tx.init(params)
      >>> state[0].mu["w"].sharding.memory_kind
      'pinned_host'
    """

    def init_fn(params):
        return to_memory(tx.init(params), jax.memory.Space.Host)

    def update_fn(updates, state, params=None):
        updates, state = tx.update(updates, to_memory(state, jax.memory.Space.Device), params)
        return updates, to_memory(state, jax.memory.Space.Host)

    return optax.GradientTransformation(init_fn, update_fn)
