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
