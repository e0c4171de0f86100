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
