"""AdaLoRA (``lowrank_jax.adapters.adalora``, ``lowrank_jax.io.peft_adalora``) against peft 0.21.2.

Reference values: ``tests/fixtures/make_peft_adalora.py`` (``peft_adalora.npz``, ``peft_adalora_dir/``).
"""

import functools
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adapter_harness as harness
import lowrank_jax as lrj
from lowrank_jax.adapters.adalora import adalora, adalora_allocator
from lowrank_jax.io.peft_adalora import load_peft_adalora, save_peft_adalora

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
PEFT_DIR = FIXTURES / "peft_adalora_dir"
NAMES = ("lin1", "lin2")


@functools.cache
def ref():
    return dict(np.load(FIXTURES / "peft_adalora.npz", allow_pickle=False))


class Net(nn.Module):
    """The fixture's ``lin2(tanh(lin1(x)))``."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(7, name="lin2")(jnp.tanh(nn.Dense(10, name="lin1")(x)))


def module_name(path, layer):
    return path.split("/")[0]


def base_params():
    z = ref()
    return {n: {"kernel": z[f"{n}_W"].T, "bias": z[f"{n}_b"]} for n in NAMES}


def fixture_adapter():
    init_r, target_r, alpha, total, tinit, tfinal, delta_t = (int(v) for v in ref()["config"])
    return adalora(init_r=init_r, target_r=target_r, total_step=total, tinit=tinit, tfinal=tfinal, delta_t=delta_t,
                   alpha=alpha, orth_reg_weight=float(ref()["orth_reg_weight"]), targets=r"lin\d/kernel")


def flax_tree(a, e, b):
    """Flax-orientation leaves from peft's ``lora_A [r, in]``, ``lora_E [r, 1]``, ``lora_B [out, r]``."""
    return {"a": jnp.asarray(a.T), "e": jnp.asarray(e[:, 0]), "b": jnp.asarray(b.T)}


def adapter_tree(get):
    return {n: {"kernel": flax_tree(*(get(n, k) for k in "AEB"))} for n in NAMES}


def test_forward_merge_and_penalty_match_peft():
    z, adapter, params = ref(), fixture_adapter(), base_params()
    lp = adapter_tree(lambda n, k: z[f"fwd_{n}_{k}"])
    assert jax.tree.map(jnp.shape, jax.eval_shape(adapter.init, jax.random.key(0), params)) == jax.tree.map(jnp.shape, lp)
    y = lrj.linen.apply(Net(), adapter, params, lp, z["x"])
    harness.assert_close(y, z["fwd_y"], 2e-6, "output vs peft")
    merged = adapter.merge(params, lp)
    for n in NAMES:
        harness.assert_close(merged[n]["kernel"].T, z[f"fwd_{n}_merged_W"], 1e-6, f"merged {n} vs peft")
    harness.assert_close(adapter.unmerge(merged, lp), params, 1e-6, "unmerge")
    penalty = adapter.penalty(params, lp)
    np.testing.assert_allclose(float(penalty), z["fwd_orth"], rtol=1e-6)
    np.testing.assert_allclose(adapter.config["orth_reg_weight"] * float(penalty), z["fwd_loss"], rtol=1e-6)
    assert np.isfinite(jax.grad(lambda t: adapter.penalty(params, t))(lp)["lin1"]["kernel"]["a"]).all()


def test_init_is_peft_init():
    lp = adalora(init_r=12, target_r=8, total_step=10).init(jax.random.key(0), {"w": {"kernel": jnp.zeros((300, 200))}})
    leaves = lp["w"]["kernel"]
    assert leaves["a"].shape == (300, 12) and leaves["e"].shape == (12,) and leaves["b"].shape == (12, 200)
    assert float(jnp.max(jnp.abs(leaves["e"]))) == 0.0
    for n in "ab":
        np.testing.assert_allclose(float(jnp.std(leaves[n])), 0.02, rtol=0.05)


@functools.cache
def replay():
    """Our allocator through the fixture's 20 steps: SGD with peft's recorded gradients, then ``update``."""
    z, adapter = ref(), fixture_adapter()
    lp = adapter_tree(lambda n, k: z[f"run_{n}_{k}0"] if k != "E" else np.zeros((int(z["config"][0]), 1), np.float32))
    allocator = adalora_allocator(adapter, lp)
    lr = float(z["lr"])

    @jax.jit
    def step(lp, state, grads, t):
        lp = jax.tree.map(lambda p, g: p - lr * g, lp, grads)
        return allocator.update(lp, grads, state, t)

    state, history = allocator.init(lp), []
    for t in range(len(z["run_budget"])):
        grads = adapter_tree(lambda n, k, t=t: z[f"run_grad_{n}_{k}"][t])
        lp, state = step(lp, state, grads, jnp.int32(t))
        history.append((lp, state))
    return adapter, allocator, [h[0] for h in history], [h[1] for h in history]


