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
    assert lrj.lora().roles == {"a": lrj.Leaf(("stack", "in", "rank")), "b": lrj.Leaf(("stack", "rank", "out"))}
    assert lrj.dora().roles["m"] == lrj.Leaf(("stack", "out"), trainable=True)


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


# ----------------------------------------------------------------------------- trainable and frozen leaves

def _dense_model():
    model = nn.Dense(5)
    x = jax.random.normal(jax.random.key(3), (4, 6))
    return model, x, model.init(jax.random.key(0), x)


def test_split_and_join_partition_by_declared_trainability():
    model, x, variables = _dense_model()
    adapter = lrj.freeze(lrj.lora(rank=2), {"a"})
    assert adapter.roles["a"] == lrj.Leaf(("stack", "in", "rank"), trainable=False)
    assert adapter.config["frozen"] == ["a"]
    lp = adapter.init(jax.random.key(1), variables)
    trainable, frozen = lrj.split(adapter, lp)
    assert jax.tree.map(jnp.shape, trainable) == {"params": {"kernel": {"b": (2, 5)}}}
    assert jax.tree.map(jnp.shape, frozen) == {"params": {"kernel": {"a": (6, 2)}}}
    joined = lrj.join(trainable, frozen)
    np.testing.assert_array_equal(joined["params"]["kernel"]["a"], lp["params"]["kernel"]["a"])
    np.testing.assert_array_equal(joined["params"]["kernel"]["b"], lp["params"]["kernel"]["b"])
    # an unfrozen adapter has nothing frozen
    assert lrj.split(lrj.lora(rank=2), lp)[1] == {}
    with pytest.raises(ValueError, match=r"is in both the trainable and the frozen tree"):
        lrj.join(trainable, trainable)
    with pytest.raises(ValueError, match=r"cannot freeze \['c'\]: adapter 'lora' has leaves \['a', 'b'\]"):
        lrj.freeze(lrj.lora(), {"c"})


def _count_dots(fn, *args):
    return str(jax.make_jaxpr(fn)(*args)).count("dot_general")


def test_frozen_leaves_get_no_gradient_computed_and_no_update():
    model, x, variables = _dense_model()
    lora = lrj.lora(rank=2)
    frozen_a = lrj.freeze(lora, {"a"})
    lp = jax.tree.map(lambda v: v + 0.3, lora.init(jax.random.key(1), variables))

    def loss_fn(adapter):
        return lambda ap, params, batch, rng: jnp.sum(lrj.linen.apply(model, adapter, params, ap, batch) ** 2)

    import optax
    steps = {}
    for name, adapter in (("lora", lora), ("lora_fa", frozen_a)):
        opt = optax.adamw(1e-2, weight_decay=0.1)
        step = lrj.make_train_step(loss_fn(adapter), opt, adapter=adapter)
        steps[name] = _count_dots(step, lp, opt.init(lp), variables, x, None)
        new, _, metrics = jax.jit(step)(lp, opt.init(lp), variables, x, None)
        a_new, b_new = new["params"]["kernel"]["a"], new["params"]["kernel"]["b"]
        if name == "lora_fa":
            np.testing.assert_array_equal(a_new, lp["params"]["kernel"]["a"])  # weight decay did not touch it
        else:
            assert float(jnp.max(jnp.abs(a_new - lp["params"]["kernel"]["a"]))) > 1e-3
        assert float(jnp.max(jnp.abs(b_new - lp["params"]["kernel"]["b"]))) > 1e-3
    # forward x W, x a, (x a) b and backward db = (x a)^T dy; LoRA also d(xa) = dy b^T and da = x^T d(xa)
    assert (steps["lora"], steps["lora_fa"]) == (6, 4)


def test_trainable_summary_counts_only_trainable_leaves():
    _, _, variables = _dense_model()
    adapter = lrj.freeze(lrj.lora(rank=2), {"a"})
    lp = adapter.init(jax.random.key(1), variables)
    counts = lrj.trainable_summary(variables, lp, adapter=adapter)
    assert counts["trainable_params"] == 2 * 5
    assert counts["all_params"] == 6 * 5 + 5 + 6 * 2 + 2 * 5
    assert lrj.trainable_summary(variables, lp)["trainable_params"] == 6 * 2 + 2 * 5


# ----------------------------------------------------------------------------- bare params

def test_bare_params_work_like_the_params_collection():
    model, x, variables = _dense_model()
    adapter = lrj.lora(rank=2, dropout=0.5, targets=r".*kernel")
    params = variables["params"]
    lp_bare = jax.tree.map(lambda v: v + 0.2, adapter.init(jax.random.key(1), params))
    assert set(lp_bare) == {"kernel"}
    lp_full = {"params": lp_bare}
    rng = jax.random.key(7)
    y_bare = lrj.linen.apply(model, adapter, params, lp_bare, x, dropout_rng=rng)
    y_full = lrj.linen.apply(model, adapter, variables, lp_full, x, dropout_rng=rng)
    np.testing.assert_array_equal(y_bare, y_full)
    np.testing.assert_allclose(lrj.linen.apply(model, adapter, params, lp_bare, x),
                               model.apply({"params": adapter.merge(params, lp_bare)}, x), atol=1e-5)
    with pytest.raises(ValueError, match=r"not executed by this call: \['kernel'\]"):
        lrj.linen.apply(model, adapter, params, lp_bare, x, method=lambda module, x: x)


def test_kernel_layouts_serve_bare_params():
    model = nn.DenseGeneral((2, 3), name="proj")
    x = jnp.ones((2, 4))
    params = model.init(jax.random.key(0), x)["params"]
    layouts = lrj.linen.kernel_layouts(model, x)
    assert layouts == {"params/kernel": lrj.Layout(0, 1)}
    lp = lrj.lora(rank=2, targets=".*kernel", layouts=layouts).init(jax.random.key(1), params)
    assert jax.tree.map(jnp.shape, lp) == {"kernel": {"a": (4, 2), "b": (2, 2, 3)}}


# ----------------------------------------------------------------------------- NNX: every target runs

def test_nnx_target_not_called_is_refused():
    from flax import nnx

    class Two(nnx.Module):
        def __init__(self, rngs):
            self.used = nnx.Linear(4, 3, rngs=rngs)
            self.unused = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            return self.used(x)

    model = Two(nnx.Rngs(0))
    adapter = lrj.lora(rank=2)
    lp = adapter.init(jax.random.key(1), lrj.nnx.params(model))
    with pytest.raises(ValueError, match=r"not executed by this call: \['unused/kernel'\]"):
        lrj.nnx.apply(model, adapter, lp, jnp.ones((2, 4)))
    adapter = lrj.lora(rank=2, targets=r"used/kernel")
    lp = adapter.init(jax.random.key(1), lrj.nnx.params(model))
    assert lrj.nnx.apply(model, adapter, lp, jnp.ones((2, 4))).shape == (2, 3)


def test_dropout_keys_follow_the_roles_for_a_stacked_dora_target():
    kernel = jnp.ones((3, 8, 6))
    adapter = lrj.dora(rank=2, dropout=0.1, layouts={"params/p/kernel": lrj.Layout(1, 1)})
    leaves = adapter.init(jax.random.key(0), {"params": {"p": {"kernel": kernel}}})["params"]["p"]["kernel"]
    keys = base.dropout_keys(jax.random.key(1), 0, "params/p/kernel", kernel, leaves, adapter)
    assert keys.shape == (3,)
