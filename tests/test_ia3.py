"""IA3 (``lowrank_jax.adapters.ia3``) against peft 0.21.2 (``tests/fixtures/make_peft_ia3.py``), its peft
files both ways (the shared harness runs it: tests/test_harness.py)."""

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adapter_harness as harness
import lowrank_jax as lrj
from lowrank_jax.adapters.ia3 import ia3
from lowrank_jax.io import peft as peft_io

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
REF = np.load(FIXTURES / "peft_ia3.npz", allow_pickle=False)
TOL = 1e-5


class Net(nn.Module):
    """The fixture's torch ``Net``: ``norm(down(tanh(up(x))))``."""

    @nn.compact
    def __call__(self, x):
        return nn.LayerNorm(epsilon=1e-5, name="norm")(nn.Dense(6, name="down")(jnp.tanh(nn.Dense(10, name="up")(x))))


def fixture_params():
    r = {k: jnp.asarray(REF[k]) for k in REF.files}
    return {"up": {"kernel": r["up_W"].T, "bias": r["up_b"]}, "down": {"kernel": r["down_W"].T, "bias": r["down_b"]},
            "norm": {"scale": r["norm_w"], "bias": r["norm_b"]}}


def module_name(path, layer):
    """Flax ``up/kernel`` -> torch module ``up``."""
    assert layer is None
    return path.split("/")[-2]


ADAPTER = ia3(targets=r"(up|down)/kernel", feedforward=r"down/kernel")
LP = {"up": {"kernel": {"l_out": jnp.asarray(REF["ia3_up"][:, 0])}}, "down": {"kernel": {"l_in": jnp.asarray(REF["ia3_down"][0])}}}


max_diff = harness.max_diff


def test_outputs_equal_peft():
    params = fixture_params()
    assert jax.tree.map(jnp.shape, ADAPTER.init(jax.random.key(0), params)) == jax.tree.map(jnp.shape, LP)
    y = lrj.linen.apply(Net(), ADAPTER, params, LP, jnp.asarray(REF["x"]))
    assert max_diff(y, REF["ia3_y"]) < TOL
    assert max_diff(Net().apply({"params": params}, REF["x"]), REF["ia3_y"]) > 1e-2  # the adapter does something


def test_merge_equals_peft_and_scales_the_bias_of_output_targets_only():
    merged = ADAPTER.merge(fixture_params(), LP)
    for name in ("up", "down"):
        assert max_diff(merged[name]["kernel"].T, REF[f"ia3_merged_{name}_W"]) < TOL
        assert max_diff(merged[name]["bias"], REF[f"ia3_merged_{name}_b"]) < TOL
    np.testing.assert_array_equal(merged["down"]["bias"], REF["down_b"])
    assert max_diff(Net().apply({"params": merged}, REF["x"]), REF["ia3_y"]) < TOL


def test_load_a_directory_written_by_peft():
    params = fixture_params()
    adapter, lp = peft_io.load_peft(FIXTURES / "peft_ia3_dir" / "ia3", params, module_name=module_name)
    assert adapter.config["method"] == "ia3" and adapter.config["feedforward"] == ["down/kernel"]
    jax.tree.map(np.testing.assert_array_equal, lp, jax.tree.map(np.asarray, LP))
    assert max_diff(lrj.linen.apply(Net(), adapter, params, lp, jnp.asarray(REF["x"])), REF["ia3_y"]) < TOL


def test_directory_we_write_matches_peft(tmp_path):
    """Same tensors (names, shapes, values) and config as peft wrote for the same weights; the generator
    checks that peft loads this layout (max abs diff 0 on the fixture's outputs)."""
    from safetensors.numpy import load_file

    peft_io.save_peft(tmp_path, ADAPTER, fixture_params(), LP, module_name=module_name, task_type=None)
    ours, theirs = (load_file(str(d / "adapter_model.safetensors")) for d in (tmp_path, FIXTURES / "peft_ia3_dir" / "ia3"))
    assert sorted(ours) == sorted(theirs) == ["base_model.model.down.ia3_l", "base_model.model.up.ia3_l"]
    for k in theirs:
        assert ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype
        np.testing.assert_array_equal(ours[k], theirs[k])
    ours_cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    theirs_cfg = json.loads((FIXTURES / "peft_ia3_dir" / "ia3" / "adapter_config.json").read_text())
    for key in ("peft_type", "feedforward_modules", "fan_in_fan_out", "init_ia3_weights", "task_type"):
        assert ours_cfg[key] == theirs_cfg[key], key
    assert sorted(ours_cfg["target_modules"]) == sorted(theirs_cfg["target_modules"])


