"""LoRA-GA: the averaged gradient, parity with the official formulas and with peft's variant, its defining property."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lrj

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
LAYERS = ("fc1", "fc2")


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURES / "lora_ga.npz", allow_pickle=False))


def mlp_params(ref):
    """The fixture's torch MLP as a Flax-orientation params tree."""
    return {"params": {n: {"kernel": jnp.asarray(ref[f"state_{n}_weight"].T), "bias": jnp.asarray(ref[f"state_{n}_bias"])} for n in LAYERS}}


def mlp_loss(params, batch):
    x, y = batch
    p = params["params"]
    h = jnp.tanh(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    return jnp.mean((h @ p["fc2"]["kernel"] + p["fc2"]["bias"] - y) ** 2)


@pytest.fixture(scope="module")
def grads(ref):
    return lrj.average_gradient(mlp_loss, mlp_params(ref), list(zip(ref["xs"], ref["ys"])), targets=".*/kernel")


def lora_ga_init(ref, grads, **options):
    adapter = lrj.lora(rank=int(ref["rank"]), alpha=float(ref["alpha"]), targets=".*/kernel", init="lora_ga",
                       lora_ga=lrj.LoraGA(**options))
    params = mlp_params(ref)
    lp, residual = lrj.init_with_residual(adapter, jax.random.key(0), params, grads=grads)
    return adapter, params, lp, residual


def test_average_gradient_equals_torchs_accumulated_mean(ref, grads):
    assert set(grads["params"]) == set(LAYERS) and set(grads["params"]["fc1"]) == {"kernel"}  # targets only
    for n in LAYERS:
        np.testing.assert_allclose(grads["params"][n]["kernel"], ref[f"grad_{n}"].T, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("config", ["ArB2r_stable", "A2rBr_gd", "ArBr_weightS", "ArB2r_unit"])
def test_equals_the_official_lora_ga(ref, grads, config):
    direction, scale = config.split("_", 1)
    _, _, lp, residual = lora_ga_init(ref, grads, direction=direction, scale=scale, niter=None)
    for n in LAYERS:
        leaves = lp["params"][n]["kernel"]
        np.testing.assert_allclose(leaves["a"], ref[f"official_{config}_{n}_A"].T, atol=2e-6)
        np.testing.assert_allclose(leaves["b"], ref[f"official_{config}_{n}_B"].T, atol=2e-6)
        np.testing.assert_allclose(residual["params"][n]["kernel"], ref[f"official_{config}_{n}_W"].T, atol=2e-6)


def test_randomized_svd_default_equals_exact_when_probes_span_the_gradient(ref, grads):
    # min(4r, in, out) = min(in, out) for both layers here, so niter=4 sees the whole range
    _, _, exact, _ = lora_ga_init(ref, grads, niter=None)
    _, _, fast, _ = lora_ga_init(ref, grads)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), exact, fast)


@pytest.mark.parametrize("config", ["ArB2r_stable", "ArBr_gd_scale"])
def test_peft_convention_equals_peft_up_to_singular_vector_signs(ref, grads, config):
    direction, scale = config.split("_", 1)
    adapter, params, lp, residual = lora_ga_init(ref, grads, direction=direction, scale=scale, niter=None, convention="peft")
    s = float(ref["alpha"]) / int(ref["rank"])
    for n in LAYERS:
        a, b = np.asarray(lp["params"][n]["kernel"]["a"]), np.asarray(lp["params"][n]["kernel"]["b"])
        a_ref, b_ref = ref[f"peft_{config}_{n}_A"].T, ref[f"peft_{config}_{n}_B"].T
        sign_a = np.sign(np.sum(a * a_ref, axis=0))  # peft keeps svd_lowrank's signs
        sign_b = np.sign(np.sum(b * b_ref, axis=1))
        np.testing.assert_allclose(a * sign_a, a_ref, atol=2e-5)
        np.testing.assert_allclose(b * sign_b[:, None], b_ref, atol=2e-5)
        w = params["params"][n]["kernel"]
        np.testing.assert_allclose(w - s * (a * sign_a) @ (b * sign_b[:, None]), ref[f"peft_{config}_{n}_W"].T, atol=2e-5)


def test_official_and_peft_defaults_differ_as_documented(ref, grads):
    """peft scales b by sigma[r:2r] and by out^(1/4)/sqrt(gamma) once; the official scales a and b each."""
    _, _, official, _ = lora_ga_init(ref, grads, niter=None)
    _, _, peft, _ = lora_ga_init(ref, grads, niter=None, convention="peft")
    r = int(ref["rank"])
    for n in LAYERS:
        g = np.asarray(grads["params"][n]["kernel"], np.float64)
        n_out = g.shape[1]
        sigma = np.linalg.svd(g, compute_uv=False)[r : 2 * r]
        o, p = official["params"][n]["kernel"], peft["params"][n]["kernel"]
        stable = n_out**0.25 / 4.0
        np.testing.assert_allclose(p["a"] * stable, o["a"], atol=1e-6)
        np.testing.assert_allclose(p["b"], o["b"] * sigma[:, None], rtol=1e-4, atol=1e-7)


