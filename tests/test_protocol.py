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


def test_custom_contraction_layer_is_adapted_at_its_contraction():
    """`x @ self.param("kernel")` in a layer the bridge does not know: adapted where the kernel is contracted
    (also through a jitted jnp.matmul and an einsum), with the merged model's output and gradients."""
    model = TwoLayers()
    x = jax.random.normal(jax.random.key(5), (2, 4))
    variables = model.init(jax.random.key(0), x)
    adapter = lrj.lora(rank=2, targets=r".*/kernel")
    lp = jax.tree.map(lambda v: v + 0.1, adapter.init(jax.random.key(1), variables))
    out = lrj.linen.apply(model, adapter, variables, lp, x)
    np.testing.assert_allclose(out, model.apply(adapter.merge(variables, lp), x), atol=1e-5)
    assert float(jnp.max(jnp.abs(out - model.apply(variables, x)))) > 1e-2

    def factored(lp):
        return jnp.sum(jnp.sin(lrj.linen.apply(model, adapter, variables, lp, x)))

    def merged(lp):
        return jnp.sum(jnp.sin(model.apply(adapter.merge(variables, lp), x)))

    g, g_ref = jax.jit(jax.grad(factored))(lp), jax.grad(merged)(lp)
    for leaf, ref in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(leaf, ref, atol=1e-5)
        assert float(jnp.max(jnp.abs(leaf))) > 1e-3


class TwiceContracted(nn.Module):
    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(), (x.shape[-1], 3))
        return jax.jit(jnp.matmul)(x, kernel) + jnp.einsum("bi,io->bo", x, kernel.astype(jnp.bfloat16)).astype(x.dtype)


class Gathered(nn.Module):
    @nn.compact
    def __call__(self, ids):
        table = self.param("kernel", nn.initializers.normal(), (10, 3))
        return jnp.take(table, ids, axis=0)


class Transposed(nn.Module):
    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(), (3, x.shape[-1]))
        return x @ kernel.T


def test_every_contraction_of_a_custom_kernel_is_adapted():
    model, x = TwiceContracted(), jax.random.normal(jax.random.key(5), (2, 4))
    variables = model.init(jax.random.key(0), x)
    adapter = lrj.lora(rank=2, targets=r".*kernel")
    lp = jax.tree.map(lambda v: v + 0.1, adapter.init(jax.random.key(1), variables))
    np.testing.assert_allclose(lrj.linen.apply(model, adapter, variables, lp, x),
                               model.apply(adapter.merge(variables, lp), x), atol=2e-2)  # bfloat16 einsum


@pytest.mark.parametrize("layer,x,used_by", [
    (Gathered, jnp.array([1, 2]), "`gather`"),
    (Transposed, jnp.ones((2, 4)), "`transpose`"),
])
def test_custom_kernel_used_otherwise_is_refused_with_its_path(layer, x, used_by):
    model = layer()
    variables = model.init(jax.random.key(0), x)
    adapter = lrj.lora(rank=2, targets=r".*kernel", layouts={"params/kernel": lrj.Layout(0, 1)})
    lp = adapter.init(jax.random.key(1), variables)
    with pytest.raises(NotImplementedError, match=rf"adapter target 'params/kernel' is used by {used_by}"):
        lrj.linen.apply(model, adapter, variables, lp, x)


