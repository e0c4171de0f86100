"""AFLoRA equals a torch transcription of the authors' code (tests/fixtures/make_aflora.py): forward,
the freezing score and schedule over 30 AdamW steps, and the final leaves; plus the harness checks."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adapter_harness as harness
import lowrank_jax as lrj
from lowrank_jax.adapters.aflora import aflora, aflora_freezing, freezing_threshold

FIXTURE = np.load(pathlib.Path(__file__).parent / "fixtures" / "aflora.npz", allow_pickle=False)
LAYERS = ("l0", "l1", "l2")
#: make_aflora.py's CONFIG, STEPS, LR, WD
SCHEDULE = dict(total_step=30, warmup_steps=4, initial_warmup=1, final_warmup=2, delta_t=2, beta1=0.85, beta2=0.95)
LR, WD = 2e-2, 0.1


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(8, name="l0")(x))
        h = jnp.tanh(nn.Dense(8, name="l1")(h))
        return nn.Dense(4, name="l2")(h)


def _setup():
    f = FIXTURE
    variables = {"params": {n: {"kernel": jnp.asarray(f[f"{n}/weight"].T), "bias": jnp.asarray(f[f"{n}/bias"])}
                            for n in LAYERS}}
    lp = {"params": {n: {"kernel": {"a": jnp.asarray(f[f"init/{n}/lora_A"].T), "b": jnp.asarray(f[f"init/{n}/lora_B"].T),
                                    "lambda_d": jnp.asarray(f[f"init/{n}/lora_d"]),
                                    "lambda_b": jnp.asarray(f[f"init/{n}/lora_db"])}}
                     for n in LAYERS}}
    return Net(), variables, aflora(rank=2), lp, jnp.asarray(f["x"])


def _train(score="official", steps=30):
    model, variables, adapter, lp, x = _setup()
    target = jnp.asarray(FIXTURE["target"])
    opt = aflora_freezing(optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WD), **SCHEDULE, score=score)

    def loss_fn(lp):
        return jnp.mean((lrj.linen.apply(model, adapter, variables, lp, x) - target) ** 2)

    @jax.jit
    def step(lp, state):
        loss, grads = jax.value_and_grad(loss_fn)(lp)
        updates, state = opt.update(grads, state, lp)
        return optax.apply_updates(lp, updates), state, loss, updates

    state = opt.init(lp)
    history = []
    for _ in range(steps):
        lp, state, loss, updates = step(lp, state)
        frozen = [bool(state.frozen["params"][n]["kernel"][p]) for n in LAYERS for p in ("a", "b")]
        means = [(float(jnp.mean(state.exp_avg_ipt["params"][n]["kernel"][p])),
                  float(jnp.mean(state.exp_avg_unc["params"][n]["kernel"][p]))) for n in LAYERS for p in ("a", "b")]
        history.append(dict(lp=lp, loss=float(loss), frozen=frozen, means=means, updates=updates))
    return history


def test_forward_and_merge_equal_official_code():
    model, variables, adapter, lp, x = _setup()
    y = lrj.linen.apply(model, adapter, variables, lp, x)
    np.testing.assert_allclose(y, FIXTURE["y0"], atol=1e-5)
    assert float(jnp.max(jnp.abs(y - model.apply(variables, x)))) > 1e-2  # the path really changes the output
    np.testing.assert_allclose(model.apply(adapter.merge(variables, lp), x), FIXTURE["y0"], atol=1e-5)


def test_init_as_the_glue_scripts():
    _, variables, adapter, _, x = _setup()
    lp = adapter.init(jax.random.key(0), variables)["params"]["l0"]["kernel"]
    assert lp["a"].shape == (6, 2) and lp["b"].shape == (2, 8)
    for leaf, fan_in in ((lp["a"], 6), (lp["b"], 2)):  # kaiming_uniform_ (a=0): U(+-sqrt(6 / fan_in))
        bound = np.sqrt(6.0 / fan_in)
        assert 0.5 * bound < float(jnp.max(jnp.abs(leaf))) <= bound
    np.testing.assert_array_equal(lp["lambda_d"], np.full(2, 0.1, np.float32))
    np.testing.assert_array_equal(lp["lambda_b"], np.zeros(8, np.float32))


def test_freezing_schedule_table_equals_official_code():
    recorded = [(t, v) for t, v in enumerate(FIXTURE["threshold"]) if not np.isnan(v)]  # NaN: the code stopped (all frozen)
    assert len(recorded) >= 12
    for t, expected in recorded:
        threshold, mask_now = freezing_threshold(t, 30, 4, 1, 2, 2)
        np.testing.assert_allclose(threshold, expected, rtol=1e-6)
        assert mask_now == (t > 4 and (t % 2 == 0 or t > 22)), t


def test_freezing_over_training_equals_official_code():
    history = _train()
    frozen = np.asarray([h["frozen"] for h in history])
    np.testing.assert_array_equal(frozen, FIXTURE["frozen"])
    assert 0 < frozen[9].sum() < 6 and frozen[-1].all()  # progressive: some frozen before all are
    np.testing.assert_allclose([h["loss"] for h in history], FIXTURE["loss"], rtol=2e-5, atol=1e-6)
    means = np.asarray([h["means"] for h in history])
    np.testing.assert_allclose(means[..., 0], FIXTURE["exp_avg_ipt_mean"], rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(means[..., 1], FIXTURE["exp_avg_unc_mean"], rtol=1e-4, atol=1e-8)
    final = history[-1]["lp"]["params"]
    for n in LAYERS:
        k = final[n]["kernel"]
        for ours, theirs in ((k["a"], FIXTURE[f"final/{n}/lora_A"].T), (k["b"], FIXTURE[f"final/{n}/lora_B"].T),
                             (k["lambda_d"], FIXTURE[f"final/{n}/lora_d"]), (k["lambda_b"], FIXTURE[f"final/{n}/lora_db"])):
            np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_runs_in_make_train_step():
    model, variables, adapter, lp, x = _setup()
    target = jnp.asarray(FIXTURE["target"])
    opt = aflora_freezing(optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WD), **SCHEDULE)

    def loss_fn(lp, params, batch, rng):
        return jnp.mean((lrj.linen.apply(model, adapter, params, lp, batch) - target) ** 2)

    step = jax.jit(lrj.make_train_step(loss_fn, opt, adapter=adapter))
    state = opt.init(lrj.split(adapter, lp)[0])
    for t in range(12):
        lp, state, metrics = step(lp, state, variables, x, jax.random.key(0))
        np.testing.assert_allclose(metrics["loss"], FIXTURE["loss"][t], rtol=2e-5)
    frozen = [bool(state.frozen["params"][n]["kernel"][p]) for n in LAYERS for p in ("a", "b")]
    np.testing.assert_array_equal(frozen, FIXTURE["frozen"][11])


def test_frozen_projections_get_exactly_zero_updates():
    history = _train(steps=16)
    for before, after in zip(history, history[1:]):
        for i, (n, p) in enumerate((n, p) for n in LAYERS for p in ("a", "b")):
            if before["frozen"][i]:  # frozen after step t: step t + 1 leaves it bit-identical
                assert not np.any(np.asarray(after["updates"]["params"][n]["kernel"][p]))
                np.testing.assert_array_equal(after["lp"]["params"][n]["kernel"][p], before["lp"]["params"][n]["kernel"][p])
    last, prev = history[-1]["lp"]["params"], history[-2]["lp"]["params"]
    assert all(history[-2]["frozen"])
    assert float(jnp.max(jnp.abs(last["l0"]["kernel"]["lambda_b"] - prev["l0"]["kernel"]["lambda_b"]))) > 1e-4  # vectors train on


def test_paper_score_is_the_per_step_ema_of_p_times_g():
    model, variables, adapter, lp, x = _setup()
    opt = aflora_freezing(optax.sgd(0.0), **SCHEDULE, score="paper")
    grads = jax.tree.map(lambda v: jnp.full_like(v, 0.5), lp)
    state = opt.init(lp)
    _, state = jax.jit(opt.update)(grads, state, lp)
    a = lp["params"]["l0"]["kernel"]["a"]
    np.testing.assert_allclose(state.exp_avg_ipt["params"]["l0"]["kernel"]["a"], 0.15 * jnp.abs(a * 0.5), rtol=1e-6)
    np.testing.assert_allclose(state.exp_avg_unc["params"]["l0"]["kernel"]["a"], 0.05 * 0.85 * jnp.abs(a * 0.5), rtol=1e-5)
    official = aflora_freezing(optax.sgd(0.0), **SCHEDULE)
    _, ostate = jax.jit(official.update)(grads, official.init(lp), lp)  # the code's window: Ibar moves only at the next window
    np.testing.assert_array_equal(ostate.exp_avg_ipt["params"]["l0"]["kernel"]["a"], np.zeros((6, 2), np.float32))
    np.testing.assert_allclose(ostate.ipt["params"]["l0"]["kernel"]["a"], np.full((6, 2), 0.5), rtol=0)


def test_stacked_target_freezes_each_layer_separately():
    kernel = jax.random.normal(jax.random.key(0), (3, 6, 5))
    params = {"layers": {"kernel": kernel}}
    adapter = aflora(rank=2, layouts={"layers/kernel": lrj.Layout(1, 1)})
    lp = adapter.init(jax.random.key(1), params)
    opt = aflora_freezing(optax.sgd(0.1), total_step=8, warmup_steps=1, initial_warmup=1, final_warmup=1, delta_t=1)
    state = opt.init(lp)
    assert state.frozen["layers"]["kernel"]["a"].shape == (3,)
    # grads only on layer 1's projections: layers 0 and 2 score 0 and freeze first
    grads = jax.tree.map(jnp.zeros_like, lp)
    g = grads["layers"]["kernel"]
    grads["layers"]["kernel"] = {**g, "a": g["a"].at[1].set(1.0), "b": g["b"].at[1].set(1.0)}
    update = jax.jit(opt.update)
    for _ in range(4):
        _, state = update(grads, state, lp)
    np.testing.assert_array_equal(state.frozen["layers"]["kernel"]["a"], [True, False, True])
    updates, _ = update(jax.tree.map(jnp.ones_like, lp), state, lp)
    u = updates["layers"]["kernel"]["a"]
    assert not np.any(np.asarray(u[0])) and not np.any(np.asarray(u[2])) and np.all(np.asarray(u[1]) != 0)


def test_bad_input_errors_name_the_value():
    params = {"proj": {"kernel": jnp.ones((6, 3))}, "embed": {"embedding": jnp.ones((10, 4))}}
    with pytest.raises(ValueError, match=r"rank=4 .*'proj/kernel'.*min\(6, 3\)"):
        aflora(rank=4, targets="proj/kernel").init(jax.random.key(0), params)
    with pytest.raises(ValueError, match="rank=0"):
        aflora(rank=0)
    with pytest.raises(ValueError, match="dropout=1.5"):
        aflora(dropout=1.5)
    with pytest.raises(ValueError, match="'embed/embedding' is an embedding"):
        aflora(rank=2, targets="embed/embedding").init(jax.random.key(0), params)
    inner = optax.sgd(0.1)
    with pytest.raises(ValueError, match="total_step=0"):
        aflora_freezing(inner, total_step=0, warmup_steps=1)
    with pytest.raises(ValueError, match="no freezing phase"):
        aflora_freezing(inner, total_step=10, warmup_steps=5, initial_warmup=1, final_warmup=1)
    with pytest.raises(ValueError, match="beta2=1.0"):
        aflora_freezing(inner, total_step=100, warmup_steps=5, beta2=1.0)
    with pytest.raises(ValueError, match="score='adalora'"):
        aflora_freezing(inner, total_step=100, warmup_steps=5, score="adalora")
    with pytest.raises(ValueError, match="final_threshold=2"):
        aflora_freezing(inner, total_step=100, warmup_steps=5, final_threshold=2)
    frozen_variant = lrj.freeze(aflora(rank=2, targets="proj/kernel"), {"a", "b"})
    trainable, _ = lrj.split(frozen_variant, frozen_variant.init(jax.random.key(0), params))
    with pytest.raises(ValueError, match="no AFLoRA projections"):
        aflora_freezing(inner, total_step=100, warmup_steps=5).init(trainable)
    lp = aflora(rank=2, targets="proj/kernel").init(jax.random.key(0), params)
    opt = aflora_freezing(inner, total_step=100, warmup_steps=5)
    with pytest.raises(ValueError, match="needs `params`"):
        opt.update(lp, opt.init(lp))


CASE = harness.Case("aflora", lambda **kw: aflora(rank=2, **kw))


@pytest.mark.parametrize("check", sorted(harness.CHECKS))
def test_harness(check, tmp_path):
    if check == "checkpoint":
        harness.CHECKS[check](CASE, tmp_path / "ckpt")
    else:
        harness.CHECKS[check](CASE)


DEVICE_WORKER = """
import json, os, sys
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, sys.argv[1])
import jax
from jax.sharding import AxisType
import adapter_harness as harness
from lowrank_jax.adapters.aflora import aflora
case = harness.Case("aflora", lambda **kw: aflora(rank=2, **kw))
out = {}
for kind, axis in (("explicit", AxisType.Explicit), ("auto", AxisType.Auto)):
    out[kind] = harness.device_diffs(case, jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis, axis)))
print(json.dumps(out))
"""


@pytest.mark.slow
def test_eight_devices_equal_one():
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    here = pathlib.Path(__file__).parent
    proc = subprocess.run([sys.executable, "-c", DEVICE_WORKER, str(here)], capture_output=True, text=True, env=env,
                          timeout=600, cwd=here.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for kind, r in report.items():
        assert r["devices"] == 8 and r["loss"] <= CASE.tol and r["grads"] <= CASE.tol, (kind, r)
        assert any("model" in spec for spec in jax.tree.leaves(r["lp_specs"])), r["lp_specs"]  # really sharded
