"""Many LoRA adapters on one base: banks and mixed batches (S-LoRA/punica), m-LoRA training, serving.

The reference is peft 0.21.2's mixed-batch inference (``model(x, adapter_names=[...])``,
``"__base__"``), recorded by ``tests/fixtures/make_peft_mixed_batch.py``. The m-LoRA equalities
compare with each adapter trained alone by ``lrj.lora`` and optax.
"""

import functools
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import adapter_harness as harness  # noqa: E402
import lowrank_jax as lrj  # noqa: E402
from lowrank_jax import multi_train  # noqa: E402
from lowrank_jax.adapters import multi  # noqa: E402
from lowrank_jax.adapters.multi import multi_lora  # noqa: E402
from lowrank_jax.models import llama  # noqa: E402

FIXTURE = np.load(pathlib.Path(__file__).parent / "fixtures" / "peft_mixed_batch.npz", allow_pickle=False)
LAYERS = ("up", "mid", "down")
TOL = 2e-5


# ----------------------------------------------------------------------------- the peft model, in linen and NNX


class Net(nn.Module):
    """The fixture's ``down(tanh(mid(tanh(up(x)))))``."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="down")(jnp.tanh(nn.Dense(10, name="mid")(jnp.tanh(nn.Dense(10, name="up")(x)))))


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.up, self.mid, self.down = nnx.Linear(6, 10, rngs=rngs), nnx.Linear(10, 10, rngs=rngs), nnx.Linear(10, 4, rngs=rngs)

    def __call__(self, x):
        return self.down(jnp.tanh(self.mid(jnp.tanh(self.up(x)))))


PARAMS = {n: {"kernel": jnp.asarray(FIXTURE[f"w/{n}"].T), "bias": jnp.asarray(FIXTURE[f"b/{n}"])} for n in LAYERS}
ONE = lrj.lora(rank=4, alpha=8.0, targets=r"(up|mid|down)/kernel")
TWO = lrj.lora(rank=2, alpha=6.0, rslora=True, targets=r"(up|down)/kernel")
X, IDS = jnp.asarray(FIXTURE["x"]), jnp.asarray(FIXTURE["adapter_index"])


def peft_tree(name):
    """Adapter ``name``'s recorded factors as an ``lrj.lora`` tree (peft's ``lora_A.weight = a.T``)."""
    layers = [n for n in LAYERS if f"{name}/{n}/lora_A" in FIXTURE]
    return {n: {"kernel": {"a": jnp.asarray(FIXTURE[f"{name}/{n}/lora_A"].T), "b": jnp.asarray(FIXTURE[f"{name}/{n}/lora_B"].T)}}
            for n in layers}


def peft_bank(**kw):
    bank = multi_lora([ONE, TWO], **kw)
    return bank, bank.stack([peft_tree("one"), peft_tree("two")])


@functools.cache
def jitted_mixed(path):
    bank = peft_bank(path=path)[0]
    return jax.jit(lambda bp, ids: lrj.linen.apply(Net(), bank, PARAMS, bp, X, adapter_index=ids))


@pytest.mark.parametrize("path", ["gather", "ragged"])
def test_mixed_batch_of_two_ranks_and_base_rows_equals_peft(path):
    _, bp = peft_bank()
    y = jitted_mixed(path)(bp, IDS)
    np.testing.assert_allclose(y, FIXTURE["mixed"], atol=TOL, rtol=1e-5)
    base_rows = np.asarray(IDS) == -1
    np.testing.assert_allclose(y[base_rows], FIXTURE["base"][base_rows], atol=TOL)  # "__base__" rows are the base model
    assert np.abs(FIXTURE["mixed"] - FIXTURE["base"])[~base_rows].min() > 1e-3  # the adapters change every other row


def test_mixed_batch_in_nnx_equals_peft():
    bank, bp = peft_bank()
    model = harness.nnx_with_params(lambda: NNXNet(nnx.Rngs(0)), PARAMS)
    y = lrj.nnx.apply(model, bank, bp, X, adapter_index=IDS)
    np.testing.assert_allclose(y, FIXTURE["mixed"], atol=TOL, rtol=1e-5)


def test_each_adapter_alone_equals_peft_and_the_bank_tree_is_padded():
    bank, bp = peft_bank()
    assert jax.tree.map(jnp.shape, bp)["up"]["kernel"] == {"bank_a": (2, 6, 4), "bank_b": (2, 4, 10), "bank_scale": (2, 4)}
    np.testing.assert_allclose(bp["up"]["kernel"]["bank_scale"], [[2.0] * 4, [6 / np.sqrt(2)] * 2 + [0.0] * 2], rtol=1e-6)
    np.testing.assert_array_equal(bp["mid"]["kernel"]["bank_scale"][1], np.zeros(4))  # "two" lacks mid: a zero delta
    for k, name in enumerate(("one", "two")):
        y = lrj.linen.apply(Net(), bank, PARAMS, bp, X, adapter_index=jnp.full(len(X), k))
        np.testing.assert_allclose(y, FIXTURE[f"only/{name}"], atol=TOL, rtol=1e-5)


def test_padded_rank_columns_contribute_exactly_zero():
    bank, bp = peft_bank()
    garbage = jax.tree.map(lambda v: v, bp)
    for layer in ("up", "down"):  # adapter "two" has rank 2 of the bank's 4: fill its padding with junk
        leaves = garbage[layer]["kernel"]
        leaves["bank_a"] = leaves["bank_a"].at[1, :, 2:].set(1e3)
        leaves["bank_b"] = leaves["bank_b"].at[1, 2:, :].set(-1e3)
    leaves = garbage["mid"]["kernel"]  # and its missing target
    leaves["bank_a"], leaves["bank_b"] = leaves["bank_a"].at[1].set(7.0), leaves["bank_b"].at[1].set(7.0)
    for path in ("gather", "ragged"):
        np.testing.assert_array_equal(jitted_mixed(path)(garbage, IDS), jitted_mixed(path)(bp, IDS))


def test_padded_columns_and_other_slots_get_exactly_zero_gradient():
    bank, bp = peft_bank()
    trainable, frozen = lrj.split(bank, bp)

    def loss(t, ids):
        return jnp.sum(jnp.square(lrj.linen.apply(Net(), bank, PARAMS, lrj.join(bank, t, frozen), X, adapter_index=ids)))

    g = jax.grad(loss)(trainable, jnp.full(len(X), 1))
    up = g["up"]["kernel"]
    assert float(jnp.abs(up["bank_a"][1, :, :2]).max()) > 1e-3
    np.testing.assert_array_equal(up["bank_a"][1, :, 2:], 0.0)
    np.testing.assert_array_equal(up["bank_b"][1, 2:], 0.0)
    np.testing.assert_array_equal(up["bank_a"][0], 0.0)  # no row used adapter 0
    np.testing.assert_array_equal(g["mid"]["kernel"]["bank_a"][1], 0.0)


# ----------------------------------------------------------------------------- the two paths, scan, hot swap


def random_bank(seed=0, capacity=5, ranks=(2, 3, 1)):
    """A bank of LoRAs of several ranks and alphas on the harness MLP, nonzero factors."""
    adapters = [lrj.lora(rank=r, alpha=2.0 + k, targets=r".*/kernel", rslora=k == 1) for k, r in enumerate(ranks)]
    model, x, params = harness.base_model(harness.MLP)
    trees = [harness.perturb(a.init(jax.random.key(k), params), seed=seed + k, std=0.3) for k, a in enumerate(adapters)]
    return adapters, trees, model, x, params


@pytest.mark.parametrize("scan", [False, True])
def test_gather_and_ragged_paths_agree_on_a_mixed_batch(scan):
    adapters, trees, model, x, params = random_bank()
    ids = jnp.array([2, -1, 0, 1, 0, 2, -1, 1])
    if scan:
        model = harness.MLP.scanned()
        layouts = lrj.linen.kernel_layouts(model, x)
        params, trees = harness.stack_layers(params), [harness.stack_layers(t) for t in trees]
    else:
        layouts = None
    outs = {}
    for path in ("gather", "ragged"):
        bank = multi_lora(adapters, capacity=5, path=path, layouts=layouts)
        bp = bank.stack(trees)
        outs[path] = jax.jit(lambda bp, ids: lrj.linen.apply(model, bank, params, bp, x, adapter_index=ids))(bp, ids)
    np.testing.assert_allclose(outs["gather"], outs["ragged"], atol=TOL)
    for k, (adapter, tree) in enumerate(zip(adapters, trees)):  # each row equals its adapter run alone
        alone = lrj.linen.apply(model, adapter._replace(layouts=layouts), params, tree, x)
        rows = np.asarray(ids) == k
        np.testing.assert_allclose(outs["gather"][rows], alone[rows], atol=TOL)
    base = model.apply({"params": params}, x)
    np.testing.assert_allclose(outs["gather"][np.asarray(ids) == -1], base[np.asarray(ids) == -1], atol=TOL)


def test_auto_path_is_the_gather_on_cpu():
    assert jax.default_backend() == "cpu"
    assert multi._choose("auto", 1) == multi._choose("auto", 4096) == "gather"
    assert multi._choose("ragged", 1) == "ragged"


def test_hot_swap_put_and_remove_do_not_recompile():
    adapters, trees, model, x, params = random_bank()
    bank = multi_lora(adapters[:2], capacity=3, rank=3)
    bp = bank.stack(trees[:2])
    fn = jax.jit(lambda bp, ids: lrj.linen.apply(model, bank, params, bp, x, adapter_index=ids))
    ids = jnp.array([0, 1, 0, 1, -1, 0, 1, 0])
    before = fn(bp, ids)
    assert fn._cache_size() == 1
    swapped = bank.put(bp, 1, trees[2], adapters[2])  # a rank-1 adapter with its own alpha into slot 1
    added = bank.put(swapped, 2, trees[1], adapters[1])  # the old one into the empty slot
    after = fn(added, jnp.array([0, 1, 2, 1, -1, 0, 2, 0]))
    assert fn._cache_size() == 1
    alone = {k: lrj.linen.apply(model, adapters[k], params, trees[k], x) for k in range(3)}
    np.testing.assert_allclose(after[1], alone[2][1], atol=TOL)
    np.testing.assert_allclose(after[2], alone[1][2], atol=TOL)
    np.testing.assert_allclose(after[0], before[0], atol=TOL)
    removed = bank.remove(added, 0)
    out = fn(removed, jnp.array([-1, 1, 2, 1, -1, 2, 2, 1]))
    assert fn._cache_size() == 1
    np.testing.assert_allclose(out[1], after[1], atol=TOL)
    with pytest.raises(ValueError, match=r"adapter index \[0\] names an empty slot"):
        lrj.linen.apply(model, bank, params, removed, x, adapter_index=np.array([0, 1, 2, 1, -1, 2, 2, 1]))
    assert np.isnan(np.asarray(fn(removed, ids))[0]).all()  # under jit: NaN rows, never a silent base answer
    assert np.isfinite(np.asarray(fn(removed, ids))[1]).all()


def test_unstack_gives_back_each_adapter_and_merge_one_slot():
    adapters, trees, model, x, params = random_bank()
    bank = multi_lora(adapters, capacity=4)
    bp = bank.stack(trees)
    for k, tree in enumerate(trees):
        harness.assert_equal(bank.unstack(bp, k), tree)
    merged = bank.merge(params, bp, slot=1)
    harness.assert_close(merged, adapters[1].merge(params, trees[1]), 1e-5, "bank merge of slot 1 vs the adapter's")
    harness.assert_close(bank.unmerge(merged, bp, slot=1), params, 1e-5, "unmerge")
    with pytest.raises(ValueError, match="merge one with bank.merge"):
        bank.merge(params, bp)
    with pytest.raises(ValueError, match="slot 3 of the bank is empty"):
        bank.unstack(bp, 3)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_a_clear_error():
    adapters, trees, model, x, params = random_bank()
    bank = multi_lora(adapters[:2], capacity=2)
    bp = bank.stack(trees[:2])
    run = functools.partial(lrj.linen.apply, model, bank, params, bp, x)
    with pytest.raises(ValueError, match=r"adapter index \[2, 5\] out of range for a bank of capacity 2"):
        run(adapter_index=np.array([0, 1, 2, 5, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match=r"adapter index \[-2\] out of range"):
        run(adapter_index=np.array([-2, 1, 0, 0, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="needs the batch's `adapter_index=`"):
        run()
    with pytest.raises(ValueError, match="one entry per example"):
        run(adapter_index=np.array([0, 1]))
    with pytest.raises(ValueError, match="the bank is full: 3 adapters for a capacity of 2"):
        bank.stack(trees, adapters)
    with pytest.raises(ValueError, match=r"`capacity` must be an integer >= the 3 adapters, got 2"):
        multi_lora(adapters, capacity=2)
    with pytest.raises(ValueError, match="slot 2 out of range for a bank of capacity 2"):
        bank.put(bp, 2, trees[2], adapters[2])
    with pytest.raises(ValueError, match="rank 3 .* more than the bank's rank 2"):
        multi_lora(adapters[:1] + adapters[2:], capacity=2).put(bp, 1, trees[1], adapters[1])
    other = jax.tree.map(lambda v: v, params)
    other["layers_0"] = {**params["layers_0"], "up": {"kernel": jnp.zeros((5, 16)), "bias": jnp.zeros(16)}}
    stranger = adapters[0].init(jax.random.key(0), other)
    with pytest.raises(ValueError, match="different base models"):
        bank.stack([trees[0], stranger])
    jitted = jax.jit(lambda bp, ids: lrj.linen.apply(model, bank, params, bp, x, adapter_index=ids))
    y = jitted(bp, jnp.array([0, 7, 1, 0, 0, 0, 0, -1]))  # traced indices cannot raise: the bad row is NaN
    assert np.isnan(np.asarray(y[1])).all() and np.isfinite(np.asarray(y[np.array([0, 2, 3, 4, 5, 6, 7])])).all()


def test_bank_for_another_model_and_non_lora_members_raise():
    adapters, trees, model, x, params = random_bank()
    bank, bp = peft_bank()
    wider = Net().init(jax.random.key(0), jnp.zeros((1, 7)))["params"]  # up takes 7 features, the bank's 6
    with pytest.raises(ValueError, match=r"bank leaves at 'up/kernel' .* do not fit the kernel \(7, 10\).* different base model"):
        lrj.linen.apply(Net(), bank, wider, bp, jnp.zeros((2, 3, 7)), adapter_index=jnp.array([0, 1]))
    with pytest.raises(ValueError, match="banks plain LoRA adapters .* 'dora'"):
        multi_lora([adapters[0], lrj.dora(rank=2, alpha=4.0)])
    with pytest.raises(ValueError, match="offset init 'pissa'"):
        multi_lora([lrj.lora(rank=2, init="pissa")])
    with pytest.raises(ValueError, match=r"share one dropout rate; got \[0.0, 0.1\]"):
        multi_lora([adapters[0], lrj.lora(rank=2, dropout=0.1)])
    with pytest.raises(ValueError, match="`path` must be one of"):
        multi_lora(adapters, path="bgmv")
    with pytest.raises(ValueError, match="`rank` must be an integer >= the largest member rank 3"):
        multi_lora(adapters, rank=2)
    up_only = lrj.lora(rank=2, targets=r".*/up/kernel")
    narrow = multi_lora([up_only], capacity=2)
    narrow_params = narrow.stack([up_only.init(jax.random.key(0), params)])
    with pytest.raises(ValueError, match="the bank has no targets .*down/kernel"):
        narrow.put(narrow_params, 1, trees[0], adapters[0])


# ----------------------------------------------------------------------------- the adapter harness


def fixed_index(bank, slot):
    """``bank`` with every example on ``slot``: a one-adapter view the harness can run (and merge)."""
    ids = jnp.full((harness.BATCH,), slot, jnp.int32)
    return bank._replace(apply=functools.partial(bank.apply, adapter_index=ids), merge=functools.partial(bank.merge, slot=slot),
                         unmerge=functools.partial(bank.unmerge, slot=slot), call_args=frozenset())


CASE = harness.Case("multi_lora", lambda **kw: fixed_index(multi_lora(
    [lrj.lora(rank=3, alpha=4.0, **kw), lrj.lora(rank=2, alpha=3.0, rslora=True, **kw)]), 1))


@pytest.mark.parametrize("check", sorted(harness.CHECKS))
def test_harness(check, tmp_path):
    if check == "checkpoint":
        harness.CHECKS[check](CASE, tmp_path)
    else:
        harness.CHECKS[check](CASE)


# ----------------------------------------------------------------------------- m-LoRA training


def mlora_setup():
    adapters, trees, model, x, params = random_bank(seed=3)
    bank = multi_lora(adapters, capacity=4)
    rng = np.random.default_rng(5)
    batches = [{"x": jnp.asarray(rng.standard_normal((n, harness.D)), jnp.float32),
                "y": jnp.asarray(rng.standard_normal((n, harness.D)), jnp.float32)} for n in (3, 5, 2)]
    optimizers = [optax.adam(1e-2), optax.sgd(5e-2, momentum=0.9), optax.adamw(3e-3, weight_decay=0.1)]

    def loss_fn(bank_params, params, batch, adapter_index, rng):
        y = lrj.linen.apply(model, bank, params, bank_params, batch["x"], adapter_index=adapter_index)
        return jnp.mean(jnp.square(y - batch["y"]), axis=-1)

    def alone_loss(adapter, tree, batch):
        return jnp.mean(jnp.square(lrj.linen.apply(model, adapter, params, tree, batch["x"]) - batch["y"]))

    return adapters, trees, params, bank, batches, optimizers, loss_fn, alone_loss


def padded(tree, bank_slot):
    """The bank slot's leaves cut to the adapter's own ranks, as an ``{"a", "b"}`` tree."""
    return {k: {n: {"kernel": {"a": v[n]["kernel"]["bank_a"][..., : tree[k][n]["kernel"]["a"].shape[-1]],
                               "b": v[n]["kernel"]["bank_b"][: tree[k][n]["kernel"]["a"].shape[-1]]}} for n in v}
            for k, v in bank_slot.items()}


def test_mlora_gradients_equal_each_adapter_trained_alone():
    adapters, trees, params, bank, batches, optimizers, loss_fn, alone_loss = mlora_setup()
    state = multi_train.init(bank, bank.stack(trees, adapters), optimizers)
    losses, grads = jax.jit(multi_train.make_grads(loss_fn, bank))(state.trainable, state.frozen, params, batches)
    for k, (adapter, tree, batch) in enumerate(zip(adapters, trees, batches)):
        loss_k, g_k = jax.value_and_grad(lambda t: alone_loss(adapter, t, batch))(tree)
        np.testing.assert_allclose(losses[k], loss_k, rtol=1e-6)
        mine = padded(tree, multi_train.slot(grads, k, state.frozen))
        harness.assert_close(mine, g_k, 1e-5, f"gradient of adapter {k}")  # grads are O(1): float32 rounding
        assert harness.max_diff(g_k, jax.tree.map(jnp.zeros_like, g_k)) > 1e-3
    np.testing.assert_array_equal(jax.tree.leaves(multi_train.slot(grads, 3, state.frozen))[0], 0.0)  # the empty slot


def test_mlora_steps_equal_separate_runs_and_checkpoint_per_adapter(tmp_path):
    adapters, trees, params, bank, batches, optimizers, loss_fn, alone_loss = mlora_setup()
    state = multi_train.init(bank, bank.stack(trees, adapters), optimizers)
    step = multi_train.make_step(loss_fn, bank, optimizers)
    history = []
    for _ in range(3):
        state, metrics = step(state, params, batches)
        history.append(np.asarray(metrics["loss"]))
    assert step._cache_size() == 1
    final = lrj.join(bank, state.trainable, state.frozen)
    for k, (adapter, tree, batch, opt) in enumerate(zip(adapters, trees, batches, optimizers)):
        opt_state, alone_history = opt.init(tree), []
        for _ in range(3):
            loss_k, g = jax.value_and_grad(lambda t: alone_loss(adapter, t, batch))(tree)
            updates, opt_state = opt.update(g, opt_state, tree)
            tree = optax.apply_updates(tree, updates)
            alone_history.append(float(loss_k))
        np.testing.assert_allclose([h[k] for h in history], alone_history, rtol=1e-5)
        harness.assert_close(bank.unstack(final, k), tree, 1e-5, f"adapter {k} after 3 m-LoRA steps vs alone")
        assert harness.max_diff(tree, trees[k]) > 1e-3
    dirs = multi_train.save(tmp_path, bank, state, adapters=adapters)
    assert [os.path.basename(d) for d in dirs] == ["adapter_0", "adapter_1", "adapter_2"]
    from lowrank_jax import checkpoint
    mngr = checkpoint.manager(dirs[1])
    step_1, tree_1, _, config_1 = checkpoint.restore(mngr, checkpoint.abstract(bank.unstack(final, 1)))
    mngr.close()
    assert step_1 == 3 and config_1["rank"] == 3 and config_1["rslora"] is True
    harness.assert_equal(tree_1, bank.unstack(final, 1))  # each checkpoint is the adapter's own LoRA tree (rank 3)
    fresh = multi_train.init(bank, bank.init(jax.random.key(9), params), optimizers)
    restored = multi_train.restore(tmp_path, bank, fresh)
    harness.assert_equal(restored.trainable, state.trainable)
    harness.assert_equal(restored.opt_states, state.opt_states)
    assert int(restored.step) == 3


def test_mlora_bad_input():
    adapters, trees, params, bank, batches, optimizers, loss_fn, _ = mlora_setup()
    state = multi_train.init(bank, bank.stack(trees, adapters), optimizers)
    step = multi_train.make_step(loss_fn, bank, optimizers, jit=False)
    with pytest.raises(ValueError, match="2 batches for 3 adapters"):
        step(state, params, batches[:2])
    with pytest.raises(ValueError, match="5 optimizers for a bank of capacity 4"):
        multi_train.init(bank, bank.stack(trees, adapters), optimizers + optimizers[:2])
    bad = [batches[0], {"x": batches[1]["x"], "y": batches[1]["y"][:2]}, batches[2]]
    with pytest.raises(ValueError, match=r"batch 1's leaves disagree .* sizes \[2, 5\]"):
        step(state, params, bad)
    with pytest.raises(ValueError, match=r"one loss per example, shape \(10,\); got \(\)"):
        multi_train.make_step(lambda *a: loss_fn(*a).mean(), bank, optimizers, jit=False)(state, params, batches)


def test_mlora_metrics_are_per_adapter_means():
    adapters, trees, params, bank, batches, optimizers, loss_fn, alone_loss = mlora_setup()
    state = multi_train.init(bank, bank.stack(trees, adapters), optimizers)

    def with_metrics(*args):
        losses = loss_fn(*args)
        return losses, {"row": jnp.arange(losses.shape[0], dtype=jnp.float32)}

    _, metrics = multi_train.make_step(with_metrics, bank, optimizers, jit=False)(state, params, batches)
    np.testing.assert_allclose(metrics["row"], [1.0, 5.0, 8.5])  # rows 0-2, 3-7, 8-9
    np.testing.assert_allclose(metrics["loss"][2], alone_loss(adapters[2], trees[2], batches[2]), rtol=1e-6)


# ----------------------------------------------------------------------------- serving: KV-cache generation


@functools.cache
def tiny_llama():
    config = llama.LlamaConfig.tiny()
    model = llama.LlamaForCausalLM(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    adapters = [lrj.lora(rank=4, alpha=16.0, targets=r".*/(q_proj|v_proj)/kernel"),
                lrj.lora(rank=2, alpha=8.0, targets=r".*/(o_proj|down_proj)/kernel")]
    trees = [harness.perturb(a.init(jax.random.key(k + 1), params), seed=k, std=0.5) for k, a in enumerate(adapters)]
    return model, params, adapters, trees


def test_generate_with_a_bank_equals_each_merged_adapter_per_row():
    model, params, adapters, trees = tiny_llama()
    bank = multi_lora(adapters, capacity=3)
    bp = bank.stack(trees)
    prompts = [[5, 9, 2, 7], [3, 1], [8, 8, 8], [4, 6, 1, 2], [11, 3, 5]]
    ids = [0, 1, -1, 1, 0]
    mixed = llama.generate(model, params, prompts, max_new_tokens=5, adapter=bank, adapter_params=bp, adapter_index=ids)
    merged = {-1: params, 0: adapters[0].merge(params, trees[0]), 1: adapters[1].merge(params, trees[1])}
    alone = {k: llama.generate(model, p, prompts, max_new_tokens=5) for k, p in merged.items()}  # one compile
    for i, k in enumerate(ids):
        np.testing.assert_array_equal(mixed[i], alone[k][i])
    assert len({tuple(alone[k][0]) for k in alone}) == 3  # the three models decode differently: the check tells rows apart
    compiled = llama._generate._cache_size()
    swapped = bank.put(bp, 2, trees[1], adapters[1])  # hot swap: adapter 1 also in the empty slot 2
    again = llama.generate(model, params, prompts, max_new_tokens=5, adapter=bank, adapter_params=swapped,
                           adapter_index=[0, 2, -1, 1, 0])
    assert llama._generate._cache_size() == compiled  # no recompile
    np.testing.assert_array_equal(again, mixed)
    with pytest.raises(ValueError, match="needs `adapter_index`"):
        llama.generate(model, params, prompts, max_new_tokens=2, adapter=bank, adapter_params=bp)
    with pytest.raises(ValueError, match=r"adapter index \[2\] names an empty slot"):
        llama.generate(model, params, prompts, max_new_tokens=2, adapter=bank, adapter_params=bp, adapter_index=[2, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="one entry per prompt: 2 for 5 prompts"):
        llama.generate(model, params, prompts, max_new_tokens=2, adapter=bank, adapter_params=bp, adapter_index=[0, 1])
    with pytest.raises(ValueError, match="`adapter_index` is for a bank"):
        llama.generate(model, params, prompts, max_new_tokens=2, adapter_index=[0, 1, 0, 0, 0])


def test_generate_with_one_factored_adapter_equals_merged():
    model, params, adapters, trees = tiny_llama()
    prompts = [[5, 9, 2, 7], [3, 1]]
    factored = llama.generate(model, params, prompts, max_new_tokens=4, adapter=adapters[0], adapter_params=trees[0])
    np.testing.assert_array_equal(factored, llama.generate(model, adapters[0].merge(params, trees[0]), prompts, max_new_tokens=4))


# ----------------------------------------------------------------------------- sharding on 8 simulated devices


def _device_report():
    """Runs in a subprocess with 8 CPU devices: the bank sharded along its adapter axis, and inherited from the
    kernels, on an Auto and an Explicit mesh; and the harness's one-adapter case (``harness.device_diffs``)."""
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    adapters, trees, model, x, params = random_bank(capacity=4, ranks=(2, 3, 1, 2))
    ids = jnp.array([3, -1, 0, 1, 2, 3, 1, 0])
    report = {}
    for kind in (AxisType.Auto, AxisType.Explicit):
        mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(kind, kind))
        for path in ("gather", "ragged"):
            bank = multi_lora(adapters, path=path)
            bp = bank.stack(trees)
            fn = jax.jit(lambda params, bp, x, ids: lrj.linen.apply(model, bank, params, bp, x, adapter_index=ids))
            one = fn(params, bp, x, ids)
            with jax.set_mesh(mesh):
                put = lambda tree, spec: jax.device_put(tree, jax.tree.map(lambda p: NamedSharding(mesh, p), spec))  # noqa: E731
                sharded_params = put(params, harness.mlp_specs(params))
                by_adapter = jax.device_put(bp, multi.bank_shardings(bp, mesh, "model"))
                inherited = jax.device_put(bp, lrj.adapter_shardings(sharded_params, bp, adapter=bank))
                xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
                for name, tree in (("adapter_axis", by_adapter), ("inherited", inherited)):
                    y = fn(sharded_params, tree, xs, ids)
                    report[f"{kind.name}/{path}/{name}"] = {
                        "diff": float(jnp.abs(y - one).max()),
                        "spec_a": str(tree["layers_0"]["up"]["kernel"]["bank_a"].sharding.spec),
                        "spec_b": str(tree["layers_0"]["up"]["kernel"]["bank_b"].sharding.spec)}
        diffs = harness.device_diffs(CASE, mesh)
        report[f"{kind.name}/harness"] = {"diff": max(diffs["loss"], diffs["grads"])}
    print(json.dumps(report))


