"""Mixtures of LoRA experts (``lowrank_jax.adapters.moe``): MoLoRA and MixLoRA against torch transcriptions of
their reference codes (``tests/fixtures/make_moe.py``), the aux output through the linen and NNX bridges (also
under scan + remat), MALoRA's construction, expert sharding on 8 simulated devices, bad input.

Run as a script (``python tests/test_moe.py devices``) it is the 8-device worker of ``test_expert_sharding``.
"""

import os
import sys

if __name__ == "__main__":  # the device worker: the device count must be set before jax is imported
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import functools  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

import lowrank_jax as lrj  # noqa: E402
from lowrank_jax.adapters import base, moe  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import adapter_harness as harness  # noqa: E402

FIXTURE = np.load(pathlib.Path(__file__).parent / "fixtures" / "moe.npz", allow_pickle=False)
AUX = base.AUX_COLLECTION


def ref(key):
    return jnp.asarray(FIXTURE[key])


# ----------------------------------------------------------------------------- models


class OneDense(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.features, use_bias=False, name="proj")(x)


class TwoLayers(nn.Module):
    """``l2(tanh(l1(x)))``, the fixture's MixLoRA model."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(6, name="l2")(jnp.tanh(nn.Dense(12, name="l1")(x)))


class NNXTwoLayers(nnx.Module):
    def __init__(self, rngs):
        self.l1, self.l2 = nnx.Linear(8, 12, rngs=rngs), nnx.Linear(12, 6, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def mixlora_trees():
    """``(params, adapter tree)`` of the fixture's MixLoRA model in Flax orientation (bare params)."""
    params, lp = {}, {}
    for name in ("l1", "l2"):
        get = lambda leaf: ref(f"mixlora/{name}/{leaf}")  # noqa: E731
        params[name] = {"kernel": get("w").T, "bias": get("bias")}
        lp[name] = {"kernel": {"router": get("gate").T, "expert_a": jnp.swapaxes(get("lora_a"), 1, 2),
                               "expert_b": jnp.swapaxes(get("lora_b"), 1, 2)}}
    return params, lp


MIXLORA = moe.mixlora(num_experts=4, rank=2, alpha=4.0, targets=r".*/kernel", top_k=2)


# ----------------------------------------------------------------------------- references


@pytest.mark.parametrize("top_k, key", [(None, "molora/soft"), (2, "molora/top2")])
def test_molora_equals_forai_code(top_k, key):
    """for-ai's MoLoRa: soft merge, and top-k as probabilities times the top-k mask (not renormalised)."""
    x = ref("x")
    params = {"proj": {"kernel": jnp.zeros((8, 6))}}  # the base is zero: the output is the mixture's term alone
    lp = {"proj": {"kernel": {"expert_a": ref("molora/a"), "expert_b": ref("molora/b"), "router": ref("molora/router")}}}
    adapter = moe.molora(num_experts=4, rank=2, alpha=4.0, top_k=top_k)
    y = lrj.linen.apply(OneDense(6), adapter, params, lp, x)
    np.testing.assert_allclose(y, ref(key), rtol=1e-5, atol=1e-6)


