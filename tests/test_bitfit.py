"""BitFit (``lowrank_jax.adapters.bitfit``) and LoRA's peft ``bias=`` option, with its peft files
(``tests/fixtures/peft_ia3_dir/lora_bias_all``, written by peft 0.21.2)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_ia3 import FIXTURES, REF, TOL, Net, fixture_params, max_diff, module_name

import adapter_harness as harness
import lowrank_jax as lrj
from lowrank_jax.adapters.bitfit import bitfit
from lowrank_jax.io import peft as peft_io

PEFT_DIR = FIXTURES / "peft_ia3_dir" / "lora_bias_all"


def test_bitfit_trains_the_biases_only():
    params = fixture_params()
    lp = bitfit().init(jax.random.key(0), params)
    assert jax.tree.map(jnp.shape, lp) == {"up": {"bias": {"w": (10,)}}, "down": {"bias": {"w": (6,)}}, "norm": {"bias": {"w": (6,)}}}
    trained = jax.tree.map(lambda w: w + 0.5, lp)
    merged = bitfit().merge(params, trained)
    np.testing.assert_array_equal(merged["up"]["bias"], params["up"]["bias"] + 0.5)
    np.testing.assert_array_equal(merged["up"]["kernel"], params["up"]["kernel"])
    y = lrj.linen.apply(Net(), bitfit(), params, trained, jnp.asarray(REF["x"]))
    assert max_diff(y, Net().apply({"params": merged}, REF["x"])) < TOL


def test_bitfit_bad_targets_name_the_pattern():
    params = fixture_params()
    with pytest.raises(ValueError, match=r"bitfit `targets` 'nothing/bias' matched no bias; biases in params: "
                                         r"\['down/bias', 'norm/bias', 'up/bias'\]"):
        bitfit("nothing/bias").init(jax.random.key(0), params)
    with pytest.raises(ValueError, match=r"bitfit trains biases only; `targets` 'up/.\*' also selects \['up/kernel'\]"):
        bitfit("up/.*").init(jax.random.key(0), params)
    with pytest.raises(ValueError, match=r"params has no bias; paths include \['k/kernel'\]"):
        bitfit().init(jax.random.key(0), {"k": {"kernel": jnp.ones((2, 2))}})


def test_lora_bias_options_select_peft_biases():
    params = fixture_params()
    shapes = lambda bias: jax.tree.map(jnp.shape, lrj.lora(rank=2, targets="up/kernel", bias=bias).init(jax.random.key(0), params))  # noqa: E731
    assert shapes("lora_only") == {"up": {"kernel": {"a": (6, 2), "b": (2, 10)}, "bias": {"w": (10,)}}}
    assert set(jax.tree.leaves(jax.tree.map(lambda _: 1, shapes("all")))) == {1}
    assert shapes("all")["norm"] == {"bias": {"w": (6,)}} and shapes("all")["down"] == {"bias": {"w": (6,)}}
    with pytest.raises(ValueError, match=r"`bias` must be one of \('none', 'all', 'lora_only'\), got 'some'"):
        lrj.lora(bias="some")


def lora_all():
    """The fixture's trained LoRA ``bias="all"`` adapter, as our tree."""
    tree = {"up": {"kernel": {"a": REF["lora_A"].T, "b": REF["lora_B"].T}, "bias": {"w": REF["lora_up_b"]}},
            "down": {"bias": {"w": REF["lora_down_b"]}}, "norm": {"bias": {"w": REF["lora_norm_b"]}}}
    return lrj.lora(rank=2, alpha=4.0, targets="up/kernel", bias="all"), jax.tree.map(jnp.asarray, tree)


def test_load_lora_biases_written_by_peft():
    params = fixture_params()
    adapter, lp = peft_io.load_peft(PEFT_DIR, params, module_name=module_name)
    assert adapter.config["bias"] == "all"
    _, want = lora_all()
    jax.tree.map(np.testing.assert_array_equal, lp, jax.tree.map(np.asarray, want))
    y = lrj.linen.apply(Net(), adapter, params, lp, jnp.asarray(REF["x"]))
    assert max_diff(y, REF["lora_y"]) < TOL
    assert max_diff(Net().apply({"params": adapter.merge(params, lp)}, REF["x"]), REF["lora_y"]) < TOL


def test_save_lora_biases_as_peft_does(tmp_path):
    from safetensors.numpy import load_file

    adapter, lp = lora_all()
    peft_io.save_peft(tmp_path, adapter, fixture_params(), lp, module_name=module_name)
    ours, theirs = (load_file(str(d / "adapter_model.safetensors")) for d in (tmp_path, PEFT_DIR))
    assert sorted(ours) == sorted(theirs)  # up.base_layer.bias (a LoRA target), down.bias, norm.bias, up.lora_A/B
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k])
    assert json.loads((tmp_path / "adapter_config.json").read_text())["bias"] == "all"


def test_lora_only_biases_are_saved_and_loaded(tmp_path):
    from safetensors.numpy import load_file

    params = fixture_params()
    adapter = lrj.lora(rank=2, targets="(up|down)/kernel", bias="lora_only")
    lp = harness.perturb(adapter.init(jax.random.key(0), params))
    peft_io.save_peft(tmp_path, adapter, params, lp, module_name=module_name)
    assert sorted(k for k in load_file(str(tmp_path / "adapter_model.safetensors")) if k.endswith("bias")) == [
        "base_model.model.down.base_layer.bias", "base_model.model.up.base_layer.bias"]
    loaded, lp2 = peft_io.load_peft(tmp_path, params, module_name=module_name)
    assert loaded.config["bias"] == "lora_only"
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b), lp2, jax.tree.map(np.asarray, lp))
    x = jnp.asarray(REF["x"])
    assert max_diff(lrj.linen.apply(Net(), loaded, params, lp2, x), lrj.linen.apply(Net(), adapter, params, lp, x)) < 1e-6


