"""Per-call adapter inputs (``Adapter.call_args``): the bridges hand them to every site, under
jit, scan and remat, in linen and NNX, and ``combine`` forwards them to the component that declares them.

The probe adapter is LoRA whose term is kept only on the rows ``row_on[i] == 1`` of the batch:
rows on must equal the LoRA model, rows off the base model.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lrj
from test_bridges import IDS, linen_setup, nnx_setup


def row_gated(adapter):
    """``adapter`` whose term applies to the batch rows where the call input ``row_on`` is 1."""

    def apply_fn(leaves, site, x, y, *, path, dropout_key=None, row_on):
        adapted = adapter.apply(leaves, site, x, y, path=path, dropout_key=dropout_key)
        gate = row_on.reshape(row_on.shape + (1,) * (y.ndim - 1)).astype(y.dtype)
        return y + gate * (adapted - y)

    return adapter._replace(apply=apply_fn, call_args=frozenset({"row_on"}))


ROW_ON = jnp.array([1, 0])


def check_rows(mixed, adapted, base):
    np.testing.assert_allclose(mixed[0], adapted[0], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(mixed[1], base[1], atol=2e-5, rtol=1e-5)
    assert float(jnp.abs(adapted[1] - base[1]).max()) > 1e-2  # the rows tell the two apart


@pytest.mark.parametrize("scan", [False, True])
def test_linen_call_args_reach_every_site(scan):
    model, variables, adapter, lp = linen_setup(scan)
    gated = row_gated(adapter)
    mixed = jax.jit(lambda lp, on: lrj.linen.apply(model, gated, variables, lp, IDS, row_on=on))(lp, ROW_ON)
    adapted = lrj.linen.apply(model, adapter, variables, lp, IDS)
    check_rows(mixed, adapted, model.apply(variables, IDS))


@pytest.mark.parametrize("scan", [False, True])
def test_nnx_call_args_reach_every_site(scan):
    model, params, adapter, lp = nnx_setup(scan)
    gated = row_gated(adapter)
    mixed = jax.jit(lambda lp, on: lrj.nnx.apply(model, gated, lp, IDS, row_on=on))(lp, ROW_ON)
    check_rows(mixed, lrj.nnx.apply(model, adapter, lp, IDS), model(IDS))


def test_combine_forwards_call_args_to_the_component_that_declares_them():
    model, variables, _, _ = linen_setup(False)
    layouts = lrj.linen.kernel_layouts(model, IDS)
    gated = row_gated(lrj.lora(rank=2, alpha=4.0, targets=r".*/mlp/kernel", layouts=layouts))
    plain = lrj.lora(rank=2, alpha=4.0, targets=r".*/q/kernel", layouts=layouts)
    both = lrj.combine(gated, plain)
    assert both.call_args == frozenset({"row_on"})
    lp = jax.tree.map(lambda v: v + 0.3, both.init(jax.random.key(1), variables))
    mixed = lrj.linen.apply(model, both, variables, lp, IDS, row_on=ROW_ON)
    q_only = {"params": {k: {"q": v["q"]} for k, v in lp["params"].items() if k.startswith("layers")}}
    check_rows(mixed, lrj.linen.apply(model, both, variables, lp, IDS, row_on=jnp.ones(2)), lrj.linen.apply(model, plain, variables, q_only, IDS))


def test_call_args_are_not_passed_to_the_model():
    model, variables, adapter, lp = linen_setup(False)
    with pytest.raises(TypeError, match="row_on"):  # an adapter without the input leaves it to the model
        lrj.linen.apply(model, adapter, variables, lp, IDS, row_on=ROW_ON)
