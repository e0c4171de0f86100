"""LaMDA equals a torch transcription of the official code (tests/fixtures/make_lamda.py); LaMDA++ ranks; errors."""

import pathlib
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adapter_harness as harness
import lowrank_jax as lrj
from lowrank_jax.adapters.lamda import lamda, lamda_plus, lamda_plus_ranks
from lowrank_jax.optim.lamda_freeze import freeze_step_thresholds, frozen_components, lamda_freeze

ROOT = pathlib.Path(__file__).parent
FIXTURE = np.load(ROOT / "fixtures" / "lamda.npz", allow_pickle=False)
LAYERS = ("lin1", "lin2")
STEPS = len(FIXTURE["t"])


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="lin2")(jnp.tanh(nn.Dense(8, name="lin1")(x)))


def _setup():
    f = FIXTURE
    variables = {"params": {n: {"kernel": jnp.asarray(f[f"{n}/kernel"]), "bias": jnp.asarray(f[f"{n}/bias"])} for n in LAYERS}}
    lp = {"params": {n: {"kernel": {k: jnp.asarray(f[f"init/{n}/{k}"]) for k in "asb"}} for n in LAYERS}}
    adapter = lamda(rank=4, alpha=8.0, targets=r".*/kernel", max_steps=4, freeze_fraction=0.3)
    return Net(), variables, adapter, lp


def _trajectory(mode: str):
    """``[(raw grads, adapter tree after the step)]`` over the fixture's steps, with lamda_freeze(mode) on AdamW."""
    model, variables, adapter, lp = _setup()
    opt = lamda_freeze(adapter, optax.adamw(0.05, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01), mode=mode)

    def loss_fn(lp, variables, batch, rng):
        x, target = batch
        return jnp.mean(jnp.square(lrj.linen.apply(model, adapter, variables, lp, x) - target))

    step = jax.jit(lrj.make_train_step(loss_fn, opt, adapter=adapter, return_grads=True))
    state = opt.init(lrj.split(adapter, lp)[0])
    out = []
    for k in range(STEPS):
        lp, state, metrics = step(lp, state, variables, (FIXTURE["x"][k], FIXTURE["target"][k]), None)
        out.append((metrics["grads"], lp))
    return model, variables, adapter, out


def test_forward_at_init_equals_official():
    model, variables, adapter, lp = _setup()
    y = lrj.linen.apply(model, adapter, variables, lp, FIXTURE["x"][0])
    np.testing.assert_allclose(y, FIXTURE["y_init"], atol=1e-6)
    np.testing.assert_allclose(y, FIXTURE["y_base"], atol=1e-6)  # b = 0 at init


@pytest.mark.parametrize("mode,run", [("gradient", "official"), ("update", "exact")])
def test_gradients_params_and_outputs_equal_torch_over_steps(mode, run):
    model, variables, adapter, traj = _trajectory(mode)
    for k, (grads, lp) in enumerate(traj, start=1):
        for n in LAYERS:
            for leaf in "sb" if k <= 5 else "s":  # at step 6 torch computes no gradient of b (requires_grad False)
                np.testing.assert_allclose(grads["params"][n]["kernel"][leaf], FIXTURE[f"{run}/step{k}/grad/{n}/{leaf}"],
                                           rtol=1e-5, atol=5e-6, err_msg=f"grad {n}/{leaf} step {k}")
                np.testing.assert_allclose(lp["params"][n]["kernel"][leaf], FIXTURE[f"{run}/step{k}/{n}/{leaf}"],
                                           rtol=1e-5, atol=5e-6, err_msg=f"{n}/{leaf} after step {k}")
            np.testing.assert_array_equal(lp["params"][n]["kernel"]["a"], FIXTURE[f"init/{n}/a"])  # A never moves
        y = lrj.linen.apply(model, adapter, variables, lp, FIXTURE["x"][0])
        np.testing.assert_allclose(y, FIXTURE[f"{run}/step{k}/y"], atol=2e-5)  # fp32 sums of a 3-layer net
    # not vacuous: S gets a nonzero gradient once b != 0, and b moved
    assert float(np.max(np.abs(FIXTURE[f"{run}/step2/grad/lin2/s"]))) > 1e-2
    assert float(np.max(np.abs(FIXTURE[f"{run}/step4/lin2/b"][3]))) > 1e-2
    assert not np.any(FIXTURE[f"{run}/step6/grad/lin2/b"])  # recorded as zeros: torch's grad was None