def test_route_molora_topk_is_not_renormalised_and_mixlora_is():
    probs = ref("molora/probs")
    logits = jnp.log(probs)
    soft, p, _ = moe.route(logits, None, False)
    np.testing.assert_allclose(soft, probs, rtol=1e-5)
    w_molora, _, mask = moe.route(logits, 2, False)
    w_mixlora, _, _ = moe.route(logits, 2, True)
    np.testing.assert_array_equal(np.sum(mask, -1), 2.0)
    np.testing.assert_allclose(w_molora, probs * mask, rtol=1e-5)
    assert float(jnp.max(jnp.sum(w_molora, -1))) < 0.999  # two of four experts' probabilities, as the code leaves them
    np.testing.assert_allclose(jnp.sum(w_mixlora, -1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(w_mixlora, w_molora / jnp.sum(w_molora, -1, keepdims=True), rtol=1e-6)


def _mixlora_objective(lp, params, x, g):
    y, state = lrj.linen.apply(TwoLayers(), MIXLORA, params, lp, x, mutable=[AUX])
    aux = moe.aux_loss(state)
    return jnp.sum(y * g) + aux, (y, aux, state)


def test_mixlora_output_aux_and_gradients_equal_moe_peft():
    """MoE-PEFT's MixtralSparseMoe routing (top-2 renormalised) and MixtralRouterLoss over both routers'
    concatenated logits; gradients of ``sum(y g) + aux`` reach every router and expert as in torch."""
    params, lp = mixlora_trees()
    grads, (y, aux, state) = jax.jit(jax.grad(_mixlora_objective, has_aux=True))(lp, params, ref("x"), ref("mixlora/g"))
    np.testing.assert_allclose(y, ref("mixlora/y"), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(aux, ref("mixlora/aux"), rtol=1e-5)
    np.testing.assert_allclose(moe.aux_loss(state[AUX]["l1"]), ref("mixlora/aux_l1"), rtol=1e-5)
    for name in ("l1", "l2"):
        got = grads[name]["kernel"]
        np.testing.assert_allclose(got["router"].T, ref(f"mixlora/grad/{name}/gate"), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(jnp.swapaxes(got["expert_a"], 1, 2), ref(f"mixlora/grad/{name}/lora_a"), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(jnp.swapaxes(got["expert_b"], 1, 2), ref(f"mixlora/grad/{name}/lora_b"), rtol=1e-4, atol=1e-5)
        assert float(jnp.max(jnp.abs(got["router"]))) > 1e-3  # the router is trained


def test_aux_gradient_alone_reaches_the_router():
    """The load-balancing loss alone has a gradient for the routers (through the softmax), none for the last
    layer's experts (whose output feeds no router)."""
    params, lp = mixlora_trees()

    def aux_only(lp):
        return moe.aux_loss(lrj.linen.apply(TwoLayers(), MIXLORA, params, lp, ref("x"), mutable=[AUX])[1])

    grads = jax.jit(jax.grad(aux_only))(lp)
    assert float(jnp.max(jnp.abs(grads["l1"]["kernel"]["router"]))) > 1e-6
    assert float(jnp.max(jnp.abs(grads["l2"]["kernel"]["router"]))) > 1e-6
    np.testing.assert_array_equal(grads["l2"]["kernel"]["expert_b"], 0.0)
    np.testing.assert_array_equal(grads["l2"]["kernel"]["expert_a"], 0.0)


# ----------------------------------------------------------------------------- the aux output mechanism


def test_aux_tree_mirrors_targets_and_is_dropped_without_mutable():
    params, lp = mixlora_trees()
    y, state = lrj.linen.apply(TwoLayers(), MIXLORA, params, lp, ref("x"), mutable=[AUX])
    stats = state[AUX]["l1"]["kernel"]
    assert isinstance(stats, tuple) and len(stats) == 1 and isinstance(stats[0], moe.RouterStats)
    np.testing.assert_array_equal(stats[0].tokens, 10.0)  # B * S tokens
    np.testing.assert_allclose(jnp.sum(stats[0].assigned), 20.0)  # two experts per token
    np.testing.assert_allclose(jnp.sum(stats[0].probs), 10.0, rtol=1e-5)
    np.testing.assert_array_equal(lrj.linen.apply(TwoLayers(), MIXLORA, params, lp, ref("x")), y)


def test_aux_loss_raises_without_router_statistics():
    adapter = moe.molora(num_experts=4, rank=2, alpha=4.0)  # for-ai: no load-balancing loss, plain outputs
    params = {"proj": {"kernel": jnp.ones((8, 6))}}
    lp = adapter.init(jax.random.key(0), params)
    _, state = lrj.linen.apply(OneDense(6), adapter, params, lp, ref("x"), mutable=[AUX])
    assert state == {}
    with pytest.raises(ValueError, match="no router statistics"):
        moe.aux_loss(state)


def test_nnx_with_aux_equals_linen():
    params, lp = mixlora_trees()
    model = harness.nnx_with_params(lambda: NNXTwoLayers(nnx.Rngs(0)), params)
    y, aux = jax.jit(lambda lp: lrj.nnx.apply(model, MIXLORA, lp, ref("x"), with_aux=True))(lp)
    y_linen, state = lrj.linen.apply(TwoLayers(), MIXLORA, params, lp, ref("x"), mutable=[AUX])
    np.testing.assert_allclose(y, y_linen, rtol=1e-6, atol=1e-6)
    assert jax.tree.structure(aux) == jax.tree.structure(state)
    np.testing.assert_allclose(moe.aux_loss(aux), ref("mixlora/aux"), rtol=1e-5)
    np.testing.assert_allclose(lrj.nnx.apply(model, MIXLORA, lp, ref("x")), y, rtol=1e-6, atol=1e-6)  # output only


D, H, L = 8, 16, 3


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        return x + nn.Dense(D, name="down")(jnp.tanh(nn.Dense(H, name="up")(x))), None


class Stack(nn.Module):
    scan: bool = False
    aux_axis: bool = True

    @nn.compact
    def __call__(self, x):
        if self.scan:
            axes = {"params": 0, AUX: 0} if self.aux_axis else {"params": 0}
            return nn.scan(nn.remat(Block), variable_axes=axes, split_rngs={"params": True}, length=L)(name="layers")(x, None)[0]
        for i in range(L):
            x, _ = Block(name=f"layers_{i}")(x)
        return x


def _stack(tree):
    return {"layers": jax.tree.map(lambda *v: jnp.stack(v), *[tree[f"layers_{i}"] for i in range(L)])}


@functools.cache
def stack_setup():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 3, D)), jnp.float32)
    params = Stack().init(jax.random.key(0), x)["params"]
    lp = harness.perturb(MIXLORA.init(jax.random.key(1), params), std=0.3)
    return x, params, lp


def test_aux_under_scan_and_remat_equals_unrolled():
    x, params, lp = stack_setup()
    y, state = jax.jit(lambda lp: lrj.linen.apply(Stack(), MIXLORA, params, lp, x, mutable=[AUX]))(lp)
    scanned = Stack(scan=True)
    adapter = moe.mixlora(num_experts=4, rank=2, alpha=4.0, layouts=lrj.linen.kernel_layouts(scanned, x))
    y_scan, state_scan = jax.jit(lambda lp: lrj.linen.apply(scanned, adapter, _stack(params), lp, x, mutable=[AUX]))(_stack(lp))
    np.testing.assert_allclose(y_scan, y, rtol=1e-5, atol=1e-6)
    assert state_scan[AUX]["layers"]["up"]["kernel"][0].assigned.shape == (L, 4)  # stacked over the scanned layers
    np.testing.assert_allclose(moe.aux_loss(state_scan), moe.aux_loss(state), rtol=1e-6)
    assert float(moe.aux_loss(state)) > 0.001  # coef * E * sum f P >= coef, equality only for perfect balance


def test_scan_without_aux_axis_is_an_error_not_a_silent_drop():
    x, params, lp = stack_setup()
    scanned = Stack(scan=True, aux_axis=False)
    adapter = moe.mixlora(num_experts=4, rank=2, alpha=4.0, layouts=lrj.linen.kernel_layouts(scanned, x))
    with pytest.raises(ValueError, match=r"'layers/up/kernel'.*not returned.*variable_axes"):
        lrj.linen.apply(scanned, adapter, _stack(params), _stack(lp), x, mutable=[AUX])


class NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.up, self.down = nnx.Linear(D, H, rngs=rngs), nnx.Linear(H, D, rngs=rngs)

    def __call__(self, x):
        return x + self.down(jnp.tanh(self.up(x)))


class NNXStack(nnx.Module):
    """``L`` blocks made by ``nnx.vmap`` and run by ``nnx.scan(nnx.remat(...))``; the scan slices Params and AdapterAux."""

    def __init__(self, rngs):
        @nnx.split_rngs(splits=L)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return NNXBlock(rngs)

        self.layers = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.StateAxes({(nnx.Param, lrj.nnx.AdapterAux): 0, ...: None}), nnx.Carry), out_axes=nnx.Carry)
        @nnx.remat
        def body(block, x):
            return block(x)

        return body(self.layers, x)


