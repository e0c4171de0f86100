"""Factored execution inside unchanged Flax models (linen and NNX).

The invariant: running the model with the adapter in factored form equals
running it on the merged weights ``W + s A B``, for outputs and for gradients
w.r.t. the adapter tree, for every supported layer, stacked with scan and
wrapped in remat.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lowrank_jax as lrj

IDS = jnp.arange(12).reshape(2, 6) % 20


def randomize(tree, seed=1, std=0.2):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


class LinenBlock(nn.Module):
    """Every supported linen layer kind, attention-shaped."""

    @nn.compact
    def __call__(self, x, _=None):
        q = nn.DenseGeneral((2, 4), name="q")(x)  # [d, N, H]: Layout(0, 1)
        o = nn.DenseGeneral(8, axis=(-2, -1), name="o")(q)  # [N, H, d]: Layout(0, 2)
        e = nn.Einsum((8, 2, 4), "btd,dnh->bnth", name="e")(o)  # output axes permuted
        e = jnp.swapaxes(e, 1, 2).reshape(x.shape[:-1] + (8,))
        return x + nn.tanh(nn.Dense(8, name="mlp")(e)), None


class LinenModel(nn.Module):
    scan: bool = False

    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(20, 8, name="embed")
        x = emb(ids)
        if self.scan:
            stack = nn.scan(nn.remat(LinenBlock), variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
            x, _ = stack(name="layers")(x, None)
        else:
            for i in range(3):
                x, _ = LinenBlock(name=f"layers_{i}")(x)
        return emb.attend(x)  # tied output head


def linen_setup(scan):
    model = LinenModel(scan=scan)
    variables = model.init(jax.random.key(0), IDS)
    adapter = lrj.lora(rank=2, alpha=4.0, targets=r".*/(kernel|embedding)", layouts=lrj.linen.kernel_layouts(model, IDS))
    lp = randomize(adapter.init(jax.random.key(1), variables))
    return model, variables, adapter, lp


@pytest.mark.parametrize("scan", [False, True])
def test_linen_layouts_are_discovered(scan):
    layouts = lrj.linen.kernel_layouts(LinenModel(scan=scan), IDS)
    prefix = "params/layers" if scan else "params/layers_0"
    stack = int(scan)
    assert layouts[f"{prefix}/q/kernel"] == lrj.Layout(stack, 1)
    assert layouts[f"{prefix}/o/kernel"] == lrj.Layout(stack, 2)
    assert layouts[f"{prefix}/e/kernel"] == lrj.Layout(stack, 1)
    assert layouts[f"{prefix}/mlp/kernel"] == lrj.Layout(stack, 1)
    assert layouts["params/embed/embedding"] == lrj.Layout(0, 1)


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("use_jit", [False, True])
def test_linen_factored_equals_merged(scan, use_jit):
    model, variables, adapter, lp = linen_setup(scan)
    run = lambda lp: lrj.linen.apply(model, adapter, variables, lp, IDS)  # noqa: E731
    run = jax.jit(run) if use_jit else run
    y = run(lp)
    y_merged = model.apply(adapter.merge(variables, lp), IDS)
    y_base = model.apply(variables, IDS)
    assert float(jnp.abs(y - y_base).max()) > 1e-2  # the adapter does something
    np.testing.assert_allclose(y, y_merged, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_linen_gradients_equal_gradients_through_merge(scan):
    model, variables, adapter, lp = linen_setup(scan)
    loss = lambda y: jnp.mean(jax.nn.log_softmax(y)[..., 0])  # noqa: E731
    g = jax.jit(jax.grad(lambda lp: loss(lrj.linen.apply(model, adapter, variables, lp, IDS))))(lp)
    g_ref = jax.jit(jax.grad(lambda lp: loss(model.apply(adapter.merge(variables, lp), IDS))))(lp)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g, g_ref)


def test_linen_zero_b_gives_base_model_exactly():
    model = LinenModel()
    variables = model.init(jax.random.key(0), IDS)
    adapter = lrj.lora(rank=2, targets=r".*/(mlp|q)/kernel", layouts=lrj.linen.kernel_layouts(model, IDS))
    lp = adapter.init(jax.random.key(1), variables)  # b = 0
    np.testing.assert_array_equal(lrj.linen.apply(model, adapter, variables, lp, IDS), model.apply(variables, IDS))


def test_linen_compute_dtype_follows_layer():
    model = nn.Dense(8, dtype=jnp.bfloat16)
    x = jnp.ones((3, 16))
    variables = model.init(jax.random.key(0), x)
    adapter = lrj.lora(rank=4, targets=".*/kernel")
    lp = randomize(adapter.init(jax.random.key(1), variables))
    with jax.numpy_dtype_promotion("strict"):  # no silent promotion inside the adapter branch
        y = lrj.linen.apply(model, adapter, variables, lp, x)
        jax.grad(lambda lp: jnp.sum(lrj.linen.apply(model, adapter, variables, lp, x).astype(jnp.float32)))(lp)
    assert y.dtype == jnp.bfloat16
    assert lp["params"]["kernel"]["a"].dtype == jnp.float32
    np.testing.assert_allclose(y.astype(jnp.float32), model.apply(adapter.merge(variables, lp), x).astype(jnp.float32), rtol=2e-2, atol=2e-2)


def test_linen_dropout_only_on_adapter_branch():
    model = nn.Dense(64)
    x = jax.random.normal(jax.random.key(0), (4, 32))
    variables = model.init(jax.random.key(0), x)
    adapter = lrj.lora(rank=4, alpha=4.0, targets=".*/kernel", dropout=0.5)
    lp = randomize(adapter.init(jax.random.key(1), variables))
    base = model.apply(variables, x)
    eval_out = lrj.linen.apply(model, adapter, variables, lp, x)  # no rng: no dropout
    np.testing.assert_allclose(eval_out, model.apply(adapter.merge(variables, lp), x), atol=1e-5)
    a = lrj.linen.apply(model, adapter, variables, lp, x, dropout_rng=jax.random.key(7))
    b = lrj.linen.apply(model, adapter, variables, lp, x, dropout_rng=jax.random.key(7))
    c = lrj.linen.apply(model, adapter, variables, lp, x, dropout_rng=jax.random.key(8))
    np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(a - c).max()) > 1e-3
    # the base path is untouched: with b = 0 dropout changes nothing
    zero_b = jax.tree_util.tree_map_with_path(lambda kp, v: jnp.zeros_like(v) if kp[-1].key == "b" else v, lp)
    np.testing.assert_array_equal(lrj.linen.apply(model, adapter, variables, zero_b, x, dropout_rng=jax.random.key(7)), base)
    # inverted dropout is unbiased: the mean over masks is the no-dropout output
    mean = jnp.mean(jnp.stack([lrj.linen.apply(model, adapter, variables, lp, x, dropout_rng=jax.random.key(i)) - base for i in range(400)]), 0)
    np.testing.assert_allclose(mean, eval_out - base, atol=0.1 * float(jnp.abs(eval_out - base).max()))


def test_linen_dropout_masks_differ_across_scanned_layers():
    model, variables, _, _ = linen_setup(scan=True)
    adapter = lrj.lora(rank=2, targets=r".*/mlp/kernel", dropout=0.3, layouts=lrj.linen.kernel_layouts(model, IDS))
    lp = adapter.init(jax.random.key(1), variables)
    injected = lrj.linen.inject(adapter, variables, lp, dropout_rng=jax.random.key(3))
    keys = injected["params"]["layers"]["mlp"]["kernel" + lrj.linen.SUFFIX]["dropout_key"]
    assert keys.shape == (3,)
    data = jax.random.key_data(keys)
    assert len({tuple(np.asarray(d).ravel()) for d in data}) == 3


def test_linen_unsupported_einsum_is_a_clear_error():
    class PerHead(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Einsum((2, 4, 4), "bnd,ndh->bnh")(x)  # n is shared by input, kernel and output

    x = jnp.ones((3, 2, 4))
    with pytest.raises(NotImplementedError, match=r"'bnd,ndh->bnh'.*per-head shared axes"):
        lrj.linen.kernel_layouts(PerHead(), x)


# ---------------------------------------------------------------- NNX


class NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.q = nnx.LinearGeneral(8, (2, 4), rngs=rngs)
        self.o = nnx.LinearGeneral((2, 4), 8, axis=(-2, -1), rngs=rngs)
        self.e = nnx.Einsum("btd,dnh->btnh", (8, 2, 4), rngs=rngs)
        self.mlp = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, x):
        e = self.e(self.o(self.q(x)))
        return x + nnx.tanh(self.mlp(e.reshape(x.shape)))


class NNXModel(nnx.Module):
    def __init__(self, rngs, scan=False):
        self.embed = nnx.Embed(20, 8, rngs=rngs)
        self.scan = scan
        if scan:
            @nnx.split_rngs(splits=3)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return NNXBlock(rngs)

            self.layers = make(rngs)
        else:
            self.layers = nnx.List([NNXBlock(rngs) for _ in range(3)])

    def __call__(self, ids):
        x = self.embed(ids)
        if self.scan:
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            @nnx.remat
            def body(x, block):
                return block(x)

            x = body(x, self.layers)
        else:
            for block in self.layers:
                x = block(x)
        return self.embed.attend(x)


def nnx_setup(scan):
    model = NNXModel(nnx.Rngs(0), scan=scan)
    params = lrj.nnx.params(model)
    adapter = lrj.lora(rank=2, alpha=4.0, targets=r".*/(kernel|embedding)", layouts=lrj.nnx.kernel_layouts(model))
    lp = randomize(adapter.init(jax.random.key(1), params))
    return model, params, adapter, lp


def merged_model(model, merged_params):
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, merged_params, rest, copy=True)


@pytest.mark.parametrize("scan", [False, True])
def test_nnx_factored_equals_merged_and_model_unchanged(scan):
    model, params, adapter, lp = nnx_setup(scan)
    before_types = {p: type(m) for p, m in nnx.iter_modules(model)}
    y = jax.jit(lambda lp: lrj.nnx.apply(model, adapter, lp, IDS))(lp)
    y_merged = merged_model(model, adapter.merge(params, lp))(IDS)
    assert float(jnp.abs(y - model(IDS)).max()) > 1e-2
    np.testing.assert_allclose(y, y_merged, atol=2e-5, rtol=1e-5)
    assert {p: type(m) for p, m in nnx.iter_modules(model)} == before_types
    assert not any(hasattr(m, "lrj_a") for _, m in nnx.iter_modules(model))


@pytest.mark.parametrize("scan", [False, True])
def test_nnx_gradients_equal_gradients_through_merge(scan):
    model, params, adapter, lp = nnx_setup(scan)
    loss = lambda y: jnp.mean(jax.nn.log_softmax(y)[..., 0])  # noqa: E731
    g = jax.jit(jax.grad(lambda lp: loss(lrj.nnx.apply(model, adapter, lp, IDS))))(lp)

    def via_merge(lp):
        return loss(merged_model(model, adapter.merge(params, lp))(IDS))

    g_ref = jax.grad(via_merge)(lp)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g, g_ref)


def test_nnx_layouts_are_discovered():
    layouts = lrj.nnx.kernel_layouts(NNXModel(nnx.Rngs(0), scan=True))
    assert layouts["layers/q/kernel"] == lrj.Layout(1, 1)
    assert layouts["layers/o/kernel"] == lrj.Layout(1, 2)
    assert layouts["layers/e/kernel"] == lrj.Layout(1, 1)
    assert layouts["embed/embedding"] == lrj.Layout(0, 1)


def test_nnx_target_that_is_not_a_layer_kernel():
    model = NNXModel(nnx.Rngs(0))
    adapter = lrj.lora(rank=1, targets=r"layers/0/q/bias")
    lp = adapter.init(jax.random.key(0), lrj.nnx.params(model))
    with pytest.raises(ValueError, match=r"'layers/0/q/bias' is not the kernel of an nnx.Linear.*found LinearGeneral"):
        lrj.nnx.apply(model, adapter, lp, IDS)
    wrong = {"layers": {0: {"mlp": {"kernel": {"a": jnp.ones((4, 1)), "b": jnp.ones((1, 8))}}}}}
    with pytest.raises(ValueError, match=r"adapter leaves for 'layers/0/mlp/kernel' do not fit the parameter"):
        lrj.nnx.apply(model, adapter, wrong, IDS)


# ---------------------------------------------------------------- cost


def test_factored_step_has_no_dense_weight_gradient():
    """XLA's FLOP count (deterministic): LoRA's step is ~2/3 of full fine-tuning's, merge-then-call ~1x."""
    d, layers = 256, 4

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(layers):
                x = nn.relu(nn.Dense(d, use_bias=False)(x))
            return x

    model, x = Stack(), jnp.ones((512, d))
    variables = model.init(jax.random.key(0), x)
    adapter = lrj.lora(rank=8, targets=".*/kernel")
    lp = adapter.init(jax.random.key(1), variables)

    def flops(fn, arg):
        return jax.jit(jax.grad(fn)).lower(arg).compile().cost_analysis()["flops"]

    full = flops(lambda v: jnp.sum(model.apply(v, x) ** 2), variables)
    factored = flops(lambda lp: jnp.sum(lrj.linen.apply(model, adapter, variables, lp, x) ** 2), lp)
    merged = flops(lambda lp: jnp.sum(model.apply(adapter.merge(variables, lp), x) ** 2), lp)
    assert factored / full < 0.72, factored / full
    assert merged / full > 0.95, merged / full


