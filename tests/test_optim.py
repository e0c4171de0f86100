"""lrj.optim: one harness over every optimizer, then each method against its reference and its defining property.

The harness (as optax's ``contrib/_common_test.py``) runs every optimizer through
jit (without retracing), bf16/f32 dtype preservation with the state stable under
``lax.cond``, ``optax.MultiSteps`` accumulation, a schedule as learning rate,
non-finite gradients, and (in a subprocess with 8 simulated devices, run as
``python tests/test_optim.py sharded``) state shardings stable across an update on
Explicit and Auto meshes. Reference values come from
``tests/fixtures/make_optim_references.py`` (galore-torch, peft, bitsandbytes).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_jax as lrj
import lowrank_jax.optim as lo
from lowrank_jax.optim import _blockwise8, _linalg

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
REFS = json.loads((FIXTURES / "optim_references.json").read_text())

# ----------------------------------------------------------------------------- the shared harness

OPTIMIZERS = {
    "lora_plus": lambda lr: lo.lora_plus(lr, 16.0, weight_decay=0.01),
    "galore": lambda lr: lo.galore(lr, rank=2, update_proj_gap=2, weight_decay=0.01),
    "galore_8bit": lambda lr: lo.galore(
        lr, rank=2, update_proj_gap=2, proj_type="reverse_std",
        inner=lo.scale_by_adam_hf(eight_bit=True, block_size=16, min_8bit_size=4)),
    "lora_fa": lambda lr: lo.lora_fa(lr, scale=2.0, weight_decay=0.01),
    "lora_pro": lambda lr: lo.lora_pro(lr, scale=2.0, weight_decay=0.01),
}
NAMES = list(OPTIMIZERS)
# galore_8bit only changes how GaLore stores its moments: the wrappers' tests (MultiSteps, schedules,
# apply_if_finite) run on the other four, the dtype, jit and sharding tests on all five
WRAPPED = [n for n in NAMES if n != "galore_8bit"]


def harness_params(dtype=jnp.float32, seed=0):
    """An adapter-like tree: a LoRA target, a plain matrix (GaLore's), a bias."""
    k = jax.random.split(jax.random.key(seed), 4)
    p = {
        "layer": {"kernel": {"a": jax.random.normal(k[0], (16, 4)) * 0.3, "b": jax.random.normal(k[1], (4, 12)) * 0.3}},
        "w": jax.random.normal(k[2], (12, 8)),
        "bias": jax.random.normal(k[3], (8,)),
    }
    return jax.tree.map(lambda x: x.astype(dtype), p)


def harness_grads(params, step):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(100 + step), len(leaves))
    return treedef.unflatten([jax.random.normal(k, x.shape).astype(x.dtype) for k, x in zip(keys, leaves)])


def assert_close(a, b, **kw):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), **kw)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("name", NAMES)
def test_jit_dtypes_and_state_stable_under_cond(name, dtype):
    tx = OPTIMIZERS[name](1e-2)
    params = harness_params(jnp.dtype(dtype))
    state = jax.jit(tx.init)(params)
    spec = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    traces = []

    @jax.jit
    def step(p, s, g):
        traces.append(1)
        # as optax: the update inside lax.cond only compiles if the state's types are stable
        pred = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
        u, s2 = jax.lax.cond(pred, lambda: tx.update(g, s, p), lambda: (jax.tree.map(jnp.zeros_like, p), s))
        return optax.apply_updates(p, u), s2, u

    for t in range(3):  # crosses a GaLore refresh (gap 2)
        params, state, updates = step(params, state, harness_grads(params, t))
        for p, u in zip(jax.tree.leaves(params), jax.tree.leaves(updates), strict=True):
            assert p.dtype == u.dtype == jnp.dtype(dtype)
        assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == spec
        assert all(bool(jnp.all(jnp.isfinite(u.astype(jnp.float32)))) for u in jax.tree.leaves(updates))
    assert len(traces) == 1  # jitted once: no retracing from the state or the step count


@pytest.mark.parametrize("name", WRAPPED)
def test_multisteps_accumulates(name):
    params = harness_params()
    grads = [harness_grads(params, t) for t in range(3)]
    acc = optax.MultiSteps(OPTIMIZERS[name](1e-2), every_k_schedule=3)
    update = jax.jit(acc.update)
    state = acc.init(params)
    for t in range(3):
        updates, state = update(grads[t], state, params)
        if t < 2:
            assert all(not bool(jnp.any(u)) for u in jax.tree.leaves(updates))
    tx = OPTIMIZERS[name](1e-2)
    mean = jax.tree.map(lambda *g: sum(g) / 3, *grads)
    expected, _ = jax.jit(tx.update)(mean, tx.init(params), params)
    assert_close(updates, expected, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("name", WRAPPED)
def test_schedule_as_learning_rate(name):
    schedule = optax.linear_schedule(1e-2, 3e-2, transition_steps=2)
    params = harness_params()  # kept fixed, so every state below is learning-rate independent
    grads = [harness_grads(params, t) for t in range(3)]

    @jax.jit
    def run(lr):  # a schedule, or a constant learning rate traced as an argument
        tx = OPTIMIZERS[name](schedule if lr is None else lr)
        state, out = tx.init(params), []
        for g in grads:
            u, state = tx.update(g, state, params)
            out.append(u)
        return out

    scheduled = run(None)
    for t in (0, 2):
        assert_close(scheduled[t], run(jnp.float32(schedule(t)))[t], rtol=2e-5, atol=1e-8)
    assert not np.allclose(np.asarray(scheduled[2]["w"]), np.asarray(scheduled[0]["w"]))


@pytest.mark.parametrize("name", WRAPPED)
def test_nonfinite_gradients_propagate_or_are_skipped(name):
    params = harness_params()
    bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), harness_grads(params, 0))
    tx = OPTIMIZERS[name](1e-2)
    u, _ = jax.jit(tx.update)(bad, tx.init(params), params)
    assert any(bool(jnp.any(jnp.isnan(x))) for x in jax.tree.leaves(u))  # documented: propagate
    safe = optax.apply_if_finite(OPTIMIZERS[name](1e-2), max_consecutive_errors=2)
    s0 = safe.init(params)
    u, s1 = jax.jit(safe.update)(bad, s0, params)
    assert all(not bool(jnp.any(x)) for x in jax.tree.leaves(u))
    assert_close(s1.inner_state, s0.inner_state, rtol=0, atol=0)  # projectors, moments and counts untouched
    u, s2 = jax.jit(safe.update)(harness_grads(params, 1), s1, params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))


