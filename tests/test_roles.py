"""One owner per concept: the LoRA scale (adapters.scale), and LoRA factors found from leaf roles, not names."""

import json
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lrj
from lowrank_jax import cli
from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import base
from lowrank_jax.adapters import scale as scale_lib
from lowrank_jax.io import peft as peft_io
from lowrank_jax.optim import _common

lo = lrj.optim

RENAMED = {"down": lrj.Leaf(("stack", "in", "rank")), "up": lrj.Leaf(("stack", "rank", "out"))}


def renamed(adapter):
    """``adapter`` whose LoRA factors are called ``down``/``up``: only their roles say which is A and B."""
    return adapter._replace(roles=RENAMED, leaf_names=frozenset(RENAMED))


def rename(tree):
    return {k: ({"down": v["a"], "up": v["b"]} if "a" in v else rename(v)) for k, v in tree.items()}


def factors(key, shape_a, shape_b):
    ka, kb = jax.random.split(key)
    return jax.random.normal(ka, shape_a), jax.random.normal(kb, shape_b)


# ----------------------------------------------------------------------------- one scale

def test_lora_scale_and_target_scale():
    assert scale_lib.lora_scale(4, 8.0) == 2.0
    assert scale_lib.lora_scale(4, 8.0, rslora=True) == 4.0
    assert lrj.lora_scale(4, 8.0, True) == 4.0  # the public name still works
    config = {"alpha": 8.0, "alpha_pattern": {r".*/v/kernel": 2.0}, "rslora": False}
    assert scale_lib.target_scale(config, "params/q/kernel", 4) == 2.0
    assert scale_lib.target_scale(config, "params/v/kernel", 4) == 0.5
    assert scale_lib.target_scale({**config, "rslora": True}, "params/v/kernel", 4) == 1.0
    assert scale_lib.target_scale({"alpha": 6.0}, "x", 3) == 2.0  # no pattern, no rslora
    with pytest.raises(ValueError, match="has no `alpha` in its config"):
        scale_lib.target_scale({"method": "vera"}, "x", 3)


def test_optimizer_scale_from_adapter_is_target_scale():
    adapter = lrj.lora(rank=4, alpha=8.0, alpha_pattern={r".*/v/kernel": 2.0}, rslora=True)
    scale_of = _common.lora_scale_fn(adapter)
    a = jnp.zeros((5, 4))
    assert scale_of("params/q/kernel", a) == 4.0
    assert scale_of("params/v/kernel", a) == 1.0
    assert scale_of("params/v/kernel", jnp.zeros((5, 16))) == 0.5  # rank from the factor
    with pytest.raises(ValueError, match="has no `alpha` in its config; pass a number"):
        _common.lora_scale_fn(adapter._replace(config={"method": "x"}))