@pytest.mark.slow  # a subprocess with 8 simulated devices (~15 s)
def test_bank_shards_on_8_devices_by_adapter_axis_or_inherited():
    root = str(pathlib.Path(__file__).parent.parent)
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, __file__, "devices"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(report) == {f"{k}/{p}/{n}" for k in ("Auto", "Explicit") for p in ("gather", "ragged")
                           for n in ("adapter_axis", "inherited")} | {"Auto/harness", "Explicit/harness"}
    for name, entry in report.items():
        assert entry["diff"] < 1e-5, (name, entry)
    assert report["Explicit/gather/adapter_axis"]["spec_a"] == "P('model',)"
    assert report["Explicit/gather/inherited"]["spec_b"] == "P(None, None, 'model')"  # b's out axis: up's column split




# ----------------------------------------------------------------------------- the benchmark, at tiny sizes


@pytest.mark.slow
def test_bench_multi_lora_tiny(tmp_path):
    sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "benchmarks"))
    import bench_multi_lora

    result = bench_multi_lora.main(["--tiny", "--out", str(tmp_path / "multi.json")])
    assert json.loads((tmp_path / "multi.json").read_text())["config"]["tiny"] is True
    assert (tmp_path / "multi_lora_paths.png").stat().st_size > 1000
    train = result["train"]
    assert train["flops_x_sequential"] == pytest.approx(1.0, abs=0.05)  # one shared pass does the same math
    assert train["bytes_x_concurrent"] < 1.0  # one base instead of four
    assert [r["token_agreement"] for r in result["generate"]] == [1.0] * 3  # mixed batch decodes as merge-and-serve
    assert all(r["flops_ragged_x_gather"] > 1.0 for r in result["paths"])  # CPU ragged_dot: a dense product per group


if __name__ == "__main__" and sys.argv[1:] == ["devices"]:
    assert len(jax.devices()) == 8, jax.devices()
    _device_report()
