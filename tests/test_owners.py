"""One owner per concept: the kernel layout is ``tree.Layout``, a quantised weight is ``tree.is_quantized``,
and ``lowrank_jax.io`` loads its submodules lazily (``io.peft`` does not pull in the reference models)."""

import importlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_jax as lrj
from lowrank_jax import quant, tree
galore_lib = importlib.import_module("lowrank_jax.optim.galore")  # `lrj.optim.galore` is the function


def _run(tx, params, grads):
    state = tx.init(params)
    step = jax.jit(tx.update)
    out = []
    for g in grads:
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
        out.append(params)
    return out, state


def _stacked_problem(steps=4):
    key = jax.random.key(0)
    params = {"stack": {"kernel": jax.random.normal(key, (3, 6, 4))}, "bias": jnp.zeros(4)}
    keys = jax.random.split(jax.random.key(1), steps)
    grads = [{"stack": {"kernel": jax.random.normal(k, (3, 6, 4))}, "bias": jnp.full((4,), 0.1)} for k in keys]
    return params, grads


@pytest.mark.parametrize("proj_type", ["std", "left", "full"])
def test_galore_with_a_tree_layout_equals_the_dimension_numbers(proj_type):
    params, grads = _stacked_problem()
    common = dict(rank=2, update_proj_gap=2, proj_type=proj_type)
    by_layout, state_l = _run(lrj.optim.galore(1e-2, dimension_numbers={"stack/kernel": tree.Layout(1, 1)}, **common),
                              params, grads)
    by_dims, state_d = _run(lrj.optim.galore(1e-2, dimension_numbers={"stack/kernel": optax.contrib.GaLoreDimensionNumbers(
        reduction_axis=1, output_axis=2)}, **common), params, grads)
    # each scanned layer is its own [out, in] matrix: a 2-D GaLore on one slice gives that slice's trajectory
    slice0, _ = _run(lrj.optim.galore(1e-2, **common), {"kernel": params["stack"]["kernel"][0]},
                     [{"kernel": g["stack"]["kernel"][0]} for g in grads])
    assert state_l[0].inner_state.mu["stack"]["kernel"].shape == state_d[0].inner_state.mu["stack"]["kernel"].shape
    for a, b, s in zip(by_layout, by_dims, slice0):
        np.testing.assert_allclose(a["stack"]["kernel"], b["stack"]["kernel"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(a["bias"], b["bias"], rtol=0, atol=0)
        np.testing.assert_allclose(a["stack"]["kernel"][0], s["kernel"], rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(by_layout[-1]["stack"]["kernel"] - params["stack"]["kernel"]).max()) > 1e-3  # it moved


def test_galore_split_dims_is_the_layout_split():
    shape = (3, 5, 7, 2)
    layout = tree.Layout(1, 2)
    batch, rows, cols = galore_lib._split_dims(layout, "w", shape)
    stack, inputs, outputs = layout.split(shape)
    assert (batch, cols, rows) == ((0,), (1, 2), (3,))
    assert tuple(shape[a] for a in batch) == stack and tuple(shape[a] for a in cols) == inputs
    assert tuple(shape[a] for a in rows) == outputs
    assert galore_lib._default_dims(("kernel",), (6, 4)) == tree.default_layout(("kernel",), (6, 4))
    with pytest.raises(ValueError, match="does not fit"):
        galore_lib._split_dims(tree.Layout(1, 2), "w", (3, 5, 7))


def test_quantize_params_takes_a_tree_layout_for_the_stack_axes():
    w = jax.random.normal(jax.random.key(2), (2, 64, 32)) * 0.02
    params = {"layers": {"kernel": w}}
    by_int = quant.quantize_params(params, r"layers/kernel", stack_axes=1)
    for spec in (tree.Layout(1, 1), {r"layers/.*": tree.Layout(1, 1)}, lambda path, leaf: tree.Layout(1, 1)):
        by_layout = quant.quantize_params(params, r"layers/kernel", stack_axes=spec)
        assert jax.tree.structure(by_layout) == jax.tree.structure(by_int)
        for a, b in zip(jax.tree.leaves(by_layout), jax.tree.leaves(by_int)):
            np.testing.assert_array_equal(a, b)
    dense = quant.dequantize_params(by_int, jnp.float32)["layers"]["kernel"]
    assert dense.shape == (2, 64, 32) and float(jnp.abs(dense - w).max()) < 0.01
    with pytest.raises(ValueError, match="does not fit"):
        quant.quantize_params(params, r"layers/kernel", stack_axes=tree.Layout(1, 2))


def test_quant_is_quantized_is_tree_is_quantized():
    assert quant.is_quantized is tree.is_quantized
    assert quant.params.is_quantized is tree.is_quantized

    class Foreign:  # a quantised weight of another library: the protocol, not one of quant's types
        shape, dtype = (4, 2), jnp.float32

        def dequantize(self, dtype=jnp.float32):
            return jnp.ones(self.shape, dtype)

    assert quant.is_quantized(Foreign()) and quant.is_quantized(quant.nf4.quantize(jnp.ones((64, 2))))
    assert not quant.is_quantized(jnp.ones((4, 2)))
    dense = quant.dequantize_params({"w": Foreign(), "b": jnp.zeros(2)}, jnp.float32)
    np.testing.assert_array_equal(dense["w"], np.ones((4, 2), np.float32))


def test_import_io_peft_does_not_import_the_models():
    code = (
        "import sys, lowrank_jax.io.peft\n"
        "print([m for m in sys.modules if m.startswith('lowrank_jax.models')])\n"
        "from lowrank_jax.io import gguf\n"
        "import lowrank_jax.io as io\n"
        "assert io.gguf is gguf and io.peft is sys.modules['lowrank_jax.io.peft']\n"
        "assert 'lowrank_jax.models.llama' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
