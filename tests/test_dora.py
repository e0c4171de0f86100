"""DoRA: parity with peft (forward, gradients, merge, init), merge/unmerge, scan, quantised base."""

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
    return np.load(FIXTURES / "peft_dora.npz", allow_pickle=False)


class Proj(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(40, name="proj")(x)


def tree_from(ref, prefix):
    params = {"params": {"proj": {"kernel": jnp.asarray(ref[f"{prefix}_W"].T), "bias": jnp.asarray(ref[f"{prefix}_bias"])}}}
    lp = {"params": {"proj": {"kernel": {"a": jnp.asarray(ref[f"{prefix}_A"].T), "b": jnp.asarray(ref[f"{prefix}_B"].T),
                                         "m": jnp.asarray(ref[f"{prefix}_m"])}}}}
    return params, lp


@pytest.mark.parametrize("prefix, rslora", [("dora", False), ("rsdora", True)])
def test_forward_gradients_and_merge_equal_peft(ref, prefix, rslora):
    params, lp = tree_from(ref, prefix)
    adapter = lrj.dora(rank=4, alpha=8.0, targets=r".*/proj/kernel", rslora=rslora)
    x, probe = jnp.asarray(ref[f"{prefix}_x"]), jnp.asarray(ref[f"{prefix}_probe"])
    y = lrj.linen.apply(Proj(), adapter, params, lp, x)
    np.testing.assert_allclose(y, ref[f"{prefix}_y"], atol=3e-6, rtol=1e-5)
    grads = jax.grad(lambda lp: jnp.sum(lrj.linen.apply(Proj(), adapter, params, lp, x) * probe))(lp)["params"]["proj"]["kernel"]
    np.testing.assert_allclose(grads["a"], ref[f"{prefix}_grad_A"].T, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(grads["b"], ref[f"{prefix}_grad_B"].T, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(grads["m"], ref[f"{prefix}_grad_m"], atol=2e-5, rtol=1e-4)
    merged = adapter.merge(params, lp)["params"]["proj"]["kernel"]
    np.testing.assert_allclose(merged, ref[f"{prefix}_merged_W"].T, atol=2e-6)


def test_magnitude_init_is_peft_row_norm(ref):
    params = {"params": {"proj": {"kernel": jnp.asarray(ref["dora_init_W"].T)}}}
    lp = lrj.dora(rank=4, alpha=8.0, targets=".*").init(jax.random.key(0), params)
    np.testing.assert_allclose(lp["params"]["proj"]["kernel"]["m"], ref["dora_init_m"], rtol=1e-6)
    assert not jnp.any(lp["params"]["proj"]["kernel"]["b"])


def test_factored_norm_equals_dense_norm():
    key = jax.random.key(0)
    w, a, b = (jax.random.normal(k, s) for k, s in zip(jax.random.split(key, 3), [(6, 5, 7), (6, 5, 3), (3, 7)]))
    dense = jnp.linalg.norm((w + 0.7 * jnp.einsum("ijr,ro->ijo", a, b)).reshape(30, 7), axis=0)
    np.testing.assert_allclose(lrj.adapters.dora.column_norms(w, a, b, 0.7, 2), dense, rtol=1e-5)


def test_undetached_norm_gives_the_papers_full_gradient():
    """With detach_norm=False the factored forward is exactly W' = m V / ||V||: its gradient is
    the gradient through the differentiable merge."""
    model = Proj()
    x = jax.random.normal(jax.random.key(0), (4, 24))
    params = model.init(jax.random.key(1), x)
    adapter = lrj.dora(rank=3, alpha=6.0, targets=".*/kernel", detach_norm=False)
    lp = jax.tree.map(lambda v: v + 0.2, adapter.init(jax.random.key(2), params))
    g = jax.grad(lambda lp: jnp.sum(jnp.sin(lrj.linen.apply(model, adapter, params, lp, x))))(lp)
    g_ref = jax.grad(lambda lp: jnp.sum(jnp.sin(model.apply(adapter.merge(params, lp), x))))(lp)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-5, rtol=1e-4), g, g_ref)
    detached = lrj.dora(rank=3, alpha=6.0, targets=".*/kernel")
    g_det = jax.grad(lambda lp: jnp.sum(jnp.sin(lrj.linen.apply(model, detached, params, lp, x))))(lp)
    diff = g_det["params"]["proj"]["kernel"]["a"] - g["params"]["proj"]["kernel"]["a"]
    assert float(jnp.abs(diff).max()) > 1e-4  # the detached norm changes the gradient


def test_unmerge_needs_and_uses_the_norms():
    model = Proj()
    x = jnp.ones((2, 24))
    params = model.init(jax.random.key(1), x)
    adapter = lrj.dora(rank=3, targets=".*/kernel")
    lp = jax.tree.map(lambda v: v + 0.1, adapter.init(jax.random.key(2), params))
    norms = lrj.dora_weight_norms(adapter, params, lp)
    merged = adapter.merge(params, lp)
    back = adapter.unmerge(merged, lp, norms=norms)
    np.testing.assert_allclose(back["params"]["proj"]["kernel"], params["params"]["proj"]["kernel"], atol=1e-6)
    with pytest.raises(ValueError, match="DoRA's merge is not invertible from merged weights alone"):
        adapter.unmerge(merged, lp)


def test_scanned_dora_equals_merged():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return x + nn.tanh(nn.Dense(8, name="mlp")(x)), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.scan(nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(name="layers")(x, None)[0]

    model, x = Stack(), jax.random.normal(jax.random.key(0), (4, 8))
    params = model.init(jax.random.key(1), x)
    adapter = lrj.dora(rank=2, targets=".*/kernel", layouts=lrj.linen.kernel_layouts(model, x))
    lp = jax.tree.map(lambda v: v + 0.1, adapter.init(jax.random.key(2), params))
    assert lp["params"]["layers"]["mlp"]["kernel"]["m"].shape == (3, 8)
    np.testing.assert_allclose(jax.jit(lambda lp: lrj.linen.apply(model, adapter, params, lp, x))(lp),
                               model.apply(adapter.merge(params, lp), x), atol=1e-5)


def test_dora_on_a_quantised_base():
    from test_quantized_base import Int8Columns

    model = Proj()
    x = jax.random.normal(jax.random.key(0), (4, 24))
    params = model.init(jax.random.key(1), x)
    qparams = {"params": {"proj": {**params["params"]["proj"], "kernel": Int8Columns.quantize(params["params"]["proj"]["kernel"])}}}
    dparams = {"params": {"proj": {**params["params"]["proj"], "kernel": qparams["params"]["proj"]["kernel"].dequantize()}}}
    adapter = lrj.dora(rank=2, targets=".*/kernel")
    lp = jax.tree.map(lambda v: v + 0.1, adapter.init(jax.random.key(2), qparams))
    np.testing.assert_allclose(lrj.linen.apply(model, adapter, qparams, lp, x),
                               lrj.linen.apply(model, adapter, dparams, lp, x), atol=1e-6)


def test_qdora_on_a_scanned_nf4_base_equals_dora_on_the_dequantised_base():
    """QDoRA: the magnitude init, forward, gradients and merge all see the dequantised NF4 kernel."""
    from test_quantized_base import ScanStack

    from lowrank_jax import quant

    model, x = ScanStack(d=128, layers=3), jax.random.normal(jax.random.key(0), (4, 128))
    variables = model.init(jax.random.key(1), x)
    qvars = quant.quantize_params(variables, r".*/kernel", stack_axes=1)
    dvars = quant.dequantize_params(qvars, jnp.float32)
    adapter = lrj.dora(rank=4, targets=r".*/kernel", layouts=lrj.linen.kernel_layouts(model, x))
    lp_q, lp_d = adapter.init(jax.random.key(2), qvars), adapter.init(jax.random.key(2), dvars)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-6), lp_q, lp_d)  # m = ||dequant(W)||
    lp = jax.tree.map(lambda v: v + 0.05, lp_q)

    def loss(lp, v):
        return jnp.sum(jnp.sin(lrj.linen.apply(model, adapter, v, lp, x)))

    (lq, gq), (ld, gd) = jax.jit(jax.value_and_grad(loss))(lp, qvars), jax.value_and_grad(loss)(lp, dvars)
    np.testing.assert_allclose(lq, ld, rtol=1e-5)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5), gq, gd)
    merged = adapter.merge(dvars, lp)
    np.testing.assert_allclose(lrj.linen.apply(model, adapter, qvars, lp, x), model.apply(merged, x), atol=1e-5)


