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


def test_galore_projection_at_a_refresh_is_the_best_rank_r_approximation():
    G = jax.random.normal(jax.random.key(3), (9, 6)) @ jnp.diag(0.6 ** jnp.arange(6))
    s = np.linalg.svd(np.asarray(G), compute_uv=False)
    for proj_type, side in (("std", "right"), ("reverse_std", "left"), ("full", "full")):
        proj = grads.galore_projection(G, 3, proj_type)
        assert proj.side == side
        back = grads.galore_update(G, proj, scale=1.0)
        np.testing.assert_allclose(np.linalg.norm(G - back), np.sqrt(np.sum(s[3:] ** 2)), rtol=1e-4)  # Eckart-Young
        R = grads.galore_project(G, proj)
        assert R.shape == {"right": (9, 3), "left": (3, 6), "full": (3, 3)}[side]
        # back is the adjoint of project: <project(G), N> = <G, back(N)>
        N = jax.random.normal(jax.random.key(4), R.shape)
        np.testing.assert_allclose(jnp.sum(R * N), jnp.sum(G * grads.galore_project_back(N, proj)), rtol=1e-4)


def test_galore_update_equals_the_optimizer_between_refreshes():
    """scale_by_galore with an identity inner transform is scale * back(project(G_t)) with P from G_0."""
    import optax

    from lowrank_jax import optim

    k0, k1 = jax.random.split(jax.random.key(5))
    kernel = jnp.zeros((6, 10))  # Flax [in, out]; GaLore sees kernel.T: [10, 6], m >= n: right
    g0, g1 = jax.random.normal(k0, (6, 10)), jax.random.normal(k1, (6, 10))
    tx = optim.scale_by_galore(rank=2, update_proj_gap=5, scale=0.25, inner=optax.identity())
    state = tx.init({"kernel": kernel})
    u0, state = tx.update({"kernel": g0}, state)
    u1, state = tx.update({"kernel": g1}, state)
    proj = grads.galore_projection(g0.T, 2)
    np.testing.assert_allclose(u0["kernel"].T, grads.galore_update(g0.T, proj), atol=1e-6)
    np.testing.assert_allclose(u1["kernel"].T, grads.galore_update(g1.T, proj), atol=1e-6)
    # galore-torch's first Adam step: m = (1-b1) R, v = (1-b2) R^2, step size sqrt(1-b2)/(1-b1), eps = 1e-6 on sqrt(v)
    adam_first = lambda R: R / (jnp.abs(R) + 1e-6 / jnp.sqrt(1 - 0.999))  # noqa: E731
    ua, _ = optim.scale_by_galore(rank=2, scale=0.25).update({"kernel": g0}, optim.scale_by_galore(rank=2).init({"kernel": kernel}))
    np.testing.assert_allclose(ua["kernel"].T, grads.galore_update(g0.T, proj, inner=adam_first), atol=1e-5)


def test_lora_pro_grads_equal_the_optimizer_and_project_G_onto_the_tangent_space():
    from lowrank_jax import optim

    _, _, a, b, _ = setup(2, d_in=8, d_out=7, r=3)
    G = jax.random.normal(jax.random.key(6), (8, 7))
    s = 1.5
    ga, gb = grads.lora_grads(G, a, b, s)
    ga_new, gb_new = grads.lora_pro_grads(G, a, b, s)
    ref_a, ref_b = optim.lora_pro_gradients(a, b, ga, gb, s)
    np.testing.assert_allclose(ga_new, ref_a, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gb_new, ref_b, rtol=1e-4, atol=1e-5)
    tilde = grads.lora_pro_equivalent_gradient(G, a, b, s)
    pa = a @ jnp.linalg.inv(a.T @ a) @ a.T
    pb = b.T @ jnp.linalg.inv(b @ b.T) @ b
    np.testing.assert_allclose(tilde, G @ pb + pa @ G - pa @ G @ pb, rtol=1e-4, atol=1e-4)
    # an independent least-squares fit of G by X b + a Y reaches the same point
    basis = jnp.concatenate([jnp.kron(jnp.eye(8), b).T, jnp.kron(a, jnp.eye(7))], axis=1)  # vec(X b), vec(a Y)
    coef = jnp.linalg.lstsq(basis, G.reshape(-1))[0]
    np.testing.assert_allclose(tilde.reshape(-1), basis @ coef, rtol=1e-4, atol=1e-4)