def test_train_step_helper_trains_only_the_adapter():
    model = nn.Dense(4)
    x, target = jax.random.normal(jax.random.key(0), (32, 8)), jax.random.normal(jax.random.key(1), (32, 4))
    variables = model.init(jax.random.key(2), x)
    adapter = lrj.lora(rank=2, alpha=2.0, targets=".*/kernel")
    lp = adapter.init(jax.random.key(3), variables)
    opt = optax.adam(3e-2)

    def loss_fn(lp, variables, batch, rng):
        xb, yb = batch
        return jnp.mean((lrj.linen.apply(model, adapter, variables, lp, xb, dropout_rng=rng) - yb) ** 2)

    step = jax.jit(lrj.make_train_step(loss_fn, opt, adapter=adapter, penalty=1e-3))
    state = opt.init(lp)
    first = None
    for i in range(60):
        lp, state, metrics = step(lp, state, variables, (x, target), jax.random.key(i))
        first = first if first is not None else float(metrics["loss"])
    assert float(metrics["loss"]) < 0.8 * first
    assert float(metrics["penalty"]) > 0
    np.testing.assert_allclose(metrics["objective"], metrics["loss"] + 1e-3 * metrics["penalty"], rtol=1e-6)
    with pytest.raises(ValueError, match="`penalty` > 0 needs the `adapter`"):
        lrj.make_train_step(loss_fn, opt, penalty=0.1)