def test_schedule_goes_through_every_stage():
    assert FIXTURE["t"].tolist() == [0, 1, 2, 3, 4, 5]  # rank 4: rows freeze one by one, full at step 5, out at 6
    assert [frozen_components(k, 4, 0.3) for k in range(1, 7)] == FIXTURE["t"].tolist()


def test_exact_mode_freezes_rows_to_the_bit_and_official_mode_leaks_momentum():
    _, _, _, exact = _trajectory("update")
    _, _, _, official = _trajectory("gradient")
    t = FIXTURE["t"]
    init_b = FIXTURE["init/lin2/b"]
    for k in range(1, STEPS):  # from step k+1 on, the rows < t_{k+1} (all rows once t >= 4) keep their value
        frozen = min(int(t[k]), 4)
        prev = np.asarray(exact[k - 1][1]["params"]["lin2"]["kernel"]["b"] if k else init_b)
        now = np.asarray(exact[k][1]["params"]["lin2"]["kernel"]["b"])
        np.testing.assert_array_equal(now[:frozen], prev[:frozen])
        if frozen < 4:
            assert float(np.max(np.abs(now[frozen:] - prev[frozen:]))) > 1e-4  # the others train
    # the official zeroing of gradients: row 0 still moves at step 3 (momentum, weight decay)
    b2 = np.asarray(official[1][1]["params"]["lin2"]["kernel"]["b"])
    b3 = np.asarray(official[2][1]["params"]["lin2"]["kernel"]["b"])
    assert float(np.max(np.abs(b3[0] - b2[0]))) > 1e-3
    # and at step 5 (t reaches r) the official code applies b's full gradient once, then nothing
    b4, b5, b6 = (np.asarray(official[i][1]["params"]["lin2"]["kernel"]["b"]) for i in (3, 4, 5))
    assert float(np.max(np.abs(b5[:3] - b4[:3]))) > 1e-4
    np.testing.assert_array_equal(b6, b5)


def test_thresholds_match_the_official_float_formula():
    for max_steps in (1, 2, 3, 4, 7, 10, 33, 100, 1000):
        for fraction in (0.05, 0.1, 0.3, 0.7, 1.0):
            thresholds = freeze_step_thresholds(8, max_steps, fraction)
            for k in range(1, int(8 * fraction * max_steps) + 5):
                assert min(int(np.sum(k >= thresholds)), 8) == min(frozen_components(k, max_steps, fraction), 8), (
                    max_steps, fraction, k)
    # 0.1 * 3 = 0.30000000000000004 in float64: the official t at step 3 is int(9.999999999999998) = 9, not 10
    assert frozen_components(3, 3, 0.1) == 9
    assert freeze_step_thresholds(10, 3, 0.1).tolist() == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4]


def test_freeze_is_jittable_under_traced_step_and_counts_steps():
    adapter = lamda(rank=3, alpha=3.0, targets=".*", max_steps=10, freeze_fraction=0.1)  # t = k
    tx = lamda_freeze(adapter, optax.sgd(1.0), mode="update")
    grads = {"w": {"s": jnp.ones((2, 3, 3)), "b": jnp.ones((2, 3, 4))}}  # a stacked target [L=2, r, out]
    state = tx.init(grads)
    update = jax.jit(tx.update)
    seen = []
    for _ in range(4):
        u, state = update(grads, state)
        seen.append(np.asarray(u["w"]["b"][1, :, 0]).tolist())
        np.testing.assert_array_equal(u["w"]["s"], -np.ones((2, 3, 3)))  # S always trains
    assert seen == [[0, -1, -1], [0, 0, -1], [0, 0, 0], [0, 0, 0]]
    assert int(state.count) == 4


