"""LISA equals LMFlow's layer switching with torch's AdamW (tests/fixtures/make_lisa.py), in both optimizer-state
conventions; its sampling is the state's, jit-deterministic, and the other layers get exactly zero updates."""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank_jax.optim.lisa import lisa, scale_by_lisa

FIXTURE = np.load(pathlib.Path(__file__).parent / "fixtures" / "lisa.npz", allow_pickle=False)
KEY, N_LAYERS, INTERVAL, STEPS, LR, WD = 4, 2, 3, 12, 5e-2, 0.01  # make_lisa.py's
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _toy():
    f = FIXTURE
    params = {"embed": jnp.asarray(f["init/embed"]), "layers": {"w": jnp.asarray(f["init/w"]), "bias": jnp.asarray(f["init/bias"])},
              "norm": jnp.asarray(f["init/norm"]), "head": jnp.asarray(f["init/head"])}
    ids, target = jnp.asarray(f["ids"]), jnp.asarray(f["target"])

    def loss_fn(p):
        h = p["embed"][ids]
        for l in range(p["layers"]["w"].shape[0]):
            h = jnp.tanh(h @ p["layers"]["w"][l] + p["layers"]["bias"][l])
        return jnp.mean((p["norm"] * h @ p["head"] - target) ** 2)

    return params, loss_fn


def _run(opt, params, loss_fn, steps=STEPS, jit=True):
    def step(p, state):
        grads = jax.grad(loss_fn)(p)
        updates, state = opt.update(grads, state, p)
        return optax.apply_updates(p, updates), state, updates

    step = jax.jit(step) if jit else step
    state, out = opt.init(params), []
    for _ in range(steps):
        params, state, updates = step(params, state)
        out.append((params, state, updates))
    return out


def _layers(state):
    return np.asarray(state[0].layers)  # lisa() = chain(scale_by_lisa, scale_by_learning_rate)


@pytest.mark.parametrize("mode", ["keep", "reset"])
def test_equals_lmflow_with_torch_adamw(mode):
    params, loss_fn = _toy()
    opt = lisa(LR, N_LAYERS, INTERVAL, weight_decay=WD, key=KEY, state_on_switch=mode)
    history = _run(opt, params, loss_fn)
    np.testing.assert_array_equal(np.stack([_layers(s) for _, s, _ in history]), FIXTURE["layers"])
    for t, (p, _, _) in enumerate(history):
        ours = {"embed": p["embed"], "w": p["layers"]["w"], "bias": p["layers"]["bias"], "norm": p["norm"], "head": p["head"]}
        for name, value in ours.items():
            np.testing.assert_allclose(value, FIXTURE[f"{mode}/{name}"][t], rtol=2e-5, atol=5e-6, err_msg=f"{name} step {t}")


def test_keep_and_reset_differ_where_a_layer_stays_sampled():
    # layer 1 is sampled in intervals 0 and 1: "keep" continues its moments, "reset" restarts them
    keep, reset = FIXTURE["keep/w"], FIXTURE["reset/w"]
    np.testing.assert_array_equal(keep[2], reset[2])  # identical through the first interval
    assert float(np.max(np.abs(keep[3][1] - reset[3][1]))) > 1e-4
    np.testing.assert_array_equal(keep[:, 2], np.broadcast_to(FIXTURE["init/w"][2], keep[:, 2].shape))  # never sampled


@pytest.mark.parametrize("mode", ["keep", "reset"])
def test_unsampled_layers_get_exactly_zero_and_the_rest_always_moves(mode):
    params, loss_fn = _toy()
    history = _run(lisa(LR, N_LAYERS, INTERVAL, weight_decay=WD, key=KEY, state_on_switch=mode), params, loss_fn)
    for p, state, updates in history:
        on = set(_layers(state).tolist())
        for leaf in ("w", "bias"):
            u = np.asarray(updates["layers"][leaf])
            for layer in range(4):
                if layer in on:
                    assert np.all(np.abs(u[layer]) > 0), (leaf, layer)
                else:
                    assert not np.any(u[layer]), (leaf, layer)
        for name in ("embed", "norm", "head"):  # embeddings, final norm, head: trained at every step
            assert float(np.max(np.abs(np.asarray(updates[name])))) > 1e-6, name