def test_nnx_scan_remat_aux_equals_linen():
    x, params, lp = stack_setup()
    model = harness.nnx_with_params(lambda: NNXStack(nnx.Rngs(0)), _stack(params))
    layouts = lrj.nnx.kernel_layouts(model)
    adapter = moe.mixlora(num_experts=4, rank=2, alpha=4.0, layouts=layouts)
    y, aux = jax.jit(lambda lp: lrj.nnx.apply(model, adapter, lp, x, with_aux=True))(_stack(lp))
    y_linen, state = lrj.linen.apply(Stack(), MIXLORA, params, lp, x, mutable=[AUX])
    np.testing.assert_allclose(y, y_linen, rtol=1e-5, atol=1e-6)
    assert aux[AUX]["layers"]["down"]["kernel"][0].probs.shape == (L, 4)
    np.testing.assert_allclose(moe.aux_loss(aux), moe.aux_loss(state), rtol=1e-6)


# ----------------------------------------------------------------------------- the adapter harness

NO_MERGE = "a routed mixture has no input-independent dense merge: merge raises ValueError (test_merge_raises)"
CASES = [
    harness.Case("molora", lambda **kw: moe.molora(num_experts=3, rank=2, alpha=4.0, **kw), xfail={"merge": NO_MERGE}),
    harness.Case("mixlora", lambda **kw: moe.mixlora(num_experts=3, rank=2, alpha=4.0, **kw), xfail={"merge": NO_MERGE}),
    harness.Case("malora", lambda **kw: moe.malora(num_experts=3, rank=2, shared_rank=3, alpha=4.0, **kw),
                 xfail={"merge": NO_MERGE}),
]


