"""LoRA on a quantised base: kernels that implement the ``lrj.tree.is_quantized`` protocol are
dequantised inside each layer call (linen and NNX, scan and remat included)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import lowrank_jax as lrj
from lowrank_jax.tree import is_quantized


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Int8Columns:
    """A minimal quantised weight: int8 codes with one absmax scale per output column."""

    codes: jax.Array
    scale: jax.Array
    dtype: jnp.dtype = dataclasses.field(metadata=dict(static=True), default=jnp.float32)

    @property
    def shape(self):
        return self.codes.shape

    @classmethod
    def quantize(cls, w):
        scale = jnp.max(jnp.abs(w), axis=-2, keepdims=True) / 127.0
        return cls(jnp.round(w / scale).astype(jnp.int8), scale, w.dtype)

    def dequantize(self, dtype=None):
        return (self.codes.astype(jnp.float32) * self.scale).astype(dtype or self.dtype)


def quantize_kernels(params):
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: Int8Columns.quantize(x) if kp[-1].key == "kernel" else x, params)


def dequantize_kernels(params):
    return jax.tree.map(lambda x: x.dequantize() if is_quantized(x) else x, params, is_leaf=is_quantized)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        return x + nn.tanh(nn.Dense(16, name="mlp")(nn.Dense(16, name="proj")(x))), None


class Stack(nn.Module):
    scan: bool

    @nn.compact
    def __call__(self, x):
        if self.scan:
            x, _ = nn.scan(nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(name="layers")(x, None)
        else:
            for i in range(3):
                x, _ = Block(name=f"layers_{i}")(x)
        return x


def test_linen_quantised_base_equals_dequantised_base():
    x = jax.random.normal(jax.random.key(0), (4, 16))
    for scan in (False, True):
        model = Stack(scan)
        variables = model.init(jax.random.key(1), x)
        qvars = quantize_kernels(variables)
        dvars = dequantize_kernels(qvars)
        adapter = lrj.lora(rank=2, targets=r".*/proj/kernel", layouts=lrj.linen.kernel_layouts(model, x))
        lp = jax.tree.map(lambda v: v + 0.1, adapter.init(jax.random.key(2), qvars))  # init sees quantised leaves
        np.testing.assert_allclose(lrj.linen.apply_base(model, qvars, x), model.apply(dvars, x), atol=1e-6)
        run = jax.jit(lambda lp, v: lrj.linen.apply(model, adapter, v, lp, x))
        np.testing.assert_allclose(run(lp, qvars), run(lp, dvars), atol=1e-6)
        g = jax.grad(lambda lp: jnp.sum(lrj.linen.apply(model, adapter, qvars, lp, x) ** 2))(lp)
        g_ref = jax.grad(lambda lp: jnp.sum(lrj.linen.apply(model, adapter, dvars, lp, x) ** 2))(lp)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g, g_ref)
        merged = adapter.merge(qvars, lp)  # merge dequantises: the result is dense
        np.testing.assert_allclose(lrj.linen.apply_base(model, merged, x), run(lp, dvars), atol=1e-5)


def test_trainable_summary_counts_quantised_weights_at_logical_size():
    params = {"params": {"d": {"kernel": Int8Columns.quantize(jnp.ones((8, 4)))}}}
    lp = lrj.lora(rank=2, targets=".*").init(jax.random.key(0), params)
    assert lrj.trainable_summary(params, lp)["all_params"] == 32 + 24


class NNXStack(nnx.Module):
    def __init__(self, rngs):
        self.proj = nnx.Linear(16, 16, rngs=rngs)
        self.mlp = nnx.Linear(16, 16, rngs=rngs)

    def __call__(self, x):
        return x + nnx.tanh(self.mlp(self.proj(x)))


def test_nnx_quantised_base_equals_dequantised_base():
    x = jax.random.normal(jax.random.key(0), (4, 16))
    model = NNXStack(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    dense = nnx.merge(graphdef, state, copy=True)
    for layer in (model.proj, model.mlp):
        layer.kernel.set_value(Int8Columns.quantize(layer.kernel.get_value()))
    for layer, ref in ((dense.proj, model.proj), (dense.mlp, model.mlp)):
        layer.kernel.set_value(ref.kernel.get_value().dequantize())
    adapter = lrj.lora(rank=2, targets=r"proj/kernel")
    lp = jax.tree.map(lambda v: v + 0.1, adapter.init(jax.random.key(2), lrj.nnx.params(model)))
    np.testing.assert_allclose(lrj.nnx.apply_base(model, x), dense(x), atol=1e-6)
    np.testing.assert_allclose(jax.jit(lambda lp: lrj.nnx.apply(model, adapter, lp, x))(lp),
                               lrj.nnx.apply(dense, adapter, lp, x), atol=1e-6)
    assert is_quantized(model.mlp.kernel.get_value())  # the model itself is untouched


# ---------------------------------------------------------------- QLoRA: NF4 base (lrj.quant)


class ScanStack(nn.Module):
    d: int = 512
    layers: int = 8
    remat: bool = True

    @nn.compact
    def __call__(self, x):
        class Layer(nn.Module):
            @nn.compact
            def __call__(self, x, _):
                return x + nn.tanh(nn.Dense(self_d, use_bias=False, name="proj")(x)), None

        self_d = self.d
        block = nn.remat(Layer) if self.remat else Layer
        return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.layers)(name="layers")(x, None)[0]


def test_qlora_on_scanned_nf4_base_equals_dequantised_base():
    from lowrank_jax import quant

    model, x = ScanStack(d=128, layers=3), jax.random.normal(jax.random.key(0), (4, 128))
    variables = model.init(jax.random.key(1), x)
    qvars = quant.quantize_params(variables, r".*/kernel", stack_axes=1)
    kernel = qvars["params"]["layers"]["proj"]["kernel"]
    assert lrj.tree.shape_of(kernel) == (3, 128, 128) and kernel.batch_shape == (3,)
    dvars = quant.dequantize_params(qvars, jnp.float32)
    adapter = lrj.lora(rank=4, targets=r".*/kernel", layouts=lrj.linen.kernel_layouts(model, x))
    lp = jax.tree.map(lambda v: v + 0.05, adapter.init(jax.random.key(2), qvars))
    y = jax.jit(lambda lp: lrj.linen.apply(model, adapter, qvars, lp, x))(lp)
    np.testing.assert_allclose(y, lrj.linen.apply(model, adapter, dvars, lp, x), atol=1e-5)
    np.testing.assert_allclose(lrj.linen.apply_base(model, qvars, x), model.apply(dvars, x), atol=1e-5)


def test_qlora_step_dequantises_layer_by_layer_under_remat():
    """XLA's memory analysis: with scan + remat the step never holds every layer's dense kernel;
    without remat the backward pass keeps each layer's dequantised kernel (L x d x d floats)."""
    from lowrank_jax import quant

    d, layers = 512, 8
    x = jnp.ones((16, d))
    dense_bytes = layers * d * d * 4
    temps = {}
    for remat in (True, False):
        model = ScanStack(d=d, layers=layers, remat=remat)
        variables = model.init(jax.random.key(1), x)
        qvars = quant.quantize_params(variables, r".*/kernel", stack_axes=1)
        adapter = lrj.lora(rank=8, targets=r".*/kernel", layouts=lrj.linen.kernel_layouts(model, x))
        lp = adapter.init(jax.random.key(2), qvars)
        step = jax.jit(jax.grad(lambda lp, v: jnp.sum(lrj.linen.apply(model, adapter, v, lp, x) ** 2)))
        compiled = step.lower(lp, qvars).compile()
        temps[remat] = compiled.memory_analysis().temp_size_in_bytes
        arg_bytes = compiled.memory_analysis().argument_size_in_bytes
        assert arg_bytes < 0.2 * dense_bytes  # the base enters the step in 4-bit form (~4.13 bits/param)
    assert temps[True] < 0.25 * dense_bytes, temps
    assert temps[False] > dense_bytes, temps