def test_budget_schedule_matches_peft():
    z = ref()
    _, allocator, _, _ = replay()
    budget = jax.jit(allocator.budget)
    for t, (b, m) in enumerate(zip(z["run_budget"], z["run_mask_ind"])):
        assert allocator.budget(t) == (int(b), bool(m)), t
        traced = budget(jnp.int32(t))
        assert (int(traced[0]), bool(traced[1])) == (int(b), bool(m)), t


def test_masks_and_parameters_match_peft_run():
    z = ref()
    _, _, history, states = replay()
    worst = {"params": 0.0, "ipt": 0.0, "unc": 0.0}
    for t, (lp, state) in enumerate(zip(history, states)):
        for n in NAMES:
            leaves = lp[n]["kernel"]
            zero = np.asarray(leaves["e"] == 0).astype(np.int32)
            np.testing.assert_array_equal(zero, z[f"run_{n}_E_zero"][t], err_msg=f"{n} masked ranks after step {t}")
            for what, ours, prefix in (("params", leaves, ""), ("ipt", state.ipt[n]["kernel"], "ipt_"),
                                       ("unc", state.unc[n]["kernel"], "unc_")):
                want = flax_tree(*(z[f"run_{n}_{prefix}{k}"][t] for k in "AEB"))
                worst[what] = max(worst[what], harness.max_diff(ours, want))
    assert max(worst.values()) < 1e-6, worst
    state = states[-1]
    assert bool(state.masked)
    for n in NAMES:
        np.testing.assert_array_equal(np.asarray(state.pattern[n]["kernel"]["e"]), z[f"run_{n}_pattern"].astype(bool))
    assert float(sum(jnp.sum(jnp.abs(v)) for v in jax.tree.leaves(state.ipt))) == 0.0  # reset at total - tfinal
    adapter = replay()[0]
    harness.assert_close(lrj.linen.apply(Net(), adapter, base_params(), history[-1], z["x"]), z["run_y"], 2e-6, "run_y")


def test_loader_reproduces_peft_outputs():
    z = ref()
    adapter, lp = load_peft_adalora(PEFT_DIR, base_params(), module_name=module_name)
    for n in NAMES:
        assert lp[n]["kernel"]["e"].shape == (int(z[f"run_{n}_pattern"].sum()),)
    assert adapter.config["init_r"] == int(z["config"][0])  # the scale keeps ranknum = init_r
    harness.assert_close(lrj.linen.apply(Net(), adapter, base_params(), lp, z["x"]), z["load_y"], 2e-6, "load_y")


def test_saver_writes_peft_directory(tmp_path):
    from safetensors.numpy import load_file

    adapter, _, history, states = replay()
    ours = save_peft_adalora(tmp_path / "ours", adapter, base_params(), history[-1], states[-1], module_name=module_name)
    theirs, mine = load_file(str(PEFT_DIR / "adapter_model.safetensors")), load_file(str(ours / "adapter_model.safetensors"))
    assert sorted(theirs) == sorted(mine)
    for k in theirs:
        assert theirs[k].shape == mine[k].shape, k
        np.testing.assert_allclose(mine[k], theirs[k], atol=1e-5, err_msg=k)
    want = json.loads((PEFT_DIR / "adapter_config.json").read_text())
    got = json.loads((ours / "adapter_config.json").read_text())
    for key in ("peft_type", "init_r", "target_r", "lora_alpha", "lora_dropout", "total_step", "tinit", "tfinal", "deltaT",
                "beta1", "beta2", "orth_reg_weight", "rank_pattern", "target_modules", "bias", "fan_in_fan_out",
                "inference_mode", "r", "use_dora", "use_rslora"):
        assert got[key] == want[key], key
    # and it reads back to the same function
    adapter2, lp2 = load_peft_adalora(ours, base_params(), module_name=module_name)
    harness.assert_close(lrj.linen.apply(Net(), adapter2, base_params(), lp2, ref()["x"]), ref()["load_y"], 2e-6, "reload")