# ----------------------------------------------------------------------------- GaLore vs galore-torch

@pytest.fixture(scope="module")
def galore_ref():
    return np.load(FIXTURES / "optim_galore.npz", allow_pickle=False)


def flax(x, name):
    """torch orientation [out, in] -> Flax [in, out] (and back); biases unchanged."""
    return x if name == "bias" else np.swapaxes(x, -1, -2)


_REPLAYS: dict = {}


def replay_galore(ref, proj_type, make=None):
    """Replays the recorded gradients; returns the error after each step in units of the reference's step."""
    if make is None and proj_type in _REPLAYS:
        return _REPLAYS[proj_type]
    hp = REFS["galore"]["hyper_parameters"]
    names = [f"w{i}" for i in range(len(REFS["galore"]["shapes"][proj_type]))] + ["bias"]
    params = {n: jnp.asarray(flax(ref[f"{proj_type}/{n}/init"], n)) for n in names}
    make_tx = make or (lambda: lo.galore(hp["lr"], rank=hp["rank"], update_proj_gap=hp["update_proj_gap"],
                                         scale=hp["scale"], proj_type=proj_type, weight_decay=hp["weight_decay"]))
    tx = make_tx()
    state, update = tx.init(params), jax.jit(tx.update)
    errors, prev = [], {n: ref[f"{proj_type}/{n}/init"] for n in names}
    for t in range(hp["steps"]):
        grads = {n: jnp.asarray(flax(ref[f"{proj_type}/{n}/grads"][t].astype(np.float32), n)) for n in names}
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        err = 0.0
        for n in names:
            want = ref[f"{proj_type}/{n}/after"][t]
            step = np.max(np.abs(want - prev[n]))  # the size of the reference's step t
            err = max(err, np.max(np.abs(flax(np.asarray(params[n]), n) - want)) / step)
            prev[n] = want
        errors.append(float(err))
    if make is None:
        _REPLAYS[proj_type] = errors
    return errors


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_galore_equals_galore_torch_step_for_step(galore_ref, proj_type):
    # 8 steps, rank 8, refresh every 3 steps (at 0, 3, 6), weight decay, a 1-D bias in a plain group,
    # a square matrix (std's side rule on [out, in]); errors in units of the reference's step at each step
    errors = replay_galore(galore_ref, proj_type)
    if proj_type == "full":
        # at a refresh U^T G V is diagonal in exact arithmetic: its off-diagonal entries are float32 rounding
        # noise (~5e-7) that Adam normalises by sqrt(v) + 1e-6 into up to 1.5% of an entry, differently in any
        # two implementations; the other types project on one side and have no such entries
        assert max(errors) < 0.1, errors
    else:
        assert max(errors) < 5e-4, errors  # float32 rounding of the params (~6e-8 / 2.5e-3 per step)


def test_galore_refreshes_at_0_T_2T_and_keeps_moments(galore_ref):
    hp = REFS["galore"]["hyper_parameters"]
    params = {"w": jnp.asarray(flax(galore_ref["std/w0/init"], "w"))}
    tx = lo.scale_by_galore(rank=8, update_proj_gap=3)
    state, update = tx.init(params), jax.jit(tx.update)
    projectors, mus = [], []
    for t in range(7):
        g = {"w": jnp.asarray(flax(galore_ref["std/w0/grads"][t].astype(np.float32), "w"))}
        _, state = update(g, state, params)
        projectors.append(np.asarray(state.projectors["w"].vh))
        mus.append(np.asarray(state.inner_state.mu["w"]))
        # canonical signs: each kept singular vector's largest-magnitude entry is positive
        vh = projectors[-1]
        assert np.all(vh[np.arange(8), np.argmax(np.abs(vh), axis=1)] > 0)
    changed = [not np.array_equal(projectors[t], projectors[t - 1]) for t in range(1, 7)]
    assert changed == [False, False, True, False, False, True]  # steps 3 and 6 (count before increment)
    # at the refresh of step 3 the first moment is NOT reset: it still remembers steps 0..2
    g3 = np.asarray(flax(galore_ref["std/w0/grads"][3].astype(np.float32), "w")).T  # torch orientation
    fresh = (1 - 0.9) * g3 @ projectors[3].T
    assert np.max(np.abs(mus[3] - fresh)) > 0.1 * np.max(np.abs(fresh))
    np.testing.assert_allclose(mus[3], 0.9 * mus[2] + 0.1 * g3 @ projectors[3].T, rtol=1e-4, atol=1e-5)
    assert hp["update_proj_gap"] == 3


