"""LoRA as a pure transform: parity with peft, inits, patterns, merge, penalty, bad input."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_jax as lrj

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def peft():
    return np.load(FIXTURES / "peft_lora.npz", allow_pickle=False)


class Proj(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(40, name="proj")(x)


class Emb(nn.Module):
    @nn.compact
    def __call__(self, ids):
        return nn.Embed(50, 16, name="emb")(ids)


@pytest.mark.parametrize("case, rslora", [("dense", False), ("rslora", True)])
def test_dense_output_and_merge_equal_peft(peft, case, rslora):
    # torch Linear weight [out, in] -> Flax kernel [in, out]; lora_A [r, in] -> a = A.T; lora_B [out, r] -> b = B.T
    params = {"params": {"proj": {"kernel": jnp.asarray(peft[f"{case}_W"].T), "bias": jnp.asarray(peft[f"{case}_bias"])}}}
    lp = {"params": {"proj": {"kernel": {"a": jnp.asarray(peft[f"{case}_A"].T), "b": jnp.asarray(peft[f"{case}_B"].T)}}}}
    adapter = lrj.lora(rank=4, alpha=8.0, targets=r".*/proj/kernel", rslora=rslora)
    assert lrj.lora_scale(4, 8.0, rslora) == pytest.approx(float(peft[f"{case}_scaling"]))
    y = lrj.linen.apply(Proj(), adapter, params, lp, jnp.asarray(peft[f"{case}_x"]))
    np.testing.assert_allclose(y, peft[f"{case}_y"], atol=2e-6, rtol=1e-6)
    merged = adapter.merge(params, lp)
    np.testing.assert_allclose(merged["params"]["proj"]["kernel"], peft[f"{case}_merged_W"].T, atol=1e-6, rtol=1e-6)


def test_embedding_output_and_merge_equal_peft(peft):
    params = {"params": {"emb": {"embedding": jnp.asarray(peft["embed_weight"])}}}
    # peft: lora_embedding_A [r, vocab], lora_embedding_B [dim, r]; ours: a [vocab, r], b [r, dim]
    lp = {"params": {"emb": {"embedding": {"a": jnp.asarray(peft["embed_A"].T), "b": jnp.asarray(peft["embed_B"].T)}}}}
    adapter = lrj.lora(rank=4, alpha=8.0, targets=r".*/embedding")
    y = lrj.linen.apply(Emb(), adapter, params, lp, jnp.asarray(peft["embed_ids"]))
    np.testing.assert_allclose(y, peft["embed_y"], atol=2e-6, rtol=1e-6)
    merged = adapter.merge(params, lp)
    np.testing.assert_allclose(merged["params"]["emb"]["embedding"], peft["embed_merged_weight"], atol=1e-6)


@pytest.mark.parametrize("rslora", [False, True])
def test_rank_and_alpha_patterns_give_peft_scalings(peft, rslora):
    layers = {"q_proj": (16, 16), "v_proj": (16, 16), "mlp_up": (16, 32)}
    params = {"params": {n: {"kernel": jnp.zeros(s)} for n, s in layers.items()}}
    adapter = lrj.lora(rank=8, alpha=16.0, targets=r".*/(q_proj|v_proj|mlp_up)/kernel", rslora=rslora,
                       rank_pattern={r".*/v_proj/.*": 4}, alpha_pattern={r".*/mlp_up/.*": 64.0})
    lp = adapter.init(jax.random.key(0), params)
    prefix = "patterns_rs_" if rslora else "patterns_"
    for name in layers:
        r = lp["params"][name]["kernel"]["a"].shape[-1]
        assert r == int(peft[f"{prefix}{name}_r"])
        # scaling observed through merge: delta = s * a b with a, b set to ones
        ones = jax.tree.map(jnp.ones_like, lp)
        delta = adapter.merge(params, ones)["params"][name]["kernel"]
        np.testing.assert_allclose(delta, r * float(peft[f"{prefix}{name}_scaling"]), rtol=1e-6)


def test_kaiming_init_matches_peft_bounds(peft):
    params = {"params": {"d": {"kernel": jnp.zeros((1000, 64))}}}
    lp = lrj.lora(rank=16, targets=".*").init(jax.random.key(0), params)["params"]["d"]["kernel"]
    bound = float(peft["init_A_bound"])
    assert float(jnp.abs(lp["a"]).max()) <= bound
    assert float(jnp.abs(lp["a"]).max()) > 0.99 * bound  # uniform over the whole interval
    assert float(jnp.abs(lp["b"]).max()) == float(peft["init_B_absmax"]) == 0.0
    # U(-c, c) has std c / sqrt(3)
    np.testing.assert_allclose(jnp.std(lp["a"]), bound / np.sqrt(3), rtol=0.02)


def test_gaussian_init_matches_peft_std(peft):
    params = {"params": {"d": {"kernel": jnp.zeros((1000, 64))}}}
    lp = lrj.lora(rank=16, targets=".*", init="gaussian").init(jax.random.key(0), params)["params"]["d"]["kernel"]
    # ours against peft's measured std, and against the value peft's code asks for (1 / r)
    np.testing.assert_allclose(jnp.std(lp["a"]), float(peft["init_gauss_A_std"]), rtol=0.03)
    np.testing.assert_allclose(jnp.std(lp["a"]), 1 / 16, rtol=0.03)
    assert not jnp.any(lp["b"])


def test_embedding_init_is_reversed():
    params = {"params": {"emb": {"embedding": jnp.zeros((500, 32))}}}
    lp = lrj.lora(rank=8, targets=".*").init(jax.random.key(0), params)["params"]["emb"]["embedding"]
    assert lp["a"].shape == (500, 8) and lp["b"].shape == (8, 32)
    assert not jnp.any(lp["a"])
    np.testing.assert_allclose(jnp.std(lp["b"]), 1.0, rtol=0.1)


def test_init_returns_only_trainable_leaves_and_does_not_touch_params():
    params = {"params": {"a": {"kernel": jnp.ones((8, 4)), "bias": jnp.ones(4)}, "b": {"kernel": jnp.ones((4, 2))}}}
    before = jax.tree.map(np.asarray, params)
    lp = lrj.lora(rank=2, targets=r".*/a/kernel").init(jax.random.key(0), params)
    assert jax.tree.structure(lp) == jax.tree.structure({"params": {"a": {"kernel": {"a": 0, "b": 0}}}})
    jax.tree.map(np.testing.assert_array_equal, params, before)


def test_targets_as_list_and_callable():
    params = {"params": {"q": {"kernel": jnp.ones((8, 8))}, "k": {"kernel": jnp.ones((8, 8))}, "v": {"kernel": jnp.ones((8, 8))}}}
    by_list = lrj.lora(rank=2, targets=[r".*/q/kernel", r".*/v/kernel"]).init(jax.random.key(0), params)
    by_fn = lrj.lora(rank=2, targets=lambda path, leaf: path.endswith(("q/kernel", "v/kernel"))).init(jax.random.key(0), params)
    assert sorted(by_list["params"]) == sorted(by_fn["params"]) == ["q", "v"]


def test_merge_unmerge_round_trip_is_exact_to_fp32():
    key = jax.random.key(0)
    params = {"params": {"d": {"kernel": jax.random.normal(key, (64, 48))}}}
    adapter = lrj.lora(rank=8, alpha=16.0, targets=".*")
    lp = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape), adapter.init(key, params))
    merged = adapter.merge(params, lp)
    delta = merged["params"]["d"]["kernel"] - params["params"]["d"]["kernel"]
    expected = 2.0 * np.asarray(lp["params"]["d"]["kernel"]["a"], np.float64) @ np.asarray(lp["params"]["d"]["kernel"]["b"], np.float64)
    np.testing.assert_allclose(delta, expected, atol=1e-5)
    back = adapter.unmerge(merged, lp)
    np.testing.assert_allclose(back["params"]["d"]["kernel"], params["params"]["d"]["kernel"], atol=2e-6)


def test_merge_keeps_bf16_dtype_and_computes_delta_in_fp32():
    params = {"params": {"d": {"kernel": jnp.ones((16, 16), jnp.bfloat16)}}}
    adapter = lrj.lora(rank=2, targets=".*")
    lp = adapter.init(jax.random.key(0), params)
    assert lp["params"]["d"]["kernel"]["a"].dtype == jnp.bfloat16
    merged = adapter.merge(params, jax.tree.map(lambda x: jnp.full_like(x, 1e-3), lp))
    assert merged["params"]["d"]["kernel"].dtype == jnp.bfloat16


def test_penalty_is_frobenius_norm_of_scaled_update():
    key = jax.random.key(0)
    params = {"params": {"d": {"kernel": jnp.zeros((12, 10))}, "s": {"kernel": jnp.zeros((3, 6, 5))}}}
    adapter = lrj.lora(rank=3, alpha=6.0, targets=".*", layouts={"params/s/kernel": lrj.Layout(1, 1)})
    lp = jax.tree.map(lambda x: jax.random.normal(key, x.shape), adapter.init(key, params))
    merged = adapter.merge(params, lp)
    expected = sum(float(jnp.sum(x**2)) for x in jax.tree.leaves(merged))
    np.testing.assert_allclose(adapter.penalty(params, lp), expected, rtol=1e-5)


def test_labels_and_masks_drive_optax_partition():
    params = {"params": {"d": {"kernel": jnp.ones((4, 4))}}}
    lp = lrj.lora(rank=2, targets=".*").init(jax.random.key(0), params)
    assert lrj.labels(lp) == {"params": {"d": {"kernel": {"a": "a", "b": "b"}}}}
    assert lrj.mask(lp, ["b"]) == {"params": {"d": {"kernel": {"a": False, "b": True}}}}
    opt = optax.partition({"a": optax.sgd(1.0), "b": optax.sgd(10.0)}, lrj.labels)
    grads = jax.tree.map(jnp.ones_like, lp)
    updates, _ = opt.update(grads, opt.init(lp), lp)
    assert float(updates["params"]["d"]["kernel"]["a"][0, 0]) == -1.0
    assert float(updates["params"]["d"]["kernel"]["b"][0, 0]) == -10.0


def test_trainable_summary_counts_like_peft():
    params = {"params": {"d": {"kernel": jnp.ones((100, 50)), "bias": jnp.ones(50)}}}
    lp = lrj.lora(rank=4, targets=r".*/kernel").init(jax.random.key(0), params)
    s = lrj.trainable_summary(params, lp)
    assert s["trainable_params"] == 4 * 150
    assert s["all_params"] == 5050 + 600
    assert s["text"] == "trainable params: 600 || all params: 5,650 || trainable%: 10.6195"


# ---- bad input: every error names the offending value or path ----

PARAMS = {"params": {"layer": {"kernel": jnp.ones((8, 4)), "bias": jnp.ones(4)}, "steps": jnp.ones((4, 4), jnp.int32)}}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=0), "`rank` must be a positive integer, got 0"),
        (dict(rank=-3), "`rank` must be a positive integer, got -3"),
        (dict(rank=2.5), "`rank` must be a positive integer, got 2.5"),
        (dict(alpha=0.0), "`alpha` must be a positive number, got 0.0"),
        (dict(alpha=-1), "`alpha` must be a positive number, got -1"),
        (dict(dropout=1.0), r"`dropout` must be in \[0, 1\), got 1.0"),
        (dict(dropout=-0.1), r"`dropout` must be in \[0, 1\), got -0.1"),
        (dict(init="xavier"), "`init` must be one of .*'kaiming'.*got 'xavier'"),
        (dict(rank_pattern={"x": 0}), r"`rank_pattern\['x'\]` must be a positive integer, got 0"),
        (dict(alpha_pattern={"x": -2.0}), r"`alpha_pattern\['x'\]` must be a positive number, got -2.0"),
    ],
)
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lrj.lora(**kwargs)


def test_targets_matching_nothing_lists_existing_paths():
    with pytest.raises(ValueError, match=r"matched no parameter; paths in params include: 'params/layer/bias', 'params/layer/kernel'"):
        lrj.lora(targets=r".*/q_proj/kernel").init(jax.random.key(0), PARAMS)


def test_invalid_regex_target():
    with pytest.raises(ValueError, match=r"pattern '\(unclosed' is not a valid regex"):
        lrj.lora(targets="(unclosed").init(jax.random.key(0), PARAMS)


def test_bad_targets_type():
    with pytest.raises(TypeError, match="`targets` must be a regex string"):
        lrj.lora(targets=3).init(jax.random.key(0), PARAMS)


def test_rank_above_matrix_size_names_path():
    with pytest.raises(ValueError, match=r"rank 5 for 'params/layer/kernel' exceeds min\(in, out\) = min\(8, 4\)"):
        lrj.lora(rank=5, targets=r".*/layer/kernel").init(jax.random.key(0), PARAMS)


def test_non_floating_target_names_path():
    with pytest.raises(TypeError, match=r"target 'params/steps' must be a floating-point array, got .* int32"):
        lrj.lora(rank=1, targets=r"params/steps").init(jax.random.key(0), PARAMS)


def test_nd_kernel_without_layout_says_how_to_give_one():
    params = {"params": {"attn": {"kernel": jnp.ones((8, 2, 4))}}}
    with pytest.raises(ValueError, match=r"target 'params/attn/kernel' has shape \(8, 2, 4\).*kernel_layouts"):
        lrj.lora(rank=2, targets=".*").init(jax.random.key(0), params)


def test_adapter_from_another_model_is_refused():
    adapter = lrj.lora(rank=2, targets=r".*/kernel")
    lp = adapter.init(jax.random.key(0), {"params": {"layer": {"kernel": jnp.ones((16, 4))}}})
    with pytest.raises(ValueError, match=r"adapter leaves for 'params/layer/kernel' do not fit the parameter: kernel \(8, 4\), a \(16, 2\)"):
        adapter.merge(PARAMS, lp)
    other = {"params": {"other": {"kernel": {"a": jnp.ones((8, 2)), "b": jnp.ones((2, 4))}}}}
    with pytest.raises(ValueError, match=r"adapter target 'params/other/kernel' is not a parameter of this model"):
        adapter.merge(PARAMS, other)
