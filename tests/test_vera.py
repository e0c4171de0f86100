"""VeRA equals peft 0.21.2 (tests/fixtures/make_peft_vera.py) with peft's saved projections loaded."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lrj

FIXTURE = np.load(pathlib.Path(__file__).parent / "fixtures" / "peft_vera.npz", allow_pickle=False)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="down")(jnp.tanh(nn.Dense(10, name="up")(x)))


def _setup():
    f = FIXTURE
    variables = {"params": {n: {"kernel": jnp.asarray(f[f"{n}/weight"].T), "bias": jnp.asarray(f[f"{n}/bias"])}
                            for n in ("up", "down")}}
    adapter = lrj.vera(rank=4, targets=r".*/kernel")
    lp = {"params": {n: {"kernel": {"lambda_b": jnp.asarray(f[f"{n}/lambda_b"]), "lambda_d": jnp.asarray(f[f"{n}/lambda_d"])}}
                     for n in ("up", "down")},
          lrj.tree.SHARED: {"vera_a": jnp.asarray(f["vera_A"].T), "vera_b": jnp.asarray(f["vera_B"].T)}}
    return Net(), variables, adapter, lp, jnp.asarray(f["x"])


def test_vera_output_and_merge_equal_peft():
    model, variables, adapter, lp, x = _setup()
    out = lrj.linen.apply(model, adapter, variables, lp, x)
    np.testing.assert_allclose(out, FIXTURE["y"], atol=1e-5)
    assert float(np.max(np.abs(FIXTURE["y"] - FIXTURE["y_base"]))) > 1e-2
    merged = adapter.merge(variables, lp)
    for n in ("up", "down"):
        np.testing.assert_allclose(merged["params"][n]["kernel"], FIXTURE[f"{n}/merged_weight"].T, atol=1e-6)
    unmerged = adapter.unmerge(merged, lp)
    np.testing.assert_allclose(unmerged["params"]["up"]["kernel"], variables["params"]["up"]["kernel"], atol=1e-6)


def test_vera_init_shapes_distribution_and_identity_at_step_zero():
    model, variables, adapter, _, x = _setup()
    lp = adapter.init(jax.random.key(0), variables)
    shared = lp[lrj.tree.SHARED]
    assert shared["vera_a"].shape == (10, 4) and shared["vera_b"].shape == (4, 10)  # max_in = max_out = 10
    # peft's bounds: U(+-sqrt(6 / fan_in)), fan_in = max_in for A, r for B (torch's draws cannot be reproduced)
    for ours, theirs, fan_in in ((shared["vera_a"], FIXTURE["init/vera_A"], 10), (shared["vera_b"], FIXTURE["init/vera_B"], 4)):
        bound = np.sqrt(6.0 / fan_in)
        assert float(jnp.max(jnp.abs(ours))) <= bound and float(np.max(np.abs(theirs))) <= bound
        assert float(jnp.max(jnp.abs(ours))) > 0.5 * bound
    np.testing.assert_array_equal(lp["params"]["up"]["kernel"]["lambda_d"], np.full(4, 0.1, np.float32))
    np.testing.assert_array_equal(lp["params"]["up"]["kernel"]["lambda_b"], np.zeros(10, np.float32))
    np.testing.assert_allclose(lrj.linen.apply(model, adapter, variables, lp, x), FIXTURE["y_base"], atol=1e-6)
    trainable, frozen = lrj.split(adapter, lp)
    assert set(frozen) == {lrj.tree.SHARED} and lrj.tree.SHARED not in trainable
    counts = lrj.trainable_summary(variables, lp, adapter=adapter)
    assert counts["trainable_params"] == (10 + 4) + (4 + 4)


def test_vera_target_larger_than_the_projections_is_refused():
    model, variables, adapter, lp, x = _setup()
    small = {**lp, lrj.tree.SHARED: {"vera_a": lp[lrj.tree.SHARED]["vera_a"][:6], "vera_b": lp[lrj.tree.SHARED]["vera_b"]}}
    with pytest.raises(ValueError, match=r"VeRA target 'params/down/kernel' \(10 in, 4 out\) is larger than the shared "
                                         r"projections \(vera_a \(6, 4\)"):
        lrj.linen.apply(model, adapter, variables, small, x)


# --- peft's directory format (lowrank_jax.io.peft) ---------------------------------------------------------------

PEFT_DIR = pathlib.Path(__file__).parent / "fixtures" / "peft_vera_dir"


def _module_name(path, layer):
    assert layer is None
    return path.split("/")[1]  # params/up/kernel -> up


def _tensors(directory):
    from safetensors.numpy import load_file
    return load_file(str(pathlib.Path(directory) / "adapter_model.safetensors"))


def _config(directory):
    import json
    return json.loads((pathlib.Path(directory) / "adapter_config.json").read_text())


def test_load_the_directory_peft_wrote_gives_peft_output():
    from lowrank_jax.io import peft as peft_io
    model, variables, _, lp, x = _setup()
    adapter, loaded = peft_io.load_peft(PEFT_DIR, variables, module_name=_module_name)
    assert adapter.config["method"] == "vera" and adapter.config["rank"] == 4
    assert adapter.config["d_initial"] == 0.1 and adapter.config["projection_key"] == 0 and adapter.config["dropout"] == 0.0
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), loaded, jax.tree.map(np.asarray, lp))
    np.testing.assert_allclose(lrj.linen.apply(model, adapter, variables, loaded, x), FIXTURE["y"], atol=1e-5)


def test_directory_we_write_equals_peft_and_round_trips(tmp_path):
    from lowrank_jax.io import peft as peft_io
    model, variables, adapter, lp, x = _setup()
    peft_io.save_peft(tmp_path, adapter, variables, lp, module_name=_module_name, task_type=None)
    ours, theirs = _tensors(tmp_path), _tensors(PEFT_DIR)
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype, k
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    ours_cfg, theirs_cfg = _config(tmp_path), _config(PEFT_DIR)
    for key in ("peft_type", "r", "projection_prng_key", "save_projection", "vera_dropout", "d_initial", "fan_in_fan_out",
                "bias", "init_weights", "modules_to_save", "task_type", "layers_to_transform", "layers_pattern"):
        assert ours_cfg[key] == theirs_cfg[key], key
    assert sorted(ours_cfg["target_modules"]) == sorted(theirs_cfg["target_modules"])
    adapter2, lp2 = peft_io.load_peft(tmp_path, variables, module_name=_module_name)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), lp2, jax.tree.map(np.asarray, lp))
    np.testing.assert_array_equal(lrj.linen.apply(model, adapter2, variables, lp2, x),
                                  lrj.linen.apply(model, adapter, variables, lp, x))


def test_round_trip_of_a_fresh_init_with_other_settings(tmp_path):
    from lowrank_jax.io import peft as peft_io
    _, variables, _, _, _ = _setup()
    adapter = lrj.vera(rank=3, targets=r".*/kernel", d_initial=0.5, projection_key=7, dropout=0.25)
    lp = adapter.init(jax.random.key(0), variables)
    lp["params"]["up"]["kernel"]["lambda_b"] = jnp.arange(10.0)
    peft_io.save_peft(tmp_path, adapter, variables, lp, module_name=_module_name)
    cfg = _config(tmp_path)
    assert (cfg["r"], cfg["d_initial"], cfg["projection_prng_key"], cfg["vera_dropout"]) == (3, 0.5, 7, 0.25)
    adapter2, lp2 = peft_io.load_peft(tmp_path, variables, module_name=_module_name)
    for key in ("rank", "d_initial", "projection_key", "dropout"):
        assert adapter2.config[key] == adapter.config[key], key
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), lp2, jax.tree.map(np.asarray, lp))


def _copy_fixture(tmp_path, edit):
    from safetensors.numpy import save_file
    tensors = _tensors(PEFT_DIR)
    edit(tensors)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "adapter_config.json").write_text((PEFT_DIR / "adapter_config.json").read_text())
    return tmp_path


def test_load_without_projections_is_refused(tmp_path):
    from lowrank_jax.io import peft as peft_io
    _, variables, _, _, _ = _setup()
    directory = _copy_fixture(tmp_path, lambda t: [t.pop(k) for k in ("base_model.vera_A", "base_model.vera_B")])
    with pytest.raises(ValueError, match=r"no shared projections .*save_projection=.*torch's RNG .*cannot regenerate"):
        peft_io.load_peft(directory, variables, module_name=_module_name)


def test_load_a_target_larger_than_the_projections_is_refused(tmp_path):
    from lowrank_jax.io import peft as peft_io
    _, variables, _, _, _ = _setup()

    def shrink(t):
        t["base_model.vera_A"] = np.ascontiguousarray(t["base_model.vera_A"][:, :6])  # max_in 6 < down's 10 inputs

    directory = _copy_fixture(tmp_path, shrink)
    with pytest.raises(ValueError, match=r"VeRA target 'params/down/kernel' \(10 in, 4 out\) is larger than the shared "
                                         r"projections \(max_in 6, max_out 10\)"):
        peft_io.load_peft(directory, variables, module_name=_module_name)