def _harness_params():
    for case in CASES:
        for check in harness.CHECKS:
            marks = [pytest.mark.xfail(strict=True, reason=case.xfail[check])] if check in case.xfail else []
            yield pytest.param(case, check, id=f"{case.name}-{check}", marks=marks)


@pytest.mark.parametrize("case, check", list(_harness_params()))
def test_harness(case, check, tmp_path):
    if check == "checkpoint":
        harness.check_checkpoint(case, tmp_path / "ckpt")
    else:
        harness.CHECKS[check](case)


def test_merge_raises():
    params, lp = mixlora_trees()
    for fn in (MIXLORA.merge, MIXLORA.unmerge):
        with pytest.raises(ValueError, match="mixlora has no dense merge.*router"):
            fn(params, lp)


# ----------------------------------------------------------------------------- MALoRA's construction


def _stacked_a(lp, path=("proj", "kernel")):
    leaves = lp[path[0]][path[1]]
    a = jnp.einsum("is,esr->eir", leaves["shared_a"], leaves["expert_c"])  # A_e = S C_e
    return a, jnp.concatenate(list(a), axis=1)  # [E, in, r], [in, E r]


def test_malora_shapes_shared_subspace_and_rank():
    params = {"proj": {"kernel": jnp.ones((16, 5))}}
    lp = moe.malora(num_experts=3, rank=2, shared_rank=4, alpha=2.0).init(jax.random.key(0), params)
    leaves = lp["proj"]["kernel"]
    assert jax.tree.map(jnp.shape, leaves) == {"shared_a": (16, 4), "expert_c": (3, 4, 2), "expert_b": (3, 2, 5),
                                               "router": (16, 3)}
    np.testing.assert_array_equal(leaves["expert_b"], 0.0)
    _, stacked = _stacked_a(lp)
    assert int(np.linalg.matrix_rank(np.asarray(stacked), tol=1e-5)) == 4  # all experts in one r_s-dim subspace
    s = np.asarray(leaves["shared_a"])
    gram = s.T @ s  # S = U diag(sigma)^beta: orthogonal columns, norms sigma^beta in decreasing order
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-6)
    assert np.all(np.diff(np.diag(gram)) < 0)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_malora_factors_project_the_kaiming_draws_onto_their_top_subspace(beta):
    key, n_in, experts, rank, shared = jax.random.key(3), 12, 3, 2, 4
    s, c = moe._malora_factors(key, experts, n_in, rank, shared, beta)
    draws = jax.random.uniform(key, (experts, n_in, rank), jnp.float32, -1 / np.sqrt(n_in), 1 / np.sqrt(n_in))
    u, sv, _ = np.linalg.svd(np.concatenate(list(np.asarray(draws)), axis=1), full_matrices=False)
    projector = u[:, :shared] @ u[:, :shared].T
    np.testing.assert_allclose(np.einsum("is,esr->eir", s, c), projector @ np.asarray(draws), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(s, axis=0), sv[:shared] ** beta, rtol=1e-5)  # beta's split of sigma
    c_all = np.concatenate(list(np.asarray(c)), axis=1)  # [r_s, E r]
    np.testing.assert_allclose(np.linalg.norm(c_all, axis=1), sv[:shared] ** (1 - beta), rtol=1e-5)


