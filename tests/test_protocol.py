"""Adapter protocol v2 (issue 11): leaf roles drive sharding; no target is skipped silently."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import lowrank_jax as lrj
from lowrank_jax.adapters import base


class CustomMatmul(nn.Module):
    """A layer the bridge does not know: it contracts with its kernel itself."""

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(), (x.shape[-1], 5))
        return x @ kernel


class TwoLayers(nn.Module):
    @nn.compact
    def __call__(self, x):
        return CustomMatmul(name="custom")(nn.Dense(6, name="dense")(x))


def test_custom_contraction_layer_is_refused_with_its_path():
    model = TwoLayers()
    x = jnp.ones((2, 4))
    variables = model.init(jax.random.key(0), x)
    adapter = lrj.lora(rank=2, targets=r".*/kernel")
    lp = adapter.init(jax.random.key(1), variables)
    with pytest.raises(ValueError, match=r"not executed by this call: \['params/custom/kernel'\]"):
        lrj.linen.apply(model, adapter, variables, lp, x)
    # the same model with the custom layer left out of the targets runs, and equals its merge
    adapter = lrj.lora(rank=2, targets=r".*/dense/kernel")
    lp = adapter.init(jax.random.key(1), variables)
    lp = jax.tree.map(lambda v: v + 0.1, lp)
    out = lrj.linen.apply(model, adapter, variables, lp, x)
    np.testing.assert_allclose(out, model.apply(adapter.merge(variables, lp), x), atol=1e-5)


def test_target_unused_by_the_call_is_refused():
    model = nn.Dense(3)
    x = jnp.ones((2, 4))
    variables = model.init(jax.random.key(0), x)
    adapter = lrj.lora(rank=2, targets=r".*/kernel")
    lp = adapter.init(jax.random.key(1), variables)
    with pytest.raises(ValueError, match=r"not executed by this call: \['params/kernel'\]"):
        lrj.linen.apply(model, adapter, variables, lp, x, method=lambda module, x: x)


def test_leaf_axes_expands_the_layout():
    assert base.leaf_axes(("stack", "in", "rank"), lrj.Layout(1, 2), 4) == ("stack", "in", "in", "rank")
    assert base.leaf_axes(("stack", "rank", "out"), lrj.Layout(0, 1), 3) == ("rank", "out", "out")
    assert lrj.lora().roles == {"a": ("stack", "in", "rank"), "b": ("stack", "rank", "out")}
    assert lrj.dora().roles["m"] == ("stack", "out")


def _mesh():
    return jax.make_mesh((1, 1), ("data", "model"))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_shardings_follow_the_declared_roles(method):
    mesh = _mesh()
    kernel = jnp.ones((3, 8, 6))  # a scanned stack [L, in, out]
    params = {"params": {"layers": {"proj": {"kernel": kernel}}}}
    factory = getattr(lrj, method)
    adapter = factory(rank=2, targets=r".*/kernel", layouts={"params/layers/proj/kernel": lrj.Layout(1, 1)})
    lp = adapter.init(jax.random.key(0), params)
    shardings = {"params": {"layers": {"proj": {"kernel": NamedSharding(mesh, PartitionSpec(None, "data", "model"))}}}}
    out = lrj.adapter_shardings(params, lp, shardings, adapter=adapter)["params"]["layers"]["proj"]["kernel"]
    assert out["a"].spec == PartitionSpec(None, "data", None)
    assert out["b"].spec == PartitionSpec(None, None, "model")
    if method == "dora":  # before the roles, DoRA's m failed with "no sharding rule for adapter leaf 'm'"
        assert out["m"].spec == PartitionSpec(None, "model")
        assert lp["params"]["layers"]["proj"]["kernel"]["m"].shape == (3, 6)


def test_undeclared_leaf_is_an_error_naming_it():
    mesh = _mesh()
    params = {"params": {"proj": {"kernel": jnp.ones((8, 6))}}}
    adapter = lrj.lora(rank=2, targets=r".*/kernel")
    lp = adapter.init(jax.random.key(0), params)
    lp["params"]["proj"]["kernel"]["gate"] = jnp.ones((6,))
    shardings = {"params": {"proj": {"kernel": NamedSharding(mesh, PartitionSpec("data", "model"))}}}
    with pytest.raises(ValueError, match=r"no axis roles declared for adapter leaf 'gate' at 'params/proj/kernel'"):
        lrj.adapter_shardings(params, lp, shardings, adapter=adapter)