def test_dropout_follows_peft_the_magnitude_rescales_the_dropped_inputs_base_output():
    """peft's DoRA with active dropout: y + (g - 1) (x_d W) + g s (x_d A) B, bias outside, x_d = dropout(x)."""
    from lowrank_jax.adapters import base

    k = jax.random.split(jax.random.key(0), 5)
    x, w, bias = jax.random.normal(k[0], (6, 12)), jax.random.normal(k[1], (12, 5)), jax.random.normal(k[2], (5,))
    params = {"params": {"proj": {"kernel": w, "bias": bias}}}
    adapter = lrj.dora(rank=3, alpha=6.0, targets=".*/kernel", dropout=0.3)
    leaves = jax.tree.map(lambda v: v + 0.2, adapter.init(k[3], params))["params"]["proj"]["kernel"]
    y = x @ w + bias
    site = lrj.Site("linear", w, 1, bias=bias)
    got = adapter.apply(leaves, site, x, y, path="params/proj/kernel", dropout_key=k[4])
    xd = base.dropout(k[4], x, 0.3)
    assert 0 < int(jnp.sum(xd == 0)) < xd.size
    s = 2.0
    a, b, m = leaves["a"], leaves["b"], leaves["m"]
    g = m / jnp.linalg.norm(w + s * a @ b, axis=0)
    np.testing.assert_allclose(got, y + (g - 1) * (xd @ w) + g * (s * (xd @ a @ b)), rtol=1e-5, atol=1e-5)
    no_drop = adapter.apply(leaves, site, x, y, path="params/proj/kernel")  # inactive: the merged layer
    np.testing.assert_allclose(no_drop, x @ (g * (w + s * a @ b)) + bias, rtol=1e-5, atol=1e-5)


def test_dora_rejects_embeddings():
    params = {"params": {"emb": {"embedding": jnp.ones((10, 4))}}}
    with pytest.raises(ValueError, match="DoRA supports linear layers only; 'params/emb/embedding' is an embedding"):
        lrj.dora(rank=2, targets=".*").init(jax.random.key(0), params)


def test_dora_rejects_offset_inits():
    for init in ("pissa", "pissa_niter_4", "olora", "lora_ga"):
        with pytest.raises(ValueError, match="offset inits .* are for lrj.lora only"):
            lrj.dora(init=init)