def test_malora_full_shared_rank_gives_kaiming_uniform_experts():
    """With r_s = E r the experts' A_e are exactly the kaiming-uniform draws: bound 1/sqrt(in), variance 1/(3 in)."""
    n_in = 64
    params = {"proj": {"kernel": jnp.ones((n_in, 16))}}
    lp = moe.malora(num_experts=4, rank=8, shared_rank=32, alpha=8.0).init(jax.random.key(1), params)
    a, _ = _stacked_a(lp)
    assert float(jnp.max(jnp.abs(a))) <= 1 / np.sqrt(n_in) + 1e-5
    np.testing.assert_allclose(float(jnp.var(a)), 1 / (3 * n_in), rtol=0.1)
    np.testing.assert_allclose(float(jnp.mean(a)), 0.0, atol=3e-3)


def test_malora_forward_equals_its_formula():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((7, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((8, 6)), jnp.float32)
    adapter = moe.malora(num_experts=3, rank=2, shared_rank=4, alpha=6.0, top_k=2)
    lp = harness.perturb(adapter.init(jax.random.key(0), {"proj": {"kernel": w}}), std=0.5)
    y = lrj.linen.apply(OneDense(6), adapter, {"proj": {"kernel": w}}, lp, x)
    leaves = jax.tree.map(np.asarray, lp["proj"]["kernel"])
    logits = np.asarray(x) @ leaves["router"]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    weights = p * (p >= np.sort(p, -1)[:, -2:-1])  # the top-2 probabilities, not renormalised
    per_expert = np.einsum("ti,is,esr,ero->teo", np.asarray(x), leaves["shared_a"], leaves["expert_c"], leaves["expert_b"])
    want = np.asarray(x @ w) + (6.0 / 2) * np.einsum("te,teo->to", weights, per_expert)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- jitter, bad input


def test_router_jitter_moves_the_routing_only_in_training():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((6, 8)), jnp.float32)
    params = {"proj": {"kernel": jnp.asarray(np.random.default_rng(3).standard_normal((8, 5)), jnp.float32)}}

    def runs(num_experts):
        adapter = moe.molora(num_experts=num_experts, rank=2, alpha=4.0, dropout=1e-9, jitter=0.5)
        lp = harness.perturb(adapter.init(jax.random.key(1), params), std=0.5)
        train = jax.jit(lambda rng: lrj.linen.apply(OneDense(5), adapter, params, lp, x, dropout_rng=rng))
        return train, lrj.linen.apply(OneDense(5), adapter, params, lp, x)

    train, y_eval = runs(4)
    np.testing.assert_array_equal(train(jax.random.key(3)), train(jax.random.key(3)))
    assert float(jnp.max(jnp.abs(train(jax.random.key(3)) - y_eval))) > 1e-3
    assert float(jnp.max(jnp.abs(train(jax.random.key(3)) - train(jax.random.key(4))))) > 1e-3
    train_one, y_eval_one = runs(1)  # one expert: its softmax weight is 1 whatever the jitter does to the router
    np.testing.assert_allclose(train_one(jax.random.key(3)), y_eval_one, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make, match", [
    (lambda: moe.molora(4, 2, 4.0, top_k=5), r"`top_k` \(5\) must be at most `num_experts` \(4\)"),
    (lambda: moe.molora(4, 2, 4.0, top_k=0), r"`top_k` must be an integer >= 1, got 0"),
    (lambda: moe.molora(0, 2, 4.0), r"`num_experts` must be an integer >= 1, got 0"),
    (lambda: moe.molora(4, 0, 4.0), r"`rank` must be an integer >= 1, got 0"),
    (lambda: moe.molora(4, 2, -1.0), r"`alpha` must be a positive number, got -1.0"),
    (lambda: moe.molora(4, 2, 4.0, dropout=1.0), r"`dropout` must be in \[0, 1\), got 1.0"),
    (lambda: moe.molora(4, 2, 4.0, jitter=0.1), r"`jitter` 0.1 needs `dropout` > 0"),
    (lambda: moe.molora(4, 2, 4.0, aux_loss_coef=-1.0), r"`aux_loss_coef` must be a number >= 0, got -1.0"),
    (lambda: moe.molora(4, 2, 4.0, init="zeros"), r"`init` must be one of \('normal', 'kaiming'\), got 'zeros'"),
    (lambda: moe.mixlora(top_k=None), r"`top_k` must be an integer, got None"),
    (lambda: moe.malora(4, 2, 0, 4.0), r"`shared_rank` must be an integer >= 1, got 0"),
    (lambda: moe.malora(4, 2, 3, 4.0, beta=1.5), r"`beta` must be in \[0, 1\], got 1.5"),
])
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_targets_and_sites():
    params = {"proj": {"kernel": jnp.ones((6, 4))}}
    with pytest.raises(ValueError, match=r"`shared_rank` 9 exceeds min\(in, num_experts \* rank\) = 6 at 'proj/kernel'"):
        moe.malora(3, 2, 9, 2.0).init(jax.random.key(0), params)
    with pytest.raises(ValueError, match=r"`rank` 5 is larger than target 'proj/kernel' \(6 in, 4 out\)"):
        moe.molora(3, 5, 2.0).init(jax.random.key(0), params)

    class Embedder(nn.Module):
        @nn.compact
        def __call__(self, ids):
            return nn.Embed(10, 4, name="embed")(ids)

    ids = jnp.arange(3)
    emb = Embedder().init(jax.random.key(0), ids)["params"]
    adapter = moe.molora(2, 2, 2.0, targets=r".*/embedding")
    lp = adapter.init(jax.random.key(0), emb)
    with pytest.raises(NotImplementedError, match=r"molora supports linear layers; 'embed/embedding' is called as 'lookup'"):
        lrj.linen.apply(Embedder(), adapter, emb, lp, ids)