def test_first_step_follows_the_gradients_top_singular_directions(ref, grads):
    """The LoRA-GA claim: with ArB2r the first LoRA update ``s(dA B + A dB)`` lies in the span of G's top 2r
    singular directions, and is nearly parallel to the rank-2r truncation of G (LoRA-GA's Theorem)."""
    adapter, params, lp, residual = lora_ga_init(ref, grads, niter=None)
    batches = list(zip(ref["xs"], ref["ys"]))
    r = int(ref["rank"])
    s = float(ref["alpha"]) / r

    def loss(lp_):
        merged = adapter.merge(residual, lp_)
        return jnp.mean(jnp.stack([mlp_loss(merged, b) for b in batches]))

    g_lora = jax.grad(loss)(lp)
    np.testing.assert_allclose(loss(lp), np.mean([mlp_loss(params, b) for b in batches]), rtol=1e-6)  # starts at the base
    for n in LAYERS:
        a, b = lp["params"][n]["kernel"]["a"], lp["params"][n]["kernel"]["b"]
        da, db = g_lora["params"][n]["kernel"]["a"], g_lora["params"][n]["kernel"]["b"]
        step = np.asarray(s * (da @ b + a @ db), np.float64)
        g = np.asarray(grads["params"][n]["kernel"], np.float64)
        u, sv, vh = np.linalg.svd(g, full_matrices=False)
        in_span = u[:, : 2 * r] @ (u[:, : 2 * r].T @ step @ vh[: 2 * r].T) @ vh[: 2 * r]
        np.testing.assert_allclose(step, in_span, atol=1e-6 * np.abs(step).max())
        g2r = (u[:, : 2 * r] * sv[: 2 * r]) @ vh[: 2 * r]
        cosine = np.sum(step * g2r) / np.linalg.norm(step) / np.linalg.norm(g2r)
        assert cosine > 0.9, cosine


def test_lora_ga_on_scanned_stacks_is_per_layer(ref, grads):
    w = jnp.stack([mlp_params(ref)["params"]["fc1"]["kernel"]] * 2)
    g = jnp.stack([grads["params"]["fc1"]["kernel"], 2.0 * grads["params"]["fc1"]["kernel"]])
    adapter = lrj.lora(rank=4, alpha=8.0, targets=".*", init="lora_ga", lora_ga=lrj.LoraGA(niter=None),
                       layouts={"params/kernel": lrj.Layout(stack=1, inputs=1)})
    lp = adapter.init(jax.random.key(0), {"params": {"kernel": w}}, grads={"params": {"kernel": g}})
    single = lora_ga_init(ref, grads, niter=None)[2]["params"]["fc1"]["kernel"]
    for i in range(2):  # scaling G does not change its singular vectors
        np.testing.assert_allclose(lp["params"]["kernel"]["a"][i], single["a"], atol=1e-6)
        np.testing.assert_allclose(lp["params"]["kernel"]["b"][i], single["b"], atol=1e-6)


def test_lora_ga_errors(ref, grads):
    params = mlp_params(ref)
    adapter = lrj.lora(rank=4, targets=".*/kernel", init="lora_ga")
    with pytest.raises(ValueError, match="needs the averaged gradient"):
        adapter.init(jax.random.key(0), params)
    with pytest.raises(ValueError, match="only used by init='lora_ga'"):
        lrj.lora(rank=4, targets=".*/kernel").init(jax.random.key(0), params, grads=grads)
    with pytest.raises(ValueError, match="2r = 12"):
        lrj.lora(rank=6, targets=".*/kernel", init="lora_ga").init(jax.random.key(0), params, grads=grads)
    with pytest.raises(ValueError, match="no gradient of shape"):
        adapter.init(jax.random.key(0), params, grads={"params": {"fc1": grads["params"]["fc1"]}})
    bad = jax.tree.map(lambda g: g.at[0, 0].set(jnp.nan), grads)
    with pytest.raises(ValueError, match="`gradient at params/fc1/kernel` has 1 NaN"):
        adapter.init(jax.random.key(0), params, grads=bad)
    with pytest.raises(ValueError, match="direction"):
        lrj.lora(init="lora_ga", lora_ga=lrj.LoraGA(direction="random"))
    with pytest.raises(ValueError, match="under the 'official' convention"):
        lrj.lora(init="lora_ga", lora_ga=lrj.LoraGA(scale="gd_scale"))
    with pytest.raises(ValueError, match="for init='lora_ga'"):
        lrj.lora(init="pissa", lora_ga=lrj.LoraGA())
    with pytest.raises(ValueError, match="empty"):
        lrj.average_gradient(mlp_loss, params, [])