def test_scanned_round_trip_and_stacked_merge(tmp_path):
    """The harness's ``nn.scan`` MLP: stacked ``l_in`` [layers, in] fits two layouts of its kernel, so
    merge and export take the factory's ``layouts``; peft gets one module per layer."""
    case = harness.CASES_BY_NAME["ia3"]
    s = harness.setup(case)
    scanned = harness.MLP.scanned()
    layouts = lrj.linen.kernel_layouts(scanned, s.x)
    adapter = case.adapter(layouts=layouts)
    params, lp = harness.stack_layers(s.params), harness.stack_layers(s.lp)
    name = lambda path, layer: f"layers.{layer}.{path.split('/')[-2]}"  # noqa: E731
    with pytest.raises(ValueError, match=r"fit several layouts .* pass layouts="):
        peft_io.save_peft(tmp_path / "no_layouts", adapter, params, lp, module_name=name)
    peft_io.save_peft(tmp_path, adapter, params, lp, module_name=name, layouts=layouts)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["down", "up"] and cfg["feedforward_modules"] == ["down"]
    from safetensors.numpy import load_file
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in tensors.items()} == {
        f"base_model.model.layers.{i}.{m}.ia3_l": shape for i in range(harness.LAYERS)
        for m, shape in (("up", (harness.H, 1)), ("down", (1, harness.H)))}
    loaded, lp2 = peft_io.load_peft(tmp_path, params, layouts=layouts, module_name=name)
    jax.tree.map(np.testing.assert_array_equal, lp2, jax.tree.map(np.asarray, lp))
    y = lrj.linen.apply(scanned, adapter, params, lp, s.x)
    assert max_diff(lrj.linen.apply(scanned, loaded, params, lp2, s.x), y) < 1e-6
    merged = adapter.merge(params, lp)
    assert max_diff(scanned.apply({"params": merged}, s.x), y) < TOL
    assert max_diff(adapter.unmerge(merged, lp), params) < TOL


def test_bad_inputs_name_the_value():
    params = fixture_params()
    with pytest.raises(ValueError, match=r"`feedforward` 'down/.\*' must select a subset of `targets` 'up/kernel'; "
                                         r"it also selects \['down/bias', 'down/kernel'\]"):
        ia3(targets="up/kernel", feedforward="down/.*").init(jax.random.key(0), params)
    with pytest.raises(ValueError, match=r"`dropout` must be 0 for IA3 .* got 0.1"):
        ia3(dropout=0.1)
    with pytest.raises(NotImplementedError, match=r"'emb/embedding' is an embedding"):
        ia3(targets="emb/embedding", feedforward=None).init(jax.random.key(0), {"emb": {"embedding": jnp.ones((5, 3))}})




def test_stacked_feedforward_vector_takes_the_factory_layouts_for_shardings_and_dropout_keys():
    """A stacked ``l_in: [L, in]`` fits two layouts of its ``[L, in, out]`` kernel; the adapter's own
    ``layouts`` settle it for shardings (no more 'fit several layouts')."""
    from jax.sharding import NamedSharding, PartitionSpec

    kernel = jnp.ones((3, 8, 6))
    params = {"params": {"layers": {"down": {"kernel": kernel}}}}
    layouts = {"params/layers/down/kernel": lrj.Layout(1, 1)}
    adapter = ia3(targets=r".*/kernel", feedforward=r".*/down/kernel", layouts=layouts)
    lp = adapter.init(jax.random.key(0), params)
    mesh = jax.make_mesh((1, 1), ("data", "model"))
    shardings = {"params": {"layers": {"down": {"kernel": NamedSharding(mesh, PartitionSpec(None, "model", None))}}}}
    spec = lrj.adapter_shardings(params, lp, shardings, adapter=adapter)["params"]["layers"]["down"]["kernel"]["l_in"].spec
    assert spec == PartitionSpec(None, "model")
    unsettled = ia3(targets=r".*/kernel", feedforward=r".*/down/kernel")
    with pytest.raises(ValueError, match=r"fit several layouts .* make the adapter with `layouts=`"):
        lrj.adapter_shardings(params, lp, shardings, adapter=unsettled)