# ----------------------------------------------------------------------------- expert parallelism (8 simulated devices)


def _device_report() -> dict:
    """Loss (task + aux) and trainable gradients of MixLoRA and MoLoRA with experts sharded over the mesh axis
    ``"expert"`` (4 devices) and the batch over ``"data"`` (2), vs the same on one device; the harness's device
    check of every case (Explicit and Auto meshes); the errors of bad ``adapter_axes``."""
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    x, params, _ = stack_setup()
    x = jnp.tile(x, (2, 1, 1))  # the batch divides over "data"
    report = {}
    for name, adapter in (("mixlora", moe.mixlora(num_experts=4, rank=2, alpha=4.0)),
                          ("molora", moe.molora(num_experts=8, rank=2, alpha=4.0, top_k=2))):
        lp = harness.perturb(adapter.init(jax.random.key(1), params), std=0.3)
        trainable, frozen = lrj.split(adapter, lp)

        def loss(trainable, params, x, adapter=adapter, frozen=frozen):
            y, state = lrj.linen.apply(Stack(), adapter, params, lrj.join(adapter, trainable, frozen), x, mutable=[AUX])
            aux = moe.aux_loss(state) if adapter.config["aux_loss_coef"] else 0.0
            return jnp.mean(jnp.square(y)) + aux

        step = jax.jit(jax.value_and_grad(loss))
        loss1, grads1 = step(trainable, params, x)
        for kind, axis_type in (("explicit", AxisType.Explicit), ("auto", AxisType.Auto)):
            mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(axis_type, axis_type))
            with jax.set_mesh(mesh):
                params8 = jax.device_put(params, NamedSharding(mesh, P()))
                shardings = lrj.adapter_shardings(params8, trainable, adapter=adapter, adapter_axes={"expert": "expert"})
                trainable8 = jax.device_put(trainable, shardings)
                loss8, grads8 = step(trainable8, params8, jax.device_put(x, NamedSharding(mesh, P("data"))))
                specs = {leaf: str(shardings["layers_0"]["up"]["kernel"][leaf].spec) for leaf in ("expert_a", "expert_b", "router")}
            report[f"{name}/{kind}"] = {"loss": abs(float(loss1) - float(loss8)), "grads": harness.max_diff(grads1, grads8),
                                        "specs": specs, "devices": len(mesh.devices.flat)}
    for case in CASES:  # the harness's device check: kernels sharded over "model", experts replicated (the default)
        for kind, axis_type in (("explicit", AxisType.Explicit), ("auto", AxisType.Auto)):
            diffs = harness.device_diffs(case, jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2))
            report[f"harness/{case.name}/{kind}"] = {k: diffs[k] for k in ("loss", "grads", "devices")}
    mesh = jax.make_mesh((2, 4), ("data", "expert"))
    adapter = moe.molora(num_experts=6, rank=2, alpha=4.0)
    lp = adapter.init(jax.random.key(1), params)
    params8 = jax.device_put(params, NamedSharding(mesh, P()))
    for label, axes in (("typo", {"experts": "expert"}), ("no_axis", {"expert": "model"}), ("indivisible", {"expert": "expert"})):
        try:
            lrj.adapter_shardings(params8, lp, adapter=adapter, adapter_axes=axes)
            report[f"error/{label}"] = None
        except ValueError as e:
            report[f"error/{label}"] = str(e)
    return report


