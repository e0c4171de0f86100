"""The analytic gradient formulas in lrj.grads equal jax.grad."""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowrank_jax import grads


def setup(seed=0, n=7, d_in=6, d_out=5, r=3):
    ks = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(ks[0], (n, d_in))
    w = jax.random.normal(ks[1], (d_in, d_out))
    a = jax.random.normal(ks[2], (d_in, r))
    b = jax.random.normal(ks[3], (r, d_out))
    target = jax.random.normal(ks[4], (n, d_out))
    return x, w, a, b, target


def loss_of_weight(W, x, target):
    return jnp.sum(jnp.sin(x @ W - target))


def test_lora_grads_equal_autodiff():
    x, w, a, b, target = setup()
    s = 1.7
    dA, dB = jax.grad(lambda a, b: loss_of_weight(w + s * a @ b, x, target), argnums=(0, 1))(a, b)
    G = jax.grad(loss_of_weight)(w + s * a @ b, x, target)
    ga, gb = grads.lora_grads(G, a, b, s)
    np.testing.assert_allclose(ga, dA, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gb, dB, rtol=1e-5, atol=1e-5)
    g_out = jnp.cos(x @ (w + s * a @ b) - target)  # dL/dy
    ga2, gb2 = grads.lora_grads_from_activations(x, g_out, a, b, s)
    np.testing.assert_allclose(ga2, dA, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gb2, dB, rtol=1e-5, atol=1e-5)


def test_dora_grads_equal_autodiff_with_and_without_detached_norm():
    x, w, a, b, target = setup(1)
    V = w + 0.5 * a @ b
    m = jnp.linspace(0.5, 2.0, V.shape[1])

    def weight(m, V, detach):
        norm = jnp.linalg.norm(V, axis=0)
        return m * V / (lax.stop_gradient(norm) if detach else norm)

    for detach in (False, True):
        dm, dV = jax.grad(lambda m, V: loss_of_weight(weight(m, V, detach), x, target), argnums=(0, 1))(m, V)
        G_prime = jax.grad(loss_of_weight)(weight(m, V, detach), x, target)
        gm, gV = grads.dora_grads(G_prime, m, V, detach_norm=detach)
        np.testing.assert_allclose(gm, dm, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(gV, dV, rtol=1e-4, atol=1e-5)