def test_optax_contrib_galore_is_further_from_the_reference(galore_ref):
    hp = REFS["galore"]["hyper_parameters"]

    def make():
        return optax.contrib.galore(hp["lr"], rank=hp["rank"], update_proj_gap=hp["update_proj_gap"],
                                    scale=hp["scale"], weight_decay=hp["weight_decay"])

    ours = replay_galore(galore_ref, "std")
    theirs = replay_galore(galore_ref, "std", make)
    assert theirs[0] > 0.1 and max(ours) < 1e-3 * theirs[0], (ours, theirs)  # measured: 0.6 of a step at step 1


def test_galore_one_dimensional_leaves_get_plain_adamw_hf():
    params = harness_params()
    grads = harness_grads(params, 0)
    galore, adam = lo.galore(1e-2, rank=2, weight_decay=0.1), lo.adamw_hf(1e-2, weight_decay=0.1)
    u_galore, _ = jax.jit(galore.update)(grads, galore.init(params), params)
    u_adam, _ = jax.jit(adam.update)(grads, adam.init(params), params)
    np.testing.assert_allclose(u_galore["bias"], u_adam["bias"], rtol=1e-6)
    assert not np.allclose(u_galore["w"], u_adam["w"])


def test_galore_dimension_numbers_and_per_leaf_rank():
    k = jax.random.split(jax.random.key(1), 2)
    stacked = jax.random.normal(k[0], (3, 10, 6))  # nn.scan: [L, in, out]
    attn = jax.random.normal(k[1], (10, 2, 4))  # DenseGeneral: [D, N, H]
    params = {"stack": stacked, "attn": attn}
    grads = jax.tree.map(lambda x: x * 0.5 + 0.1, params)
    tx = lo.galore(1e-2, rank=4, update_proj_gap=5,
                   dimension_numbers={"stack": lrj.Layout(1, 1), "attn": lo.GaLoreDimensionNumbers(0, (1, 2))},
                   rank_pattern={"attn": 3})
    u, state = jax.jit(tx.update)(grads, tx.init(params), params)
    # per slice / reshaped, the same as the 2-D leaves they stand for
    flat = {f"s{i}": stacked[i] for i in range(3)} | {"attn": attn.reshape(10, 8)}
    flat_g = {f"s{i}": grads["stack"][i] for i in range(3)} | {"attn": grads["attn"].reshape(10, 8)}
    tx2 = lo.galore(1e-2, rank=4, update_proj_gap=5, rank_pattern={"attn": 3})
    u2, _ = jax.jit(tx2.update)(flat_g, tx2.init(flat), flat)
    for i in range(3):
        np.testing.assert_allclose(u["stack"][i], u2[f"s{i}"], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(u["attn"].reshape(10, 8), u2["attn"], rtol=1e-5, atol=1e-8)
    mu = state[0].inner_state.mu
    assert mu["stack"].shape == (3, 4, 10) and mu["attn"].shape == (3, 10)  # [L, k, n]; attn rank 3


def test_galore_randomized_svd_finds_the_same_subspace():
    k = jax.random.split(jax.random.key(2), 3)
    low = jax.random.normal(k[0], (64, 6)) @ jnp.diag(jnp.array([50.0, 40, 30, 20, 10, 5])) @ jax.random.normal(k[1], (6, 48))
    g = low + 0.01 * jax.random.normal(k[2], (64, 48))
    params = {"w": jnp.zeros((64, 48))}
    out = {}
    for svd in ("exact", "randomized"):
        tx = lo.scale_by_galore(rank=6, update_proj_gap=10, svd=svd, oversample=4, power_iters=2)
        _, state = jax.jit(tx.update)({"w": g}, tx.init(params), params)
        out[svd] = np.asarray(state.projectors["w"].u)  # [48, 6]: the matrix is w.T [48, 64], m < n: left
    cosines = np.linalg.svd(out["exact"].T @ out["randomized"], compute_uv=False)  # cosines of principal angles
    assert cosines.min() > 0.9999
    np.testing.assert_allclose(out["randomized"], out["exact"], atol=2e-3)  # canonical signs agree too


def test_galore_with_another_inner_transform():
    # inner = sign: the update is scale * back(sign(R)) exactly, in the projected space of a right projection
    params = {"w": jnp.asarray(np.random.default_rng(6).standard_normal((5, 9)), jnp.float32)}  # w.T: [9, 5], m >= n
    g = {"w": jnp.asarray(np.random.default_rng(7).standard_normal((5, 9)), jnp.float32)}
    tx = lo.scale_by_galore(rank=3, update_proj_gap=4, scale=0.5, inner=optax.scale_by_sign())
    u, state = jax.jit(tx.update)(g, tx.init(params), params)
    vh = np.asarray(state.projectors["w"].vh)  # [3, 5]
    G = np.asarray(g["w"]).T
    np.testing.assert_allclose(np.asarray(u["w"]).T, 0.5 * np.sign(G @ vh.T) @ vh, rtol=1e-5, atol=1e-6)


def test_bench_galore_runs_tiny(tmp_path):
    from test_benchmarks import load  # puts benchmarks/ on sys.path for their shared _machine.py

    bench = load("bench_galore")
    out = tmp_path / "galore.json"
    assert bench.main(["--tiny", "--rank", "4", "--gap", "10", "--runs", "1", "--warmup", "0", "--no-parity",
                       "--no-torch", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["command"].startswith("python benchmarks/bench_galore.py --tiny")
    memory = {r["variant"]: r for r in result["memory"]}
    assert memory["AdamW (optax.adamw)"]["ratio_to_adamw"] == 1.0
    galore = [r for name, r in memory.items() if name.startswith("GaLore r=4, every")][0]
    assert 0 < galore["ratio_to_adamw"] < 1  # rank 4 on 32..96-wide matrices saves memory
    assert {r["variant"] for r in result["time"]} >= {"GaLore, between refreshes", "GaLore, refresh step (exact SVD)"}
    a = result["time_info"]["amortised"]["exact"]
    assert a["amortised_over_normal"] == pytest.approx((a["refresh_over_normal"] + 9) / 10)


def test_galore_state_round_trips_through_an_orbax_checkpoint(tmp_path):
    from lowrank_jax import checkpoint

    params = {"w": jnp.ones((128, 64)), "b": jnp.zeros(64)}
    tx = lo.galore(1e-2, rank=32, update_proj_gap=2, eight_bit=True)  # projectors, MaskedNodes, 8-bit moments
    _, state = jax.jit(tx.update)(jax.tree.map(lambda p: p * 0.3 + 0.1, params), tx.init(params), params)
    mngr = checkpoint.manager(tmp_path)
    checkpoint.save(mngr, 1, params, state)
    _, _, restored, _ = checkpoint.restore(mngr, checkpoint.abstract(params), checkpoint.abstract(state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert_close(restored, state, rtol=0, atol=0)


# --- 8-bit moments

@pytest.fixture(scope="module")
def bnb():
    return np.load(FIXTURES / "optim_blockwise8.npz", allow_pickle=False)


def test_dynamic_code_books_equal_bitsandbytes(bnb):
    # bitsandbytes rounds torch.linspace in float32 before the means; ours rounds once: <= 2 ulps apart
    np.testing.assert_allclose(_blockwise8.dynamic_map(signed=True), bnb["signed"], rtol=3e-7, atol=0)
    np.testing.assert_allclose(_blockwise8.dynamic_map(signed=False), bnb["unsigned"], rtol=3e-7, atol=0)


@pytest.mark.parametrize("signed", [True, False])
def test_blockwise_quantisation_matches_bitsandbytes(bnb, signed):
    x = bnb["x"] if signed else np.abs(bnb["x"])
    codes = bnb["codes"] if signed else bnb["codes_unsigned"]
    absmax = bnb["absmax"] if signed else bnb["absmax_unsigned"]
    q = _blockwise8.quantize(jnp.asarray(x), signed=signed, block_size=256)
    np.testing.assert_array_equal(q.absmax, absmax)
    ours = np.asarray(q.codes).reshape(-1)[: x.size].astype(int)
    assert np.mean(ours == codes) > 0.99  # bitsandbytes' CPU kernel differs only at code midpoints:
    assert np.max(np.abs(ours - codes.astype(int))) <= 1  # then by one code
    back = _blockwise8.dequantize(q, x.shape, signed=signed)
    np.testing.assert_allclose(back, x, atol=0.05 * float(np.max(np.abs(x))))


def test_galore_8bit_moments_track_the_fp32_trajectory():
    k = jax.random.split(jax.random.key(3), 9)
    params = {"w": jax.random.normal(k[0], (128, 64))}  # w.T [64, 128]: left, projected [32, 128] = 4096 entries
    fp32, q8 = (lo.galore(1e-2, rank=32, update_proj_gap=3, eight_bit=e) for e in (False, True))
    s32, s8 = fp32.init(params), q8.init(params)
    assert isinstance(s8[0].inner_state.mu["w"], lo.QuantizedMoment)
    assert s8[0].inner_state.mu["w"].codes.dtype == jnp.uint8
    p32 = p8 = params
    for t in range(6):
        g = {"w": jax.random.normal(k[t + 1], (128, 64))}
        u32, s32 = jax.jit(fp32.update)(g, s32, p32)
        u8, s8 = jax.jit(q8.update)(g, s8, p8)
        p32, p8 = optax.apply_updates(p32, u32), optax.apply_updates(p8, u8)
        rel = float(jnp.linalg.norm(u8["w"] - u32["w"]) / jnp.linalg.norm(u32["w"]))
        assert rel < 0.05, (t, rel)
    bytes_of = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    assert bytes_of(s8[0].inner_state) < 0.3 * bytes_of(s32[0].inner_state)


# ----------------------------------------------------------------------------- LoRA+ vs peft

def peft_to_tree(arrays: dict, prefix: str):
    """peft parameter names -> the lowrank_jax trainable tree (Flax orientation)."""
    g = lambda name: jnp.asarray(arrays[f"{prefix}base_model.model.{name}"])  # noqa: E731
    return {
        "emb": {"embedding": {"a": g("emb.lora_embedding_A.default").T, "b": g("emb.lora_embedding_B.default").T}},
        "norm": {"scale": g("norm.weight"), "bias": g("norm.bias")},
        "q": {"kernel": {"a": g("q.lora_A.default.weight").T, "b": g("q.lora_B.default.weight").T},
              "bias": g("q.base_layer.bias")},
        "gating": {"gate": g("gating.gate")},
        "head": {"kernel": g("head.weight").T, "bias": g("head.bias")},
    }


PEFT_PATHS = {
    "emb.lora_embedding_A.default": "emb/embedding/a", "emb.lora_embedding_B.default": "emb/embedding/b",
    "norm.weight": "norm/scale", "norm.bias": "norm/bias", "q.lora_A.default.weight": "q/kernel/a",
    "q.lora_B.default.weight": "q/kernel/b", "q.base_layer.bias": "q/bias", "gating.gate": "gating/gate",
    "head.weight": "head/kernel", "head.bias": "head/bias",
}
PEFT_GROUPS = {"groupA": "a", "embedding": "embedding", "groupB": "b", "groupB_no_decay": "b_no_decay"}


def test_lora_plus_groups_equal_peft():
    hp = REFS["lora_plus"]["hyper_parameters"]
    arrays = np.load(FIXTURES / "optim_lora_plus.npz", allow_pickle=False)
    labels = dict((p, l) for _, p, l in lrj.tree.flatten_with_paths(lo.lora_plus_labels(peft_to_tree(arrays, "init/"))))
    lr = {"a": hp["lr"], "embedding": hp["loraplus_lr_embedding"], "b": hp["lr"] * hp["loraplus_lr_ratio"],
          "b_no_decay": hp["lr"] * hp["loraplus_lr_ratio"]}
    decay = {"a": True, "embedding": True, "b": True, "b_no_decay": False}
    for name, group in REFS["lora_plus"]["groups"].items():
        label = labels[PEFT_PATHS[name.removeprefix("base_model.model.")]]
        assert label == PEFT_GROUPS[group["group"]], name
        assert lr[label] == pytest.approx(group["lr"]) and decay[label] == (group["weight_decay"] > 0), name


def test_lora_plus_steps_equal_peft_with_torch_adamw():
    hp = REFS["lora_plus"]["hyper_parameters"]
    arrays = dict(np.load(FIXTURES / "optim_lora_plus.npz", allow_pickle=False))
    params = peft_to_tree(arrays, "init/")
    tx = lo.lora_plus(hp["lr"], hp["loraplus_lr_ratio"], lr_embedding=hp["loraplus_lr_embedding"],
                      weight_decay=hp["loraplus_weight_decay"])  # base=optax.adamw, eps 1e-8 as torch's AdamW
    state = tx.init(params)
    for t in range(hp["steps"]):
        updates, state = jax.jit(tx.update)(peft_to_tree(arrays, f"grad{t}/"), state, params)
        new = optax.apply_updates(params, updates)
        want = peft_to_tree(arrays, f"after{t}/")
        for (_, path, got), (_, _, w), (_, _, old) in zip(*(lrj.tree.flatten_with_paths(x) for x in (new, want, params))):
            step = float(np.max(np.abs(np.asarray(w) - np.asarray(old))))
            assert step > 0, path
            # 1e-4 of the step, or float32 rounding of the values for the tiny embedding steps (lr 1e-4)
            ulp = float(np.max(np.abs(np.asarray(w)))) * 2.0**-23
            np.testing.assert_allclose(got, w, rtol=0, atol=max(1e-4 * step, 2 * ulp), err_msg=path)
        params = new


def test_lora_plus_base_without_weight_decay():
    params = harness_params()
    tx = lo.lora_plus(0.1, 4.0, base=optax.sgd, weight_decay=None, lr_embedding=0.0)
    u, _ = tx.update(harness_grads(params, 0), tx.init(params), params)
    g = harness_grads(params, 0)
    np.testing.assert_allclose(u["layer"]["kernel"]["b"], -0.4 * g["layer"]["kernel"]["b"], rtol=1e-6)
    np.testing.assert_allclose(u["layer"]["kernel"]["a"], -0.1 * g["layer"]["kernel"]["a"], rtol=1e-6)
    with pytest.raises(ValueError, match="`base` 'sgd' takes no `weight_decay`; use weight_decay=None"):
        lo.lora_plus(0.1, 4.0, base=optax.sgd, weight_decay=0.1)


# ----------------------------------------------------------------------------- LoRA-FA vs peft

@pytest.fixture(scope="module")
def lorafa_ref():
    return np.load(FIXTURES / "optim_lora_fa.npz", allow_pickle=False)


@pytest.mark.parametrize("variant, tol", [("fp32", 1e-4), ("bf16", 5e-2)])
def test_lora_fa_steps_equal_peft(lorafa_ref, variant, tol):
    hp = REFS["lora_fa"]["hyper_parameters"]
    f = lorafa_ref
    params = {"q": {"kernel": {"a": jnp.asarray(f["A"].T), "b": jnp.asarray(f["B"].T)}, "bias": jnp.asarray(f["bias"])}}
    adapter = lrj.lora(rank=hp["r"], alpha=float(hp["lora_alpha"]))  # scale from the adapter: alpha / r = 2
    tx = lo.lora_fa(hp["lr"], scale=adapter, weight_decay=hp["weight_decay"])
    state, prev_b = tx.init(params), f["B"]
    for t in range(hp["steps"]):
        grads = {"q": {"kernel": {"a": jnp.full_like(params["q"]["kernel"]["a"], 7.0),  # ignored: A is frozen
                                  "b": jnp.asarray(f["grads_B"][t].T)}, "bias": jnp.asarray(f["grads_bias"][t])}}
        updates, state = jax.jit(tx.update)(grads, state, params)
        params = optax.apply_updates(params, updates)
        want_b = f[f"{variant}/after_B"][t]
        step = np.max(np.abs(want_b - prev_b))
        np.testing.assert_allclose(np.asarray(params["q"]["kernel"]["b"]).T, want_b, atol=tol * step)
        np.testing.assert_array_equal(np.asarray(params["q"]["kernel"]["a"]).T, f["A"])
        np.testing.assert_allclose(params["q"]["bias"], f[f"{variant}/after_bias"][t], atol=1e-4 * step)
        prev_b = want_b
    # peft's first moment of B after step 1 is (1 - b1) * the preconditioned gradient: check the map alone
    pre, _ = lo.scale_by_lora_fa(2.0).update(
        {"k": {"a": jnp.zeros((12, 4)), "b": jnp.asarray(f["grads_B"][0].T)}}, optax.EmptyState(),
        {"k": {"a": jnp.asarray(f["A"].T), "b": jnp.asarray(f["B"].T)}})
    want = f[f"{variant}/exp_avg_B"][0]
    # peft's bf16 autocast rounds the operands of g_B @ pinv(A A^T) to 8 bits: ~1% of the largest entry
    atol = (1e-6 if variant == "fp32" else 1e-2) * np.max(np.abs(want))
    np.testing.assert_allclose(0.1 * np.asarray(pre["k"]["b"]).T, want, rtol=0, atol=atol)


def lstsq_projection(basis_fns, target):
    """Least-squares fit of ``target`` by a linear map of free matrices (numpy float64), the fitted value."""
    cols = np.stack([fn().reshape(-1) for fn in basis_fns], axis=1)
    coef, *_ = np.linalg.lstsq(cols, target.reshape(-1), rcond=None)
    return (cols @ coef).reshape(target.shape)


def basis(shape, apply):
    out = []
    for idx in np.ndindex(*shape):
        e = np.zeros(shape)
        e[idx] = 1.0
        out.append(lambda e=e: apply(e))
    return out


def test_lora_fa_is_the_least_squares_b_step():
    rng = np.random.default_rng(0)
    a, b, G, s = rng.standard_normal((9, 3)), rng.standard_normal((3, 7)), rng.standard_normal((9, 7)), 1.5
    gb = s * a.T @ G
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    out, _ = lo.scale_by_lora_fa(s).update({"t": {"a": jnp.zeros((9, 3)), "b": f32(gb)}}, optax.EmptyState(),
                                           {"t": {"a": f32(a), "b": f32(b)}})
    approx = s * a @ np.asarray(out["t"]["b"], np.float64)
    best = lstsq_projection(basis((3, 7), lambda y: a @ y), G)  # closest a Y to G
    np.testing.assert_allclose(approx, best, atol=1e-4)


# ----------------------------------------------------------------------------- LoRA-Pro: the defining property

def reference_lora_pro(A, B, gA, gB, s, x_mode, delta=1e-8):
    """METHODS.md's formulas in torch orientation (A [r, in], B [out, r]), float64, scipy's Sylvester solver."""
    import scipy.linalg

    r = A.shape[0]
    BtB, AAt = B.T @ B, A @ A.T
    BtB_inv, AAt_inv = np.linalg.pinv(BtB + delta * np.eye(r)), np.linalg.pinv(AAt + delta * np.eye(r))
    if x_mode == "sylvester":
        X = scipy.linalg.solve_sylvester(BtB, AAt, -(1 / s**2) * BtB_inv @ gA @ A.T)
    elif x_mode == "symmetry":
        X = -0.5 * (1 / s**2) * BtB_inv @ B.T @ gB @ AAt
    else:
        X = np.zeros((r, r))
    gA2 = (1 / s**2) * BtB_inv @ gA + X @ A
    gB2 = (1 / s**2) * (np.eye(B.shape[0]) - B @ BtB_inv @ B.T) @ gB @ AAt_inv - B @ X
    return gA2, gB2


@pytest.fixture(scope="module")
def pro_case():
    rng = np.random.default_rng(1)
    n_in, n_out, r, s = 10, 8, 3, 2.0
    a, b, G = rng.standard_normal((n_in, r)), rng.standard_normal((r, n_out)), rng.standard_normal((n_in, n_out))
    return a, b, G, s


def test_lora_pro_gradients_in_closed_form_from_jax_grad(pro_case):
    a, b, _, s = pro_case
    rng = np.random.default_rng(5)
    x, y, w = rng.standard_normal((5, a.shape[0])), rng.standard_normal((5, b.shape[1])), rng.standard_normal(
        (a.shape[0], b.shape[1]))
    a, b, x, y, w = (jnp.asarray(v, jnp.float32) for v in (a, b, x, y, w))
    loss = lambda w_eff: jnp.sum((x @ w_eff - y) ** 2)  # noqa: E731
    G = jax.jit(jax.grad(loss))(w + s * a @ b)
    ga, gb = jax.jit(jax.grad(lambda a, b: loss(w + s * a @ b), argnums=(0, 1)))(a, b)
    np.testing.assert_allclose(ga, s * G @ b.T, rtol=1e-4)  # torch: gA = s B^T G
    np.testing.assert_allclose(gb, s * a.T @ G, rtol=1e-4)  # torch: gB = s G A^T


def test_lora_pro_step_is_the_best_approximation_of_the_full_gradient(pro_case):
    a, b, G, s = pro_case
    ga, gb = s * G @ b.T, s * a.T @ G
    ga2, gb2 = (np.asarray(x, np.float64) for x in lo.lora_pro_gradients(
        *(jnp.asarray(x, jnp.float32) for x in (a, b, ga, gb)), s))
    approx = s * (ga2 @ b + a @ gb2)
    # independently: the closest X b + a Y to G, by least squares over (X, Y)
    best = lstsq_projection(basis((a.shape[0], b.shape[0]), lambda x: x @ b) + basis((a.shape[1], b.shape[1]),
                                                                                      lambda y: a @ y), G)
    np.testing.assert_allclose(approx, best, atol=2e-4)
    plain = s * (ga @ b + a @ gb)  # what plain LoRA gradients would do: much further from G
    assert np.linalg.norm(approx - G) < np.linalg.norm(plain - G)
    # and among all (X, Y) giving that step, the closest to (ga, gb): X = ga2 + C a^T... solved for C by lstsq
    Cs = basis((a.shape[1], a.shape[1]), lambda c: c)
    cols = np.stack([np.concatenate([(a @ c()).reshape(-1), -(c() @ b).reshape(-1)]) for c in Cs], axis=1)
    rhs = np.concatenate([(ga - ga2).reshape(-1), (gb - gb2).reshape(-1)])
    coef, *_ = np.linalg.lstsq(cols, rhs, rcond=None)
    assert np.max(np.abs(coef)) < 1e-3  # (ga2, gb2) is already the closest: the best shift C is 0


@pytest.mark.parametrize("x_mode", ["sylvester", "symmetry", "zero"])
def test_lora_pro_equals_the_reference_formulas(pro_case, x_mode):
    a, b, G, s = pro_case
    ga, gb = s * G @ b.T, s * a.T @ G
    gA2, gB2 = reference_lora_pro(a.T, b.T, ga.T, gb.T, s, x_mode)  # torch orientation
    ga2, gb2 = lo.lora_pro_gradients(*(jnp.asarray(x, jnp.float32) for x in (a, b, ga, gb)), s, x_mode=x_mode)
    scale = max(np.abs(gA2).max(), np.abs(gB2).max())
    np.testing.assert_allclose(np.asarray(ga2).T, gA2, atol=1e-4 * scale)
    np.testing.assert_allclose(np.asarray(gb2).T, gB2, atol=1e-4 * scale)


def test_sylvester_solver():
    import scipy.linalg

    rng = np.random.default_rng(2)
    m1, m2 = rng.standard_normal((4, 6)), rng.standard_normal((3, 5))
    p, q, c = m1 @ m1.T, m2 @ m2.T, rng.standard_normal((4, 3))
    x = np.asarray(_linalg.solve_sylvester_sym(*(jnp.asarray(v, jnp.float32) for v in (p, q, c))))
    np.testing.assert_allclose(x, scipy.linalg.solve_sylvester(p, q, c), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(p @ x + x @ q, c, atol=1e-4)


def test_lora_pro_at_lora_init_is_lora_fa():
    rng = np.random.default_rng(3)
    a, G, s = rng.standard_normal((10, 3)), rng.standard_normal((10, 8)), 2.0
    b = np.zeros((3, 8))  # B = 0 at init: gA = 0, the equivalent gradient of B is LoRA-FA's
    ga, gb = s * G @ b.T, s * a.T @ G
    ga2, gb2 = lo.lora_pro_gradients(*(jnp.asarray(x, jnp.float32) for x in (a, b, ga, gb)), s)
    assert not np.any(np.asarray(ga2))
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    fa, _ = lo.scale_by_lora_fa(s).update({"t": {"a": jnp.zeros((10, 3)), "b": f32(gb)}}, optax.EmptyState(),
                                          {"t": {"a": f32(a), "b": f32(b)}})
    np.testing.assert_allclose(gb2, fa["t"]["b"], rtol=1e-4, atol=1e-6)


def test_lora_pro_and_lora_fa_in_a_train_step_with_the_adapter_scale():
    rng = np.random.default_rng(4)
    x, y = jnp.asarray(rng.standard_normal((16, 5)), jnp.float32), jnp.asarray(rng.standard_normal((16, 6)), jnp.float32)
    params = {"dense": {"kernel": jnp.asarray(rng.standard_normal((5, 6)), jnp.float32)}}
    adapter = lrj.lora(rank=2, alpha=4.0, targets=r"dense/kernel")
    lp = jax.tree.map(lambda v: v + 0.05, adapter.init(jax.random.key(3), params))

    def loss_fn(lp, params, batch, rng):  # factored: x W + s (x a) b, with s = alpha / r = 2
        f = lp["dense"]["kernel"]
        return jnp.mean((batch[0] @ params["dense"]["kernel"] + 2.0 * (batch[0] @ f["a"]) @ f["b"] - batch[1]) ** 2)

    start = float(loss_fn(lp, params, (x, y), None))
    for tx in (lo.lora_pro(5e-2, scale=adapter), lo.lora_fa(5e-2, scale=adapter)):
        step = jax.jit(lrj.make_train_step(loss_fn, tx))
        state, p = tx.init(lp), lp
        for _ in range(10):
            p, state, metrics = step(p, state, params, (x, y), None)
        assert float(metrics["loss"]) < 0.9 * start


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("make, message", [
    (lambda: lo.galore(1e-3, rank=0), "`rank` must be a positive integer, got 0"),
    (lambda: lo.galore(1e-3, rank=-4), "`rank` must be a positive integer, got -4"),
    (lambda: lo.galore(1e-3, rank=2.5), "`rank` must be a positive integer, got 2.5"),
    (lambda: lo.galore(1e-3, update_proj_gap=0), "`update_proj_gap` must be a positive integer, got 0"),
    (lambda: lo.galore(1e-3, update_proj_gap=-1), "`update_proj_gap` must be a positive integer, got -1"),
    (lambda: lo.galore(1e-3, scale=0.0), "`scale` must be a positive number, got 0.0"),
    (lambda: lo.galore(1e-3, proj_type="middle"), "`proj_type` must be one of ('std', 'reverse_std', 'left', "
                                                  "'right', 'full'), got 'middle'"),
    (lambda: lo.galore(1e-3, svd="fast"), "`svd` must be one of ('exact', 'randomized'), got 'fast'"),
    (lambda: lo.galore(1e-3, rank_pattern={"w": 0}), "`rank_pattern['w']` must be a positive integer, got 0"),
    (lambda: lo.galore(-1e-3), "`learning_rate` must be >= 0, got -0.001"),
    (lambda: lo.galore(1e-3, eight_bit=True, inner=optax.scale_by_adam()), "`inner` replaces the Adam"),
    (lambda: lo.lora_plus(1e-3, 0.0), "`lr_ratio` must be a positive number, got 0.0"),
    (lambda: lo.lora_plus(1e-3, -16), "`lr_ratio` must be a positive number, got -16"),
    (lambda: lo.lora_fa(1e-3, scale=0.0), "`scale` must be a positive number, got 0.0"),
    (lambda: lo.lora_pro(1e-3, scale=2.0, x_mode="exact"), "`x_mode` must be one of ('sylvester', 'symmetry', "
                                                           "'zero'), got 'exact'"),
    (lambda: lo.scale_by_adam_hf(b1=1.0), "`b1` must be in [0, 1), got 1.0"),
])
def test_bad_hyper_parameters(make, message):
    with pytest.raises(ValueError) as info:
        make()
    assert message in str(info.value)


def test_galore_rejects_leaves_it_cannot_project():
    params = {"w": jnp.ones((6, 4)), "bias": jnp.ones(4), "stack": jnp.ones((2, 6, 4))}
    with pytest.raises(ValueError, match=r"GaLore projects matrices; target 'bias' has shape \(4,\)"):
        lo.galore(1e-3, targets=["w", "bias"]).init(params)
    with pytest.raises(ValueError, match=r"target 'stack' has shape \(2, 6, 4\): say which axes form the matrix"):
        lo.galore(1e-3, targets=["w", "stack"]).init(params)
    # by default 1-D and undeclared N-D leaves are simply not projected (updated in full by the inner Adam)
    state = lo.galore(1e-3, rank=2).init(params)
    assert state[0].inner_state.mu["bias"].shape == (4,) and state[0].inner_state.mu["stack"].shape == (2, 6, 4)
    assert isinstance(state[0].projectors["bias"], optax.MaskedNode)


def test_lora_transforms_need_factors_and_params():
    params = {"w": jnp.ones((4, 3))}
    for tx in (lo.lora_fa(1e-3, scale=1.0), lo.lora_pro(1e-3, scale=1.0)):
        with pytest.raises(ValueError, match="found no LoRA factors: expected mappings holding leaves named 'a' and 'b'"):
            tx.init(params)
    lp = harness_params()
    tx = lo.scale_by_lora_pro(2.0)
    with pytest.raises(ValueError, match=r"needs the current adapter params: call `update\(grads, state, params\)`"):
        tx.update(lp, tx.init(lp))
    ambiguous = {"t": {"a": jnp.ones((3, 5, 3)), "b": jnp.ones((3, 3, 4))}}  # stack 0 or 1 both fit
    with pytest.raises(ValueError, match="pass `layouts="):
        lo.scale_by_lora_fa(1.0).update(ambiguous, optax.EmptyState(), ambiguous)
    out, _ = lo.scale_by_lora_fa(1.0, layouts={"t": lrj.Layout(1, 1)}).update(ambiguous, optax.EmptyState(), ambiguous)
    assert out["t"]["b"].shape == (3, 3, 4)


# ----------------------------------------------------------------------------- sharding
# a subprocess with 8 simulated devices (the device count is fixed when jax starts)

def sharded_worker():
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    specs = {"layer": {"kernel": {"a": P("data", None), "b": P(None, "model")}}, "w": P("data", "model"),
             "bias": P("model")}
    report = {"devices": jax.device_count()}
    params = harness_params()
    grads = [harness_grads(params, t) for t in range(3)]
    refs = {}
    for name in NAMES:  # one device
        tx = OPTIMIZERS[name](1e-2)
        s, update, refs[name] = tx.init(params), jax.jit(tx.update), []
        for g in grads:
            u, s = update(g, s, params)
            refs[name].append(u)
    for kind in ("explicit", "auto"):
        axis_type = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}[kind]
        mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type, axis_type))
        for name in NAMES:
            tx, ref = OPTIMIZERS[name](1e-2), refs[name]
            with jax.set_mesh(mesh):
                def put(tree):
                    return jax.tree.map(lambda x, sp: jax.device_put(x, NamedSharding(mesh, sp)), tree, specs)

                p = put(params)
                state = jax.jit(tx.init)(p)
                state_sh = jax.tree.map(lambda x: x.sharding, state)
                p_sh = jax.tree.map(lambda x: x.sharding, p)
                if kind == "explicit":
                    update = jax.jit(tx.update)
                else:
                    update = jax.jit(tx.update, out_shardings=(p_sh, state_sh))
                stable, follow, diff = True, True, 0.0
                for t, g in enumerate(grads):  # three updates: through a GaLore refresh and back
                    u, state = update(put(g), state, p)
                    stable &= all(a.sharding == b for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state_sh)))
                    follow &= all(a.sharding == b for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(p_sh)))
                    diff = max(diff, max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                                         for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(ref[t]))))
                report[f"{kind}/{name}"] = {"state_stable": bool(stable), "updates_follow_params": bool(follow),
                                            "max_abs_diff": diff}
    print(json.dumps(report))


_WORKER: dict = {}


@pytest.fixture(scope="module", autouse=True)
def sharded_worker_process():
    """Starts the 8-device worker when the module starts, so it runs next to the other tests (2 cores)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    _WORKER["proc"] = subprocess.Popen([sys.executable, __file__, "sharded"], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True, env=env)
    yield
    if _WORKER["proc"].poll() is None:
        _WORKER["proc"].kill()
    _WORKER["proc"].communicate()


@pytest.fixture(scope="module")
def sharded_report():
    proc = _WORKER["proc"]
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["explicit", "auto"])
@pytest.mark.parametrize("name", NAMES)
def test_state_sharding_stable_on_a_mesh(sharded_report, name, kind):
    assert sharded_report["devices"] == 8
    r = sharded_report[f"{kind}/{name}"]
    assert r["state_stable"], r  # Explicit: the natural output shardings; Auto: pinned to the init's
    assert r["updates_follow_params"], r
    assert r["max_abs_diff"] < 1e-5, r  # equal to the single-device updates


if __name__ == "__main__" and sys.argv[1:] == ["sharded"]:
    sharded_worker()