class ScannedCustom(nn.Module):
    @nn.compact
    def __call__(self, x):
        block = nn.scan(nn.remat(ScanBody), variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return block(name="layers")(x, None)[0]


class ScanBody(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return jnp.tanh(CustomMatmulSquare(name="custom")(x)), None


class CustomMatmulSquare(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x @ self.param("kernel", nn.initializers.normal(0.5), (x.shape[-1], x.shape[-1]))


def test_custom_layer_under_scan_and_remat_is_adapted_per_layer():
    model, x = ScannedCustom(), jax.random.normal(jax.random.key(5), (2, 4))
    variables = model.init(jax.random.key(0), x)
    adapter = lrj.lora(rank=2, targets=r".*kernel", layouts={"params/layers/custom/kernel": lrj.Layout(1, 1)})
    lp = jax.tree.map(lambda v: v + 0.1, adapter.init(jax.random.key(1), variables))
    assert lp["params"]["layers"]["custom"]["kernel"]["a"].shape == (3, 4, 2)
    out = jax.jit(lambda lp: lrj.linen.apply(model, adapter, variables, lp, x))(lp)
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
    joined = lrj.join(adapter, trainable, frozen)
    np.testing.assert_array_equal(joined["params"]["kernel"]["a"], lp["params"]["kernel"]["a"])
    np.testing.assert_array_equal(joined["params"]["kernel"]["b"], lp["params"]["kernel"]["b"])
    # an unfrozen adapter has nothing frozen
    assert lrj.split(lrj.lora(rank=2), lp)[1] == {}
    with pytest.raises(ValueError, match=r"leaves \['b'\] at 'params/kernel' are in the frozen tree, but the adapter declares them trainable"):
        lrj.join(adapter, trainable, trainable)
    with pytest.raises(ValueError, match=r"leaves \['a'\] at 'params/kernel' are in the trainable tree, but the adapter declares them frozen"):
        lrj.join(adapter, frozen, frozen)
    with pytest.raises(ValueError, match=r"cannot freeze \['c'\]: adapter 'lora' has leaves \['a', 'b'\]"):
        lrj.freeze(lrj.lora(), {"c"})


def _count_dots(fn, *args):
    return str(jax.make_jaxpr(fn)(*args)).count("dot_general")


def _lora_and_frozen_a():
    """``(x, variables, lora, freeze(lora, {"a"}), perturbed adapter tree, adapter -> loss_fn)`` on a Dense."""
    model, x, variables = _dense_model()
    lora = lrj.lora(rank=2)
    lp = jax.tree.map(lambda v: v + 0.3, lora.init(jax.random.key(1), variables))

    def loss_fn(adapter):
        return lambda ap, params, batch, rng: jnp.sum(lrj.linen.apply(model, adapter, params, ap, batch) ** 2)

    return x, variables, lora, lrj.freeze(lora, {"a"}), lp, loss_fn


def test_frozen_leaves_get_no_gradient_computed_and_no_update():
    x, variables, lora, frozen_a, lp, loss_fn = _lora_and_frozen_a()

    import optax
    steps = {}
    for name, adapter in (("lora", lora), ("lora_fa", frozen_a)):
        opt = optax.adamw(1e-2, weight_decay=0.1)
        step = lrj.make_train_step(loss_fn(adapter), opt, adapter=adapter)
        state = opt.init(lrj.split(adapter, lp)[0])
        steps[name] = _count_dots(step, lp, state, variables, x, None)
        new, _, metrics = jax.jit(step)(lp, state, variables, x, None)
        a_new, b_new = new["params"]["kernel"]["a"], new["params"]["kernel"]["b"]
        if name == "lora_fa":
            np.testing.assert_array_equal(a_new, lp["params"]["kernel"]["a"])  # weight decay did not touch it
        else:
            assert float(jnp.max(jnp.abs(a_new - lp["params"]["kernel"]["a"]))) > 1e-3
        assert float(jnp.max(jnp.abs(b_new - lp["params"]["kernel"]["b"]))) > 1e-3
    # forward x W, x a, (x a) b and backward db = (x a)^T dy; LoRA also d(xa) = dy b^T and da = x^T d(xa)
    assert (steps["lora"], steps["lora_fa"]) == (6, 4)


def test_lora_fa_optimizer_on_frozen_a_equals_the_zeroed_update_route():
    """lrj.optim.lora_fa reads the frozen A from optax's extra argument: same b as with A in the tree."""
    x, variables, lora, frozen_a, lp, loss_fn = _lora_and_frozen_a()

    out = {}
    for name, adapter in (("whole", lora), ("frozen", frozen_a)):
        opt = lrj.optim.lora_fa(1e-2, adapter, weight_decay=0.01)
        state = opt.init(lrj.split(adapter, lp)[0])
        step = jax.jit(lrj.make_train_step(loss_fn(adapter), opt, adapter=adapter))
        new = lp
        for _ in range(3):
            new, state, _ = step(new, state, variables, x, None)
        out[name] = new
        if name == "frozen":  # no Adam moments exist for a
            assert all(leaf.shape != (6, 2) for leaf in jax.tree.leaves(state)), jax.tree.map(jnp.shape, state)
    np.testing.assert_allclose(out["frozen"]["params"]["kernel"]["b"], out["whole"]["params"]["kernel"]["b"], atol=1e-6)
    np.testing.assert_array_equal(out["frozen"]["params"]["kernel"]["a"], lp["params"]["kernel"]["a"])
    assert float(jnp.max(jnp.abs(out["frozen"]["params"]["kernel"]["b"] - lp["params"]["kernel"]["b"]))) > 1e-3


def test_train_step_refuses_optimizer_state_made_for_the_whole_tree():
    model, x, variables = _dense_model()
    adapter = lrj.freeze(lrj.lora(rank=2), {"a"})
    lp = adapter.init(jax.random.key(1), variables)
    import optax
    opt = optax.adam(1e-3)
    step = lrj.make_train_step(lambda ap, p, b, r: jnp.sum(lrj.linen.apply(model, adapter, p, ap, b)), opt, adapter=adapter)
    with pytest.raises(ValueError, match=r"optimizer.init\(lrj.split\(adapter, adapter_params\)\[0\]\)"):
        step(lp, opt.init(lp), variables, x, None)


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


# ----------------------------------------------------------------------------- combine, full_finetune

class NormDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="norm")(x)
        return nn.Dense(4, name="up")(nn.Dense(5, name="proj")(h))


def _norm_model():
    model = NormDense()
    x = jax.random.normal(jax.random.key(2), (3, 6))
    return model, x, model.init(jax.random.key(0), x)


def test_combine_lora_with_trained_norms_is_one_adapter():
    model, x, variables = _norm_model()
    both = lrj.combine(lrj.lora(rank=2, targets=r".*/proj/kernel"), lrj.full_finetune(targets=r".*/norm/scale"))
    lp = both.init(jax.random.key(1), variables)
    assert jax.tree.map(jnp.shape, lp) == {"params": {"norm": {"scale": {"w": (6,)}},
                                                       "proj": {"kernel": {"a": (6, 2), "b": (2, 5)}}}}
    lp = jax.tree.map(lambda v: v + 0.25, lp)
    out = lrj.linen.apply(model, both, variables, lp, x)
    merged = both.merge(variables, lp)
    np.testing.assert_allclose(merged["params"]["norm"]["scale"], lp["params"]["norm"]["scale"]["w"])
    np.testing.assert_allclose(out, model.apply(merged, x), atol=1e-5)

    # the trained norm's gradient is the model's gradient w.r.t. its scale
    def loss_adapter(lp):
        return jnp.sum(jnp.sin(lrj.linen.apply(model, both, variables, lp, x)))

    def loss_dense(scale):
        v = both.merge(variables, lp)
        v = {"params": {**v["params"], "norm": {**v["params"]["norm"], "scale": scale}}}
        return jnp.sum(jnp.sin(model.apply(v, x)))

    g = jax.grad(loss_adapter)(lp)
    np.testing.assert_allclose(g["params"]["norm"]["scale"]["w"], jax.grad(loss_dense)(merged["params"]["norm"]["scale"]),
                               atol=1e-5)
    assert float(jnp.max(jnp.abs(g["params"]["proj"]["kernel"]["a"]))) > 1e-3
    with pytest.raises(ValueError, match=r"original values are not in the adapter tree"):
        both.unmerge(merged, lp)


def test_combine_two_loras_dispatch_by_their_regex_targets():
    model, x, variables = _norm_model()
    small, large = lrj.lora(rank=1, alpha=1.0, targets=r".*/proj/kernel"), lrj.lora(rank=3, alpha=6.0, targets=r".*/up/kernel")
    both = lrj.combine(small, large)
    lp = jax.tree.map(lambda v: v + 0.1, both.init(jax.random.key(1), variables))
    assert lp["params"]["up"]["kernel"]["a"].shape == (5, 3)
    out = lrj.linen.apply(model, both, variables, lp, x)
    np.testing.assert_allclose(out, model.apply(both.merge(variables, lp), x), atol=1e-5)
    np.testing.assert_allclose(both.unmerge(both.merge(variables, lp), lp)["params"]["up"]["kernel"],
                               variables["params"]["up"]["kernel"], atol=1e-6)
    # the scales are each component's own: up uses alpha 6 / r 3 = 2
    one_only = {"params": {"up": lp["params"]["up"]}}
    np.testing.assert_allclose(large.merge(variables, one_only)["params"]["up"]["kernel"],
                               both.merge(variables, lp)["params"]["up"]["kernel"], atol=1e-6)


def test_combine_refuses_overlaps_and_ambiguous_components():
    _, _, variables = _norm_model()
    with pytest.raises(ValueError, match=r"'params/proj/kernel' is targeted by both 'lora' and 'lora'"):
        lrj.combine(lrj.lora(rank=2, targets=r".*/proj/kernel"), lrj.lora(rank=2, targets=r".*kernel")).init(jax.random.key(0), variables)
    with pytest.raises(ValueError, match=r"need regex `targets`"):
        lrj.combine(lrj.lora(targets=lambda p, leaf: True), lrj.lora(targets=r".*up/kernel"))
    with pytest.raises(ValueError, match=r"different roles"):
        lrj.combine(lrj.lora(), lrj.freeze(lrj.lora(targets=".*up/kernel"), {"a"}))


def test_combined_adapter_splits_and_runs_in_nnx():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.norm = nnx.LayerNorm(6, rngs=rngs)
            self.proj = nnx.Linear(6, 5, rngs=rngs)

        def __call__(self, x):
            return self.proj(self.norm(x))

    model = Net(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (3, 6))
    both = lrj.freeze(lrj.combine(lrj.lora(rank=2, targets=r"proj/kernel"), lrj.full_finetune(targets=r"norm/scale")), {"a"})
    lp = jax.tree.map(lambda v: v + 0.5, both.init(jax.random.key(1), lrj.nnx.params(model)))
    trainable, frozen = lrj.split(both, lp)
    assert jax.tree.map(jnp.shape, frozen) == {"proj": {"kernel": {"a": (6, 2)}}}
    assert jax.tree.map(jnp.shape, trainable) == {"norm": {"scale": {"w": (6,)}}, "proj": {"kernel": {"b": (2, 5)}}}
    out = lrj.nnx.apply(model, both, lp, x)
    merged_model = nnx.clone(model)
    merged = both.merge(lrj.nnx.params(model), lp)
    nnx.update(merged_model, merged)
    np.testing.assert_allclose(out, merged_model(x), atol=1e-5)
    np.testing.assert_allclose(model.norm.scale[...], np.ones(6))  # the user's model is untouched


def test_nnx_custom_layer_is_adapted_at_its_contraction():
    from flax import nnx

    class Custom(nnx.Module):
        def __init__(self, rngs):
            self.kernel = nnx.Param(jax.random.normal(rngs.params(), (4, 3)))

        def __call__(self, x):
            return x @ self.kernel[...]

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(5, 4, rngs=rngs)
            self.custom = Custom(rngs)

        def __call__(self, x):
            return self.custom(jnp.tanh(self.lin(x)))

    model, x = Net(nnx.Rngs(0)), jax.random.normal(jax.random.key(1), (2, 5))
    adapter = lrj.lora(rank=2)
    lp = jax.tree.map(lambda v: v + 0.1, adapter.init(jax.random.key(1), lrj.nnx.params(model)))
    out = jax.jit(lambda lp: lrj.nnx.apply(model, adapter, lp, x))(lp)
    merged = nnx.clone(model)
    nnx.update(merged, adapter.merge(lrj.nnx.params(model), lp))
    np.testing.assert_allclose(out, merged(x), atol=1e-5)
    assert float(jnp.max(jnp.abs(out - model(x)))) > 1e-2
    grads = jax.grad(lambda lp: jnp.sum(lrj.nnx.apply(model, adapter, lp, x)))(lp)
    assert float(jnp.max(jnp.abs(grads["custom"]["kernel"]["a"]))) > 1e-3