def test_sampling_is_the_states_uniform_draw_and_deterministic_under_jit():
    params = {"embed": jnp.ones((3, 2)), "layers": {"kernel": jnp.ones((6, 2, 2))}}
    opt = scale_by_lisa(optax.identity(), 3, 4, key=11)
    grads = jax.tree.map(jnp.ones_like, params)
    eager, jitted = [], []
    state_e = state_j = opt.init(params)
    update = jax.jit(opt.update)
    for t in range(12):
        u, state_e = opt.update(grads, state_e, params)
        _, state_j = update(grads, state_j, params)
        eager.append(np.asarray(state_e.layers))
        jitted.append(np.asarray(state_j.layers))
        nonzero = [i for i in range(6) if np.any(np.asarray(u["layers"]["kernel"][i]))]
        assert nonzero == eager[-1].tolist()
        expected = np.sort(np.asarray(jax.random.choice(jax.random.fold_in(jax.random.key(11), t // 4), 6, (3,), replace=False)))
        np.testing.assert_array_equal(eager[-1], expected)
    np.testing.assert_array_equal(eager, jitted)
    assert len({tuple(x) for x in eager}) >= 2  # resampled across intervals
    assert all(tuple(eager[t]) == tuple(eager[t - t % 4]) for t in range(12))  # fixed within an interval


def test_one_step_equals_adamw_on_the_sampled_layers():
    params, loss_fn = _toy()
    grads = jax.jit(jax.grad(loss_fn))(params)
    opt = lisa(LR, N_LAYERS, INTERVAL, weight_decay=WD, key=KEY)
    updates, state = jax.jit(opt.update)(grads, opt.init(params), params)
    adamw = optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WD)
    for layer in _layers(state):
        sub = jax.tree.map(lambda x: x[layer], params["layers"])
        ref, _ = adamw.update(jax.tree.map(lambda x: x[layer], grads["layers"]), adamw.init(sub), sub)
        for leaf in ("w", "bias"):
            np.testing.assert_allclose(updates["layers"][leaf][layer], ref[leaf], rtol=1e-6, atol=1e-8)
    rest = {k: params[k] for k in ("embed", "norm", "head")}
    ref, _ = adamw.update({k: grads[k] for k in rest}, adamw.init(rest), rest)
    for k in rest:
        np.testing.assert_allclose(updates[k], ref[k], rtol=1e-6, atol=1e-8)


def test_reset_holds_optimizer_state_for_the_sampled_slots_only():
    params = {"embed": jnp.ones((3, 2)), "layers": {"kernel": jnp.ones((8, 4, 4))}}
    keep = scale_by_lisa(optax.scale_by_adam(), 2, 5, state_on_switch="keep").init(params)
    reset = scale_by_lisa(optax.scale_by_adam(), 2, 5, state_on_switch="reset").init(params)
    assert keep.inner_layers.mu["layers"]["kernel"].shape == (8, 4, 4)
    assert reset.inner_layers.mu["layers"]["kernel"].shape == (2, 4, 4)
    assert keep.inner_layers.count.shape == (8,)  # one Adam step count per layer, as torch's per-parameter step


def _llama(num_layers=4):
    from lowrank_jax.models.llama import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.tiny(scan_layers=True, tie_word_embeddings=False, num_hidden_layers=num_layers, hidden_size=16,
                              intermediate_size=32, vocab_size=32)
    return LlamaForCausalLM(config), jax.random.randint(jax.random.key(0), (2, 9), 0, 32)


def _check_llama_steps(params, grads, num_layers=4):
    opt = lisa(1e-2, 1, 2, key=0)
    update, state, seen = jax.jit(opt.update), opt.init(params), set()
    for _ in range(6):
        updates, state = update(grads, state, params)
        on = _layers(state).tolist()
        seen.add(tuple(on))
        for name in ("embed_tokens", "lm_head", "norm"):  # outside `layers`: trained at every step
            assert all(float(jnp.max(jnp.abs(u))) > 0 for u in jax.tree.leaves(updates[name])), name
        for u in jax.tree.leaves(updates["layers"]):  # every stacked leaf of the decoder layers: the sampled layer only
            assert [i for i in range(num_layers) if np.any(np.asarray(u[i]))] == on
    assert len(seen) >= 2


def test_llama_layout_layers_sampled_embeddings_head_and_norm_always_trained():
    model, tokens = _llama()
    shapes = jax.eval_shape(model.init, jax.random.key(1), tokens[:, :-1])["params"]
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes)  # the real tree, no model compile
    _check_llama_steps(params, jax.tree.map(lambda p: 0.5 * p, params))


@pytest.mark.slow
def test_llama_with_real_gradients():
    model, tokens = _llama()
    params = jax.jit(model.init)(jax.random.key(1), tokens[:, :-1])["params"]

    def loss_fn(p):
        logits = model.apply({"params": p}, tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

    _check_llama_steps(params, jax.jit(jax.grad(loss_fn))(params))


def test_bad_input_errors_name_the_value():
    params = {"embed": jnp.ones((3, 2)), "layers": {"kernel": jnp.ones((4, 2, 2)), "scale": jnp.ones((4, 2))}}
    with pytest.raises(ValueError, match="n_layers=5 > L=4"):
        lisa(0.1, n_layers=5).init(params)
    with pytest.raises(ValueError, match="n_layers=0"):
        lisa(0.1, n_layers=0)
    with pytest.raises(ValueError, match="interval=0"):
        lisa(0.1, interval=0)
    with pytest.raises(ValueError, match="state_on_switch='drop'"):
        lisa(0.1, state_on_switch="drop")
    with pytest.raises(ValueError, match="matched no parameter"):
        lisa(0.1, layers=r"blocks/.*").init(params)
    uneven = {"layers": {"kernel": jnp.ones((4, 2, 2)), "scale": jnp.ones((3, 2))}}
    with pytest.raises(ValueError, match="one leading layer axis.*'layers/scale'"):
        lisa(0.1).init(uneven)
    opt = scale_by_lisa(optax.identity())
    with pytest.raises(ValueError, match="needs `params`"):
        opt.update(params, opt.init(params))


@pytest.mark.slow
def test_benchmark_quick(tmp_path):
    out = tmp_path / "lisa.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_lisa.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    full, keep, reset = rows["full AdamW"], rows["LISA keep"], rows["LISA reset"]
    assert full["argument_ratio"] == 1.0
    assert reset["argument_bytes"] < keep["argument_bytes"]  # fewer Adam moments held
    assert abs(keep["argument_ratio"] - 1.0) < 0.05  # keep: as much state as full fine-tuning