@pytest.mark.slow
def test_expert_sharding_on_8_devices_equals_one_device():
    out = subprocess.run([sys.executable, __file__, "devices"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("mixlora/explicit", "mixlora/auto", "molora/explicit", "molora/auto"):
        r = report[key]
        assert r["devices"] == 8
        assert r["loss"] < 1e-5 and r["grads"] < 1e-5, (key, r)
        assert r["specs"] == {"expert_a": "P('expert', None, None)", "expert_b": "P('expert', None, None)",
                              "router": "P(None, 'expert')"}, r
    for case in CASES:
        for kind in ("explicit", "auto"):
            r = report[f"harness/{case.name}/{kind}"]
            assert r["devices"] == 8 and r["loss"] < 1e-5 and r["grads"] < 1e-5, (case.name, kind, r)
    assert "maps 'experts', which no leaf of the adapter has" in report["error/typo"]
    assert "mesh axes ['model'] that the mesh" in report["error/no_axis"]
    assert "its 'expert' axis of size 6 does not divide over mesh axes 'expert' (4 devices)" in report["error/indivisible"]


def test_adapter_axes_default_replicates_experts():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((1,), ("expert",))
    params = jax.device_put({"proj": {"kernel": jnp.ones((6, 4))}}, NamedSharding(mesh, P()))
    adapter = moe.molora(2, 2, 2.0)
    lp = adapter.init(jax.random.key(0), params)
    default = lrj.adapter_shardings(params, lp, adapter=adapter)["proj"]["kernel"]
    assert {n: s.spec for n, s in default.items()} == {"expert_a": P(None, None, None), "expert_b": P(None, None, None),
                                                       "router": P(None, None)}
    mapped = lrj.adapter_shardings(params, lp, adapter=adapter, adapter_axes={"expert": "expert"})["proj"]["kernel"]
    assert mapped["expert_a"].spec == P("expert", None, None)
    with pytest.raises(ValueError, match="`adapter_axes` maps 'in', a kernel axis role"):
        lrj.adapter_shardings(params, lp, adapter=adapter, adapter_axes={"in": "expert"})
    column_parallel = jax.device_put(params, NamedSharding(mesh, P(None, "expert")))  # the kernel's out axis on "expert"
    with pytest.raises(ValueError, match=r"leaf 'expert_b' at 'proj/kernel': mesh axis 'expert' would shard both its "
                                         r"'expert' and 'out' axes"):
        lrj.adapter_shardings(column_parallel, lp, adapter=adapter, adapter_axes={"expert": "expert"})


if __name__ == "__main__" and sys.argv[1:] == ["devices"]:
    print(json.dumps(_device_report()))


@pytest.mark.slow
def test_llama_scan_remat_returns_the_aux_of_every_layer():
    """``lrj.models.llama``'s scanned blocks carry the ``"adapter_aux"`` collection: same aux loss as unrolled."""
    from lowrank_jax.models import llama

    model = llama.LlamaForCausalLM(llama.LlamaConfig.tiny())
    ids = jax.random.randint(jax.random.key(1), (2, 9), 0, model.config.vocab_size)
    params = jax.jit(model.init)(jax.random.key(0), ids)["params"]
    scanned = llama.LlamaForCausalLM(model.config.replace(scan_layers=True, remat=True))
    stacked = llama.stack_layers(params, model.config.num_hidden_layers)
    targets = r".*/(q_proj|down_proj)/kernel"
    adapter = moe.mixlora(num_experts=4, rank=2, alpha=4.0, targets=targets)
    lp = harness.perturb(adapter.init(jax.random.key(2), params), std=0.1)
    scan_adapter = moe.mixlora(num_experts=4, rank=2, alpha=4.0, targets=targets,
                               layouts=lrj.linen.kernel_layouts(scanned, ids))
    stacked_lp = llama.stack_layers(lp, model.config.num_hidden_layers)
    y, state = jax.jit(lambda lp: lrj.linen.apply(model, adapter, params, lp, ids, mutable=[AUX]))(lp)
    y_scan, state_scan = jax.jit(lambda lp: lrj.linen.apply(scanned, scan_adapter, stacked, lp, ids, mutable=[AUX]))(stacked_lp)
    np.testing.assert_allclose(y_scan, y, atol=1e-4)
    assert len(jax.tree.leaves(state[AUX])) == 4 * 2 * model.config.num_hidden_layers  # 4 stats x 2 targets x layers
    np.testing.assert_allclose(moe.aux_loss(state_scan), moe.aux_loss(state), rtol=1e-5)


class NNXStackWithoutAuxAxis(NNXStack):
    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.StateAxes({nnx.Param: 0, ...: None}), nnx.Carry), out_axes=nnx.Carry)
        def body(block, x):
            return block(x)

        return body(self.layers, x)


def test_nnx_scan_without_aux_axis_raises_with_the_fix():
    x, params, lp = stack_setup()
    model = harness.nnx_with_params(lambda: NNXStackWithoutAuxAxis(nnx.Rngs(0)), _stack(params))
    adapter = moe.mixlora(num_experts=4, rank=2, alpha=4.0, layouts=lrj.nnx.kernel_layouts(model))
    with pytest.raises(ValueError, match=r"with_aux=True: an nnx.scan/nnx.vmap over adapted layers must give "
                                         r"lrj.nnx.AdapterAux an axis"):
        lrj.nnx.apply(model, adapter, _stack(lp), x, with_aux=True)
    y = lrj.nnx.apply(model, adapter, _stack(lp), x)  # without with_aux nothing is sown: the scan runs
    assert y.shape == x.shape and float(jnp.max(jnp.abs(y - model(x)))) > 1e-4