def test_saver_before_any_mask_keeps_every_rank(tmp_path):
    adapter, allocator, history, _ = replay()
    out = save_peft_adalora(tmp_path / "early", adapter, base_params(), history[0], allocator.init(history[0]),
                            module_name=module_name)
    assert json.loads((out / "adapter_config.json").read_text())["rank_pattern"] is None
    _, lp = load_peft_adalora(out, base_params(), module_name=module_name)
    harness.assert_equal(lp, jax.tree.map(np.asarray, history[0]))


def test_stacked_allocation_save_and_load(tmp_path):
    """A scanned (stacked) tree is allocated as its layers would be one by one (each its own peft module), saved
    as one peft module per layer, and read back zero-padded where its layers kept different ranks."""
    params = harness.base_model(harness.MLP)[2]
    adapter = adalora(init_r=4, target_r=2, total_step=10)
    lp = harness.perturb(adapter.init(jax.random.key(0), params))
    grads = harness.perturb(lp, seed=3, std=1.0)
    stacked, stacked_grads, stacked_params = harness.stack_layers(lp), harness.stack_layers(grads), harness.stack_layers(params)
    flat_alloc, stack_alloc = adalora_allocator(adapter, lp), adalora_allocator(adapter, stacked)
    # 4 matrices (2 layers x up, down): budget 16 -> 8; step 3: int(8 * 0.7^3 + 8) = 10
    assert flat_alloc.budget(3) == stack_alloc.budget(3) == (10, True)

    @jax.jit
    def both(lp, stacked, s1, s2):
        for t in (2, 3):  # both mask
            lp, s1 = flat_alloc.update(lp, grads, s1, t)
            stacked, s2 = stack_alloc.update(stacked, stacked_grads, s2, t)
        return lp, stacked, s2

    lp, stacked, state = both(lp, stacked, flat_alloc.init(lp), stack_alloc.init(stacked))
    harness.assert_equal(harness.stack_layers(lp), stacked)
    masked = sum(int(jnp.sum(leaves["e"] == 0)) for leaves in (stacked["layers"]["up"]["kernel"], stacked["layers"]["down"]["kernel"]))
    assert masked == 16 - 10

    layouts = {f"layers/{n}/kernel": lrj.Layout(1, 1) for n in ("up", "down")}
    adapter = adalora(init_r=4, target_r=2, total_step=10, layouts=layouts)
    name = lambda path, layer: f"model.layers.{layer}.{path.split('/')[1]}"  # noqa: E731
    out = save_peft_adalora(tmp_path, adapter, stacked_params, stacked, state, module_name=name)
    ranks = {k: int(sum(v)) for k, v in json.loads((out / "adapter_config.json").read_text())["rank_pattern"].items()}
    assert len(ranks) == 4 and sum(ranks.values()) == 10 and len(set(ranks.values())) > 1, ranks
    adapter2, lp2 = load_peft_adalora(out, stacked_params, layouts=layouts, module_name=name)
    harness.assert_close(adapter2.merge(stacked_params, lp2), adapter.merge(stacked_params, stacked), 1e-6, "merged")


@pytest.mark.parametrize("kwargs, match", [
    (dict(total_step=None), "total_step=None"),
    (dict(total_step=0), "total_step=0"),
    (dict(total_step=10, tinit=6, tfinal=4), "tinit=6 >= total_step - tfinal = 10 - 4 = 6"),
    (dict(total_step=10, init_r=4, target_r=6), "target_r=6 > init_r=4"),
    (dict(total_step=10, beta1=1.0), "beta1=1.0"),
    (dict(total_step=10, orth_reg_weight=-1.0), "orth_reg_weight=-1.0"),
])
def test_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace("+", r"\+")):
        adalora(**kwargs)


def test_wrong_adapter_and_directory():
    with pytest.raises(ValueError, match="lrj.adalora"):
        adalora_allocator(lrj.lora(rank=2))
    with pytest.raises(ValueError, match="adapter_params"):
        adalora_allocator(adalora(total_step=10)).budget(3)
    with pytest.raises(ValueError, match="not an AdaLoRA adapter"):
        load_peft_adalora(FIXTURES / "peft_adapter_dense", base_params(), module_name=module_name)
    with pytest.raises(ValueError, match="embedding"):
        adalora(total_step=10, targets=".*").init(jax.random.key(0), {"emb": {"embedding": jnp.zeros((5, 4))}})


