"""Offset initialisations (PiSSA exact and randomized, OLoRA): parity with peft and their defining properties."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lrj

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def ref():
    return np.load(FIXTURES / "peft_inits.npz", allow_pickle=False)


def factors(init, w, rank=4, alpha=8.0):
    params = {"params": {"proj": {"kernel": jnp.asarray(w)}}}
    adapter = lrj.lora(rank=rank, alpha=alpha, targets=".*", init=init)
    lp = adapter.init(jax.random.key(0), params)
    leaves = lp["params"]["proj"]["kernel"]
    return adapter, params, lp, leaves["a"], leaves["b"]


def test_pissa_equals_peft_up_to_singular_vector_signs(ref):
    adapter, params, lp, a, b = factors("pissa", ref["pissa_W"].T)
    a_ref, b_ref = ref["pissa_A"].T, ref["pissa_B"].T
    signs = np.sign(np.sum(np.asarray(a) * a_ref, axis=0))  # LAPACK builds may flip a pair (u_i, v_i)
    np.testing.assert_allclose(a * signs, a_ref, atol=5e-5)
    np.testing.assert_allclose(b * signs[:, None], b_ref, atol=5e-5)
    residual = adapter.unmerge(params, lp)["params"]["proj"]["kernel"]
    np.testing.assert_allclose(residual, ref["pissa_residual"].T, atol=2e-5)


def test_olora_equals_peft(ref):
    adapter, params, lp, a, b = factors("olora", ref["olora_W"].T)
    np.testing.assert_allclose(a, ref["olora_A"].T, atol=1e-5)
    np.testing.assert_allclose(b, ref["olora_B"].T, atol=1e-5)
    np.testing.assert_allclose(adapter.unmerge(params, lp)["params"]["proj"]["kernel"], ref["olora_residual"].T, atol=1e-5)


def test_pissa_is_the_best_rank_r_approximation():
    w = jax.random.normal(jax.random.key(1), (48, 32))
    _, _, _, a, b = factors("pissa", w, rank=6, alpha=3.0)
    s = np.linalg.svd(np.asarray(w), compute_uv=False)
    err = float(jnp.sum((w - (3.0 / 6) * a @ b) ** 2))
    np.testing.assert_allclose(err, np.sum(s[6:] ** 2), rtol=1e-4)  # Eckart-Young


def test_randomized_pissa_is_near_optimal_on_a_decaying_spectrum():
    k1, k2 = jax.random.split(jax.random.key(2))
    u, _ = jnp.linalg.qr(jax.random.normal(k1, (64, 64)))
    v, _ = jnp.linalg.qr(jax.random.normal(k2, (48, 48)))
    s = 0.7 ** jnp.arange(48)
    w = (u[:, :48] * s) @ v.T
    _, _, _, a, b = factors("pissa_niter_4", w, rank=8, alpha=8.0)
    err = float(jnp.sum((w - a @ b) ** 2))
    optimal = float(jnp.sum(s[8:] ** 2))
    assert optimal <= err <= 1.01 * optimal


def test_offset_init_with_its_residual_reproduces_the_base_model():
    model = nn.Dense(16)
    x = jax.random.normal(jax.random.key(0), (4, 24))
    params = model.init(jax.random.key(1), x)
    for init in ("pissa", "olora", "pissa_niter_2"):
        adapter = lrj.lora(rank=4, alpha=8.0, targets=".*/kernel", init=init)
        lp = adapter.init(jax.random.key(2), params)
        residual = adapter.unmerge(params, lp)
        np.testing.assert_allclose(lrj.linen.apply(model, adapter, residual, lp, x), model.apply(params, x), atol=2e-5)


def test_offset_inits_on_scanned_stacks_work_per_layer():
    w = jax.random.normal(jax.random.key(3), (3, 20, 12))
    params = {"params": {"layers": {"kernel": w}}}
    adapter = lrj.lora(rank=3, alpha=3.0, targets=".*", init="pissa", layouts={"params/layers/kernel": lrj.Layout(1, 1)})
    lp = adapter.init(jax.random.key(0), params)["params"]["layers"]["kernel"]
    assert lp["a"].shape == (3, 20, 3) and lp["b"].shape == (3, 3, 12)
    for layer in range(3):
        s = np.linalg.svd(np.asarray(w[layer]), compute_uv=False)
        err = float(jnp.sum((w[layer] - lp["a"][layer] @ lp["b"][layer]) ** 2))
        np.testing.assert_allclose(err, np.sum(s[3:] ** 2), rtol=1e-4)


def test_offset_init_errors():
    with pytest.raises(ValueError, match="`init` must be one of .*got 'pissa_niter_x'"):
        lrj.lora(init="pissa_niter_x")
    params = {"params": {"emb": {"embedding": jnp.ones((10, 4))}}}
    with pytest.raises(ValueError, match="init 'pissa' is for linear kernels; 'params/emb/embedding' is an embedding"):
        lrj.lora(rank=2, targets=".*", init="pissa").init(jax.random.key(0), params)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_offset_inits_on_a_rank_deficient_kernel(init):
    """rank r above rank(W) = 2 (allowed: r <= min(in, out)): s A B reproduces W, no NaN, the residual is ~0."""
    k1, k2 = jax.random.split(jax.random.key(7))
    w = jax.random.normal(k1, (20, 2)) @ jax.random.normal(k2, (2, 12))
    adapter, params, lp, a, b = factors(init, w, rank=5, alpha=5.0)
    assert bool(jnp.all(jnp.isfinite(a))) and bool(jnp.all(jnp.isfinite(b)))
    residual = adapter.unmerge(params, lp)["params"]["proj"]["kernel"]
    np.testing.assert_allclose(residual, 0.0, atol=1e-4 * float(jnp.abs(w).max()))
    zero = factors(init, jnp.zeros((8, 6)), rank=3)  # the zero matrix: rank 0
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in zero[3:]) and float(jnp.abs(zero[3] @ zero[4]).max()) == 0.0


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_offset_inits_reject_non_finite_kernels(init):
    w = jnp.ones((8, 6)).at[2, 3].set(jnp.nan)
    with pytest.raises(ValueError, match="`params/proj/kernel` has 1 NaN and 0 Inf"):
        factors(init, w, rank=2)


def test_export_to_plain_rank_2r_lora_on_the_original_base():
    model = nn.Dense(16)
    x = jax.random.normal(jax.random.key(0), (4, 24))
    params = model.init(jax.random.key(1), x)
    for rslora in (False, True):
        adapter = lrj.lora(rank=4, alpha=8.0, targets=".*/kernel", init="pissa", rslora=rslora)
        initial = adapter.init(jax.random.key(2), params)
        residual = adapter.unmerge(params, initial)
        trained = jax.tree.map(lambda v: v + 0.05 * jnp.sin(jnp.arange(v.size).reshape(v.shape)), initial)
        exported, lp2 = lrj.adapters.lora.offset_to_plain_lora(adapter, params, initial, trained)
        assert lp2["params"]["kernel"]["a"].shape == (24, 8) and exported.config["rank"] == 8
        np.testing.assert_allclose(lrj.linen.apply(model, exported, params, lp2, x),
                                   lrj.linen.apply(model, adapter, residual, trained, x), atol=3e-5)