def test_no_gradient_of_a_is_computed():
    """Neither the trainable tree nor the backward holds an [in, r] product; LoRA's does (positive control)."""
    model, variables, adapter, lp = _setup()
    x = FIXTURE["x"][0]

    def dot_shapes(adapter, lp):
        trainable, frozen = lrj.split(adapter, lp)
        fn = jax.grad(lambda t: jnp.sum(lrj.linen.apply(model, adapter, variables, lrj.join(adapter, t, frozen), x) ** 2))
        jaxpr = jax.make_jaxpr(fn)(trainable)
        shapes = set()

        def walk(jp):
            for eqn in jp.eqns:
                if eqn.primitive.name == "dot_general":
                    shapes.update(tuple(v.aval.shape) for v in eqn.outvars)
                for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                    walk(sub)

        walk(jaxpr.jaxpr)
        return trainable, shapes

    trainable, shapes = dot_shapes(adapter, lp)
    assert harness.leaf_names(trainable) == {"s", "b"}
    # lin1's a is [6, 4] (6 = the input width, no other product of this net has it; lin2's [8, 4] is also
    # the shape of lin1's (s b)^T gradient, so it cannot tell)
    assert (6, 4) not in shapes and (4, 6) not in shapes
    lora = lrj.lora(rank=4, alpha=8.0, targets=r".*/kernel")
    lora_lp = {"params": {n: {"kernel": {"a": lp["params"][n]["kernel"]["a"], "b": jnp.ones((4, 5 if n == "lin2" else 8))}}
                          for n in LAYERS}}
    _, lora_shapes = dot_shapes(lora, lora_lp)
    assert (6, 4) in lora_shapes or (4, 6) in lora_shapes


def test_merge_equals_scale_a_s_b():
    model, variables, adapter, lp = _setup()
    lp = harness.perturb(lp)
    merged = adapter.merge(variables, lp)
    for n in LAYERS:
        f = lp["params"][n]["kernel"]
        want = FIXTURE[f"{n}/kernel"] + 2.0 * np.asarray(f["a"]) @ np.asarray(f["s"]) @ np.asarray(f["b"])
        np.testing.assert_allclose(merged["params"][n]["kernel"], want, atol=1e-5)


def test_default_init_statistics_follow_the_official_code():
    params = {"params": {"w": {"kernel": jnp.ones((64, 48))}}}
    lp = lamda(rank=16, alpha=16.0, targets=".*", max_steps=10).init(jax.random.key(0), params)["params"]["w"]["kernel"]
    assert np.all(np.asarray(lp["b"]) == 0)
    for leaf, fan_in in (("a", 64), ("s", 16)):  # U(-1/sqrt(fan_in), 1/sqrt(fan_in)): peft lora_A, torch nn.Linear
        v = np.asarray(lp[leaf])
        assert np.max(np.abs(v)) <= 1 / np.sqrt(fan_in)
        np.testing.assert_allclose(np.std(v), 1 / np.sqrt(3 * fan_in), rtol=0.15)


def test_svd_init_is_the_top_r_part_and_the_residual_restores_w():
    w = jax.random.normal(jax.random.key(3), (3, 12, 10))  # a stacked kernel, one SVD per layer
    params = {"params": {"w": {"kernel": w}}}
    adapter = lamda(rank=3, alpha=6.0, targets=".*", max_steps=10, init="svd", layouts={"params/w/kernel": lrj.Layout(1, 1)})
    lp, residual = lrj.init_with_residual(adapter, jax.random.key(0), params)
    leaves = lp["params"]["w"]["kernel"]
    for i in range(3):
        u, sv, vh = np.linalg.svd(np.asarray(w[i], np.float64), full_matrices=False)
        a, s, b = (np.asarray(leaves[k][i], np.float64) for k in "asb")
        np.testing.assert_allclose(a.T @ a, np.eye(3), atol=1e-5)
        np.testing.assert_allclose(b @ b.T, np.eye(3), atol=1e-5)
        np.testing.assert_allclose(np.diag(s) * 2.0, sv[:3], rtol=1e-5)  # s = diag(sigma_r) / (alpha / r)
        np.testing.assert_allclose(2.0 * a @ s @ b, (u[:, :3] * sv[:3]) @ vh[:3], atol=1e-4)
    np.testing.assert_allclose(adapter.merge(residual, lp)["params"]["w"]["kernel"], w, atol=1e-5)