def test_dora_uses_the_pattern_alpha_in_apply_merge_and_norms():
    kw, ka, kb = jax.random.split(jax.random.key(0), 3)
    w = jax.random.normal(kw, (6, 5))
    params = {"params": {"proj": {"kernel": w}}}
    adapter = lrj.dora(rank=2, alpha=4.0, targets=r".*/kernel", alpha_pattern={r".*proj/kernel": 3.0})
    lp = adapter.init(jax.random.key(1), params)
    a, b = jax.random.normal(ka, (6, 2)), jax.random.normal(kb, (2, 5))
    lp["params"]["proj"]["kernel"].update(a=a, b=b)
    v = w + 1.5 * a @ b  # s = 3 / 2 from alpha_pattern, not 4 / 2
    norms = lrj.dora_weight_norms(adapter, params, lp)
    np.testing.assert_allclose(norms["params/proj/kernel"], jnp.linalg.norm(v, axis=0), rtol=1e-5)
    m = lp["params"]["proj"]["kernel"]["m"]
    merged = adapter.merge(params, lp)["params"]["proj"]["kernel"]
    np.testing.assert_allclose(merged, m * v / jnp.linalg.norm(v, axis=0), rtol=1e-5, atol=1e-6)
    back = adapter.unmerge(adapter.merge(params, lp), lp, norms=norms)["params"]["proj"]["kernel"]
    np.testing.assert_allclose(back, w, rtol=1e-4, atol=1e-5)
    x = jnp.ones((3, 6))
    site = base.Site("linear", w, 1)
    y = adapter.apply(lp["params"]["proj"]["kernel"], site, x, x @ w, path="params/proj/kernel")
    np.testing.assert_allclose(y, x @ merged, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- stack count from roles

def test_stack_from_roles_without_a_kernel():
    roles = dict(base.LORA_ROLES)
    assert _common.stack_from_roles("t", {"a": (6, 2), "b": (2, 5)}, roles) == 0
    assert _common.stack_from_roles("t", {"a": (3, 6, 4, 2), "b": (3, 2, 5)}, roles) == 1
    assert _common.stack_from_roles("t", {"a": (3, 7, 6, 2), "b": (3, 7, 2, 5, 4)}, roles) == 2
    with pytest.raises(ValueError, match=r"several \(\[0, 1\]\) numbers of stacked axes fit .*pass `layouts="):
        _common.stack_from_roles("t", {"a": (3, 5, 3), "b": (3, 3, 4)}, roles)
    with pytest.raises(ValueError, match=r"no numbers of stacked axes fit a \[\*stack, \*inputs, rank\]"):
        _common.stack_from_roles("t", {"a": (6, 2), "b": (3, 5)}, roles)  # ranks differ
    # a third leaf's roles take part: DoRA's m [*stack, *outputs] must agree with b's sizes
    dora_roles = {**roles, "m": lrj.Leaf(("stack", "out"))}
    assert _common.stack_from_roles("t", {"a": (3, 5, 2), "b": (3, 2, 4), "m": (3, 4)}, dora_roles) == 1
    with pytest.raises(ValueError, match=r"no numbers of stacked axes fit .* and m \[\*stack, \*outputs\]"):
        _common.stack_from_roles("t", {"a": (3, 5, 2), "b": (3, 2, 4), "m": (3, 5)}, dora_roles)


def test_lora_stack_takes_roles_from_the_adapter_and_keeps_layouts():
    ad = renamed(lrj.lora(rank=2))
    assert _common.lora_stack("t", (3, 6, 2), (3, 2, 5), adapter=ad) == 1
    assert _common.lora_stack("t", (3, 6, 2), (3, 2, 5)) == 1  # LoRA's roles by default
    assert _common.lora_stack("t", (3, 5, 3), (3, 3, 4), layouts={"t": lrj.Layout(1, 1)}) == 1
    assert _common.lora_stack("t", (3, 5, 3), (3, 3, 4), layouts=lambda p: lrj.Layout(0, 2)) == 0
    with pytest.raises(ValueError, match=r"LoRA factors at 't' \(down \(3, 5, 3\), up \(3, 3, 4\)\)"):
        _common.lora_stack("t", (3, 5, 3), (3, 3, 4), adapter=ad)


# ----------------------------------------------------------------------------- factor names from roles

def test_factor_names_from_roles():
    assert _common.lora_factor_names() == ("a", "b")
    assert _common.lora_factor_names(lrj.lora()) == ("a", "b")
    assert _common.lora_factor_names(lrj.dora()) == ("a", "b")
    assert _common.lora_factor_names(renamed(lrj.lora())) == ("down", "up")
    two_a = lrj.lora()._replace(roles={**base.LORA_ROLES, "c": lrj.Leaf(("stack", "in", "rank"))},
                                leaf_names=frozenset("abc"))
    with pytest.raises(ValueError, match="has no single pair of LoRA factors"):
        _common.lora_factor_names(two_a)


def test_pair_walkers_use_the_adapter_names():
    ad = renamed(lrj.lora(rank=2))
    tree = {"x": {"kernel": {"down": jnp.ones((4, 2)), "up": jnp.ones((2, 3))}}, "bias": jnp.ones(3)}
    assert _common.lora_pair_paths(tree) == []
    assert _common.lora_pair_paths(tree, adapter=ad) == ["x/kernel"]
    assert _common.lora_pair_paths({"t": {"a": 1, "b": 2}}) == ["t"]  # default names still work
    seen = []

    def fn(path, g, p):
        seen.append((path, sorted(g), sorted(p)))
        return {"up": g["up"] * 2}

    out, found = _common.map_lora_pairs(fn, tree, tree, adapter=ad)
    assert seen == [("x/kernel", ["down", "up"], ["down", "up"])]
    assert found == [("x", "kernel")]
    assert float(out["x"]["kernel"]["up"][0, 0]) == 2.0 and float(out["x"]["kernel"]["down"][0, 0]) == 1.0
    assert float(out["bias"][0]) == 1.0


@pytest.mark.parametrize("make", [
    lambda s, **kw: lo.lora_fa(1e-2, s, **kw),
    lambda s, **kw: lo.lora_pro(1e-2, s, **kw),
])
def test_lora_optimizers_with_renamed_factors_match_plain_lora(make):
    a, b = factors(jax.random.key(0), (3, 6, 2), (3, 2, 5))  # stacked: the stack comes from roles
    ga, gb = factors(jax.random.key(1), (3, 6, 2), (3, 2, 5))
    plain = lrj.lora(rank=2, alpha=4.0)
    lp, grads = {"t": {"a": a, "b": b}}, {"t": {"a": ga, "b": gb}}
    tx = make(plain)
    ref, _ = tx.update(grads, tx.init(lp), lp)
    ad = renamed(plain)
    lp2, grads2 = rename(lp), rename(grads)
    tx2 = make(ad)
    out, _ = tx2.update(grads2, tx2.init(lp2), lp2)
    np.testing.assert_allclose(out["t"]["down"], ref["t"]["a"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out["t"]["up"], ref["t"]["b"], rtol=1e-6, atol=1e-7)
    assert float(jnp.abs(out["t"]["up"]).max()) > 0
    with pytest.raises(ValueError, match="found no LoRA factors: expected mappings holding leaves named 'down' and 'up'"):
        tx2.init(lp)


def test_lora_fa_labels_freeze_the_adapter_a_factor():
    ad = renamed(lrj.lora(rank=2))
    tree = {"t": {"down": jnp.ones((4, 2)), "up": jnp.ones((2, 3))}, "w": jnp.ones((2, 2))}
    assert lo.lora_fa_labels(tree, ad) == {"t": {"down": "frozen", "up": "train"}, "w": "train"}
    assert lo.lora_fa_labels(tree) == {"t": {"down": "train", "up": "train"}, "w": "train"}
    tx = lo.lora_fa(1e-2, ad)
    updates, _ = tx.update(tree, tx.init(tree), tree)
    assert float(jnp.abs(updates["t"]["down"]).max()) == 0.0
    assert float(jnp.abs(updates["w"]).max()) > 0.0


# ----------------------------------------------------------------------------- LoRA+ groups

def test_lora_plus_groups_from_roles_match_peft_on_unstacked_trees():
    dora = lrj.dora(rank=2)
    tree = {"proj": {"kernel": {"a": jnp.ones((4, 2)), "b": jnp.ones((2, 3)), "m": jnp.ones(3)}, "bias": jnp.ones(3)},
            "w": jnp.ones((3, 3))}
    expected = {"proj": {"kernel": {"a": "a", "b": "b", "m": "b"}, "bias": "b_no_decay"}, "w": "a"}
    assert lo.lora_plus_labels(tree) == expected
    assert lo.lora_plus_labels(tree, dora) == expected
    # stacked by scan: m is 2-D; its roles say it is one vector per layer, which peft puts with B
    stacked = {"proj": {"kernel": {"a": jnp.ones((2, 4, 2)), "b": jnp.ones((2, 2, 3)), "m": jnp.ones((2, 3))}}}
    assert lo.lora_plus_labels(stacked)["proj"]["kernel"]["m"] == "a"
    assert lo.lora_plus_labels(stacked, dora)["proj"]["kernel"]["m"] == "b"
    ad = renamed(lrj.lora(rank=2))
    tree2 = {"proj": {"kernel": {"down": jnp.ones((4, 2)), "up": jnp.ones((2, 3))}},
             "embedding": {"down": jnp.ones((9, 2)), "up": jnp.ones((2, 3))}}
    assert lo.lora_plus_labels(tree2, ad) == {
        "proj": {"kernel": {"down": "a", "up": "b"}}, "embedding": {"down": "embedding", "up": "embedding"}}
    tx = lo.lora_plus(1e-3, lr_ratio=16.0, adapter=ad)
    grads = jax.tree.map(jnp.ones_like, tree2)
    updates, _ = tx.update(grads, tx.init(tree2), tree2)
    ratio = updates["proj"]["kernel"]["up"][0, 0] / updates["proj"]["kernel"]["down"][0, 0]
    assert float(ratio) == pytest.approx(16.0, rel=1e-5)


# ----------------------------------------------------------------------------- export and info

def proj_params():
    return {"params": {"proj": {"kernel": jax.random.normal(jax.random.key(2), (6, 4))}}}


def test_peft_export_finds_factors_by_roles(tmp_path):
    from safetensors.numpy import load_file

    params = proj_params()
    plain = lrj.lora(rank=2, alpha=4.0)
    lp = jax.tree.map(lambda x: x + 0.25, plain.init(jax.random.key(0), params))
    name = lambda path, layer: "proj"  # noqa: E731
    peft_io.save_peft(tmp_path / "plain", plain, params, lp, module_name=name)
    peft_io.save_peft(tmp_path / "renamed", renamed(plain), params, rename(lp), module_name=name)
    t1 = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    t2 = load_file(str(tmp_path / "renamed" / "adapter_model.safetensors"))
    assert sorted(t2) == ["base_model.model.proj.lora_A.weight", "base_model.model.proj.lora_B.weight"]
    for k in t1:
        np.testing.assert_array_equal(t1[k], t2[k])
    np.testing.assert_allclose(t2["base_model.model.proj.lora_A.weight"], np.asarray(lp["params"]["proj"]["kernel"]["a"]).T)


def test_peft_export_refuses_leaves_that_are_not_lora_factors(tmp_path):
    params = proj_params()
    dora = lrj.dora(rank=2)
    lp = dora.init(jax.random.key(0), params)
    other = dora._replace(config={**dora.config, "method": "magnitudes"})  # an m leaf that is not DoRA's
    with pytest.raises(ValueError, match=r"cannot export adapter 'magnitudes' in peft's LoRA format: its leaves "
                                         r"\{'m': \('stack', 'out'\)\} are not LoRA factors"):
        peft_io.save_peft(tmp_path / "d", other, params, lp, module_name=lambda p, layer: "proj")
    assert not (tmp_path / "d").exists()
    written = peft_io.save_peft(tmp_path / "dora", dora, params, lp, module_name=lambda p, layer: "proj")
    from safetensors.numpy import load_file

    tensors = load_file(str(written / "adapter_model.safetensors"))
    m, = [leaf for _, path, leaf in tree_lib.flatten_with_paths(lp) if path.endswith("/m")]
    np.testing.assert_array_equal(tensors["base_model.model.proj.lora_magnitude_vector"], np.asarray(m).reshape(-1))
    assert json.loads((written / "adapter_config.json").read_text())["use_dora"] is True
    with pytest.raises(ValueError, match=r"its config lacks \['rank', 'alpha', 'alpha_pattern', 'rslora', 'dropout'\]"):
        peft_io.save_peft(tmp_path / "e", lrj.lora()._replace(config={"method": "x"}), params, lp)


def test_info_counts_targets_and_trainable_params():
    tree = {"params": {
        "layers": {"q": {"kernel": {"a": jnp.ones((3, 6, 2)), "b": jnp.ones((3, 2, 5))}}},  # stacked: one target
        "out": {"kernel": {"a": jnp.ones((5, 2)), "b": jnp.ones((2, 7))}},
    }}
    shapes, trainable, frozen, targets = cli.adapter_counts(tree)
    assert targets == 2  # not len(leaves) // 2 per layer
    assert trainable == 3 * 6 * 2 + 3 * 2 * 5 + 5 * 2 + 2 * 7 and frozen == 0
    assert len(shapes) == 4 and ("['params']['out']['kernel']['b']", (2, 7)) in shapes
    _, trainable, frozen, targets = cli.adapter_counts(tree, frozen_names=["a"])
    assert (trainable, frozen, targets) == (3 * 2 * 5 + 2 * 7, 3 * 6 * 2 + 5 * 2, 2)
    dora_tree = {"p": {"kernel": {"a": jnp.ones((4, 2)), "b": jnp.ones((2, 3)), "m": jnp.ones(3)}}}
    assert cli.adapter_counts(dora_tree)[1:] == (4 * 2 + 2 * 3 + 3, 0, 1)  # 3 leaves, still one target
    assert cli.adapter_counts({"w": jnp.ones((2, 2)), "x": {"y": jnp.ones(3)}})[3] == 0  # not a target tree
