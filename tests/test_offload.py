"""Host-offloaded optimizer state (the paged-optimizer analogue): same numbers, state in host memory."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lowrank_jax as lrj


def test_state_lives_in_host_memory_and_updates_are_unchanged():
    params = {"a": jax.random.normal(jax.random.key(0), (16, 4)), "b": jnp.zeros((4, 8))}
    grads = [jax.tree.map(lambda x, i=i: jnp.full_like(x, 0.1 * (i + 1)), params) for i in range(3)]
    plain, offloaded = optax.adamw(1e-2), lrj.optim.host_offload(optax.adamw(1e-2))

    def run(tx):
        state = tx.init(params)
        p = params

        @jax.jit
        def step(p, state, g):
            updates, state = tx.update(g, state, p)
            return optax.apply_updates(p, updates), state

        for g in grads:
            p, state = step(p, state, g)
        return p, state

    p_plain, _ = run(plain)
    p_off, state = run(offloaded)
    jax.tree.map(np.testing.assert_array_equal, p_plain, p_off)
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves(state) if isinstance(x, jax.Array)}
    assert kinds == {"pinned_host"}
    assert {x.sharding.memory_kind for x in jax.tree.leaves(p_off)} == {"device"}


def test_offload_composes_with_lora_train_step():
    import flax.linen as nn

    model = nn.Dense(4)
    x = jnp.ones((8, 6))
    variables = model.init(jax.random.key(0), x)
    adapter = lrj.lora(rank=2, targets=".*/kernel")
    lp = adapter.init(jax.random.key(1), variables)
    tx = lrj.optim.host_offload(optax.adam(1e-2))

    def loss_fn(lp, variables, batch, rng):
        return jnp.mean((lrj.linen.apply(model, adapter, variables, lp, batch) - 1.0) ** 2)

    step = jax.jit(lrj.make_train_step(loss_fn, tx))
    state = tx.init(lp)
    lp2, state, metrics = step(lp, state, variables, x, None)
    assert {leaf.sharding.memory_kind for leaf in jax.tree.leaves(state) if isinstance(leaf, jax.Array)} == {"pinned_host"}
    assert float(metrics["loss"]) > 0