def _mlp_params():
    rng = np.random.default_rng(0)
    low = rng.standard_normal((16, 2)) @ rng.standard_normal((2, 12))  # energy in 2 directions
    return {"params": {"q": {"kernel": jnp.asarray(low + 0.01 * rng.standard_normal((16, 12)), jnp.float32)},
                       "v": {"kernel": jnp.asarray(rng.standard_normal((16, 12)), jnp.float32)},
                       "o": {"kernel": jnp.asarray(rng.standard_normal((12, 16)), jnp.float32)}}}


def test_lamda_plus_ranks_follow_the_energy_formula():
    params = _mlp_params()
    ranks = lamda_plus_ranks(params, r".*/kernel", 12)
    assert sum(ranks.values()) == 12
    energy = {}
    for name in ("q", "v", "o"):
        sv = np.linalg.svd(np.asarray(params["params"][name]["kernel"], np.float64), compute_uv=False)
        energy[name] = np.sum(sv[:4] ** 2) / np.sum(sv**2)  # k = 12 // 3
    share = {n: 12 * e / sum(energy.values()) for n, e in energy.items()}
    for n in energy:
        assert abs(ranks[f"params/{n}/kernel"] - share[n]) < 1.0, (ranks, share)
    assert ranks["params/q/kernel"] > ranks["params/v/kernel"]  # the low-rank layer holds more energy at the top
    adapter = lamda_plus(12, 8.0, r".*/kernel", 100, params)
    lp = adapter.init(jax.random.key(0), params)
    assert {n: lp["params"][n]["kernel"]["s"].shape[0] for n in ("q", "v", "o")} == {
        n: ranks[f"params/{n}/kernel"] for n in ("q", "v", "o")}
    assert adapter.config["method"] == "lamda++"


def test_lamda_plus_ranks_clip_at_the_bounds():
    params = _mlp_params()
    ranks = lamda_plus_ranks(params, r".*/kernel", 34, min_rank=2)
    assert sum(ranks.values()) == 34 and all(2 <= r <= 12 for r in ranks.values())
    assert ranks["params/q/kernel"] == 12  # clipped at min(in, out)


def test_lamda_plus_errors():
    params = _mlp_params()
    with pytest.raises(ValueError, match=r"total_rank=2 cannot be met.*\[3, 36\]"):
        lamda_plus_ranks(params, r".*/kernel", 2)
    with pytest.raises(ValueError, match=r"total_rank=37 cannot be met"):
        lamda_plus_ranks(params, r".*/kernel", 37)
    stacked = {"params": {"w": {"kernel": jnp.ones((2, 6, 5))}}}
    with pytest.raises(ValueError, match=r"'params/w/kernel'.*stacks 2 layers"):
        lamda_plus_ranks(stacked, ".*", 4, layouts={"params/w/kernel": lrj.Layout(1, 1)})


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=7), r"rank 7 for 'params/w/kernel' exceeds min\(in, out\) = min\(6, 5\)"),
    (dict(max_steps=None), r"`max_steps` is required"),
    (dict(max_steps=0), r"`max_steps` must be an integer >= 1, got 0"),
    (dict(max_steps=-3), r"`max_steps` must be an integer >= 1, got -3"),
    (dict(freeze_fraction=0.0), r"`freeze_fraction` must be in \(0, 1\], got 0.0"),
    (dict(freeze_fraction=1.5), r"`freeze_fraction` must be in \(0, 1\], got 1.5"),
    (dict(init="pissa"), r"`init` must be one of \('kaiming', 'svd'\), got 'pissa'"),
    (dict(rank=0), r"`rank` must be an integer >= 1, got 0"),
    (dict(dropout=1.0), r"`dropout` must be in \[0, 1\), got 1.0"),
])
def test_bad_input_raises_naming_the_value(kwargs, match):
    params = {"params": {"w": {"kernel": jnp.ones((6, 5))}}}
    args = dict(rank=2, alpha=4.0, targets=".*/kernel", max_steps=10) | kwargs
    with pytest.raises(ValueError, match=match):
        lamda(**args).init(jax.random.key(0), params)


def test_bad_freeze_input_raises():
    adapter = lamda(rank=2, alpha=4.0, targets=".*", max_steps=10)
    with pytest.raises(ValueError, match=r"`mode` must be one of \('gradient', 'update'\), got 'grad'"):
        lamda_freeze(adapter, optax.sgd(1.0), mode="grad")
    with pytest.raises(ValueError, match=r"needs a LaMDA adapter.*'lora'"):
        lamda_freeze(lrj.lora(rank=2), optax.sgd(1.0))
    tx = lamda_freeze(adapter, optax.sgd(1.0))
    with pytest.raises(ValueError, match=r"'w' has b but no s"):
        tx.update({"w": {"b": jnp.ones((2, 3))}}, tx.init({"w": {"b": jnp.ones((2, 3))}}))


def test_embedding_and_non_linear_sites_are_refused():
    params = {"params": {"embed": {"embedding": jnp.ones((10, 4))}}}
    with pytest.raises(ValueError, match=r"'params/embed/embedding' is an embedding"):
        lamda(rank=2, alpha=4.0, targets=".*", max_steps=10).init(jax.random.key(0), params)


# ----------------------------------------------------------------------------- the shared harness

CASES = [
    harness.Case("lamda", lambda **kw: lamda(rank=2, alpha=4.0, max_steps=10, **kw)),
    harness.Case("lamda_svd", lambda **kw: lamda(rank=2, alpha=4.0, max_steps=10, init="svd", **kw), offset=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("check", sorted(harness.CHECKS))
def test_harness(case, check, tmp_path):
    if check == "checkpoint":
        harness.CHECKS[check](case, tmp_path / "ckpt")
    else:
        harness.CHECKS[check](case)


@pytest.mark.slow
def test_bench_lamda_quick_runs(tmp_path):
    out = tmp_path / "lamda.json"
    proc = subprocess.run([sys.executable, str(ROOT.parent / "benchmarks" / "bench_lamda.py"), "--quick", "--tiny",
                           "--out", str(out)], capture_output=True, text=True, timeout=900, cwd=ROOT.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    result = json.loads(out.read_text())
    lamda_row = next(r for r in result["rows"] if r["key"] == "lamda")
    assert lamda_row["params_x_lora"] < 1.0
    assert lamda_row["flops_x_lora"] < 1.0
    # the FLOPs LaMDA saves are LoRA's dA (2 T in r per target and block), give or take S's O(r^2 out)
    assert 0.9 < lamda_row["flops_saved"] / lamda_row["a_grad_flops_expected"] < 1.3
    assert re.search(r"\| LaMDA \(r=8", proc.stdout)


_DEVICES = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, sys.argv[1])
import jax
from jax.sharding import AxisType
import adapter_harness as harness
import test_lamda
case = test_lamda.CASES[0]
out = {}
for kind, axis in (("explicit", AxisType.Explicit), ("auto", AxisType.Auto)):
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis, axis))
    d = harness.device_diffs(case, mesh)
    out[kind] = {"loss": d["loss"], "grads": d["grads"], "devices": d["devices"], "lp_specs": d["lp_specs"]}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_eight_devices_match_one_on_explicit_and_auto_meshes():
    import json

    proc = subprocess.run([sys.executable, "-c", _DEVICES, str(ROOT)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for kind in ("explicit", "auto"):
        assert report[kind]["devices"] == 8
        assert report[kind]["loss"] < 1e-5 and report[kind]["grads"] < 1e-5, (kind, report[kind])
    # B follows the column-parallel kernel's output axis; A's input axis and S are not sharded there
    assert report["explicit"]["lp_specs"]["layers_0"]["up"]["kernel"] == {"a": "P(None, None)", "b": "P(None, 'model')",
                                                                         "s": "P(None, None)"}
    assert report["explicit"]["lp_specs"]["layers_0"]["down"]["kernel"]["a"] == "P('model', None)"  # row-parallel


def test_peft_export_refuses_lamda(tmp_path):
    """peft has no LaMDA format: exporting it as LoRA would drop S silently, so it raises naming S's role."""
    from lowrank_jax.io import peft as peft_io

    model, variables, adapter, lp = _setup()
    with pytest.raises(ValueError, match=r"cannot export adapter 'lamda' in peft's LoRA format.*'s'"):
        peft_io.save_peft(tmp_path / "out", adapter, variables, lp)
