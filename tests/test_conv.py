"""Conv LoRA (linen nn.Conv, NNX nnx.Conv) equals peft's Conv2d LoRA on recorded outputs.

peft 0.21.2 builds ``lora_A`` without the base layer's dilation, so its forward fails on a
dilated conv (``k3s2d2/forward_error`` in the fixture); lowrank_jax keeps the layer's window
for ``a``, and the dilated case is checked against peft's merged layer, the function a
dilation-keeping forward computes (see tests/fixtures/make_peft_conv.py).
"""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowrank_jax as lrj

FIXTURE = np.load(pathlib.Path(__file__).parent / "fixtures" / "peft_conv.npz", allow_pickle=False)
CASES = {"k3s1p1": dict(alpha=4.0, rank=2, rslora=False), "k3s2d2": dict(alpha=6.0, rank=3, rslora=True),
         "k1": dict(alpha=2.0, rank=2, rslora=False)}


def _case(name):
    f = {k.split("/", 1)[1]: FIXTURE[k] for k in FIXTURE.files if k.startswith(name + "/")}
    weight = f["weight"]  # OIHW
    out_ch, in_ch, kh, kw = weight.shape
    pad = [int(p) for p in f["padding"]]
    conv = dict(features=out_ch, kernel_size=(kh, kw), strides=tuple(int(s) for s in f["stride"]),
                padding=[(pad[0], pad[0]), (pad[1], pad[1])], kernel_dilation=tuple(int(d) for d in f["dilation"]),
                use_bias="bias" in f)
    params = {"kernel": jnp.asarray(weight.transpose(2, 3, 1, 0))}
    if "bias" in f:
        params["bias"] = jnp.asarray(f["bias"])
    lp = {"a": jnp.asarray(f["lora_A"].transpose(2, 3, 1, 0)), "b": jnp.asarray(f["lora_B"][:, :, 0, 0].T)}
    x = jnp.asarray(f["x"].transpose(0, 2, 3, 1))
    y = f["y"] if "y" in f else f["y_merged"]
    return conv, params, lp, x, y.transpose(0, 2, 3, 1), f["merged_weight"].transpose(2, 3, 1, 0), f


class Net(nn.Module):
    conv: dict

    @nn.compact
    def __call__(self, x):
        return nn.Conv(name="conv", **self.conv)(x)


@pytest.mark.parametrize("name", list(CASES))
def test_linen_conv_lora_equals_peft(name):
    conv, params, leaves, x, y_ref, merged_ref, f = _case(name)
    model = Net(conv)
    variables = {"params": {"conv": params}}
    layouts = lrj.linen.kernel_layouts(model, x)
    assert layouts["params/conv/kernel"] == lrj.Layout(0, 3)
    adapter = lrj.lora(targets=r".*conv/kernel", layouts=layouts, **CASES[name])
    shapes = jax.tree.map(jnp.shape, adapter.init(jax.random.key(0), variables))
    assert shapes == {"params": {"conv": {"kernel": {"a": leaves["a"].shape, "b": leaves["b"].shape}}}}
    lp = {"params": {"conv": {"kernel": leaves}}}
    out = lrj.linen.apply(model, adapter, variables, lp, x)
    np.testing.assert_allclose(out, y_ref, atol=2e-5, rtol=1e-5)
    merged = adapter.merge(variables, lp)
    np.testing.assert_allclose(merged["params"]["conv"]["kernel"], merged_ref, atol=1e-6)
    np.testing.assert_allclose(model.apply(merged, x), out, atol=2e-5)
    base_out = model.apply(variables, x)
    assert float(jnp.max(jnp.abs(out - base_out))) > 0.5  # the adapter's term is not vacuous
    unmerged = adapter.unmerge(merged, lp)
    np.testing.assert_allclose(unmerged["params"]["conv"]["kernel"], params["kernel"], atol=1e-6)
    if name == "k3s2d2":
        assert "size of tensor a (2) must match" in str(f["forward_error"])


@pytest.mark.parametrize("name", ["k3s1p1", "k3s2d2"])
def test_nnx_conv_lora_equals_peft(name):
    conv, params, leaves, x, y_ref, _, _ = _case(name)
    model = nnx.Conv(params["kernel"].shape[2], conv["features"], conv["kernel_size"], conv["strides"],
                     padding=conv["padding"], kernel_dilation=conv["kernel_dilation"], use_bias=conv["use_bias"],
                     rngs=nnx.Rngs(0))
    model.kernel[...] = params["kernel"]
    if conv["use_bias"]:
        model.bias[...] = params["bias"]
    layouts = lrj.nnx.kernel_layouts(model)
    assert layouts == {"kernel": lrj.Layout(0, 3)}
    adapter = lrj.lora(targets=r"kernel", layouts=layouts, **CASES[name])
    assert jax.tree.map(jnp.shape, adapter.init(jax.random.key(0), lrj.nnx.params(model))) == {
        "kernel": {"a": leaves["a"].shape, "b": leaves["b"].shape}}
    out = lrj.nnx.apply(model, adapter, {"kernel": leaves}, x)
    np.testing.assert_allclose(out, y_ref, atol=2e-5, rtol=1e-5)


def test_conv_init_matches_peft_kaiming_bound():
    fan_in = int(FIXTURE["init/fan_in"])  # 8 * 3 * 3
    model = Net(dict(features=16, kernel_size=(3, 3)))  # peft allows r > out; lowrank_jax refuses it
    x = jnp.ones((1, 5, 5, 8))
    variables = model.init(jax.random.key(0), x)
    adapter = lrj.lora(rank=16, targets=r".*kernel", layouts=lrj.linen.kernel_layouts(model, x))
    lp = adapter.init(jax.random.key(1), variables)["params"]["conv"]["kernel"]
    bound = 1.0 / np.sqrt(fan_in)
    peft_a = FIXTURE["init/lora_A"]
    assert float(np.max(np.abs(peft_a))) <= bound
    assert float(jnp.max(jnp.abs(lp["a"]))) <= bound
    # U(-b, b) has standard deviation b / sqrt(3): both inits agree in spread
    np.testing.assert_allclose(np.std(peft_a), bound / np.sqrt(3), rtol=0.08)
    np.testing.assert_allclose(float(jnp.std(lp["a"])), bound / np.sqrt(3), rtol=0.08)
    np.testing.assert_array_equal(lp["b"], np.zeros((16, 16)))
    np.testing.assert_array_equal(FIXTURE["init/lora_B"], 0.0)


def test_conv_gradients_flow_to_both_factors_and_match_merged():
    conv, params, leaves, x, _, _, _ = _case("k3s1p1")
    model = Net(conv)
    variables = {"params": {"conv": params}}
    adapter = lrj.lora(targets=r".*conv/kernel", layouts=lrj.linen.kernel_layouts(model, x), **CASES["k3s1p1"])

    def factored(lp):
        return jnp.sum(jnp.sin(lrj.linen.apply(model, adapter, variables, {"params": {"conv": {"kernel": lp}}}, x)))

    def merged(lp):
        return jnp.sum(jnp.sin(model.apply(adapter.merge(variables, {"params": {"conv": {"kernel": lp}}}), x)))

    g1, g2 = jax.grad(factored)(leaves), jax.grad(merged)(leaves)
    for n in ("a", "b"):
        np.testing.assert_allclose(g1[n], g2[n], atol=1e-4, rtol=1e-4)
        assert float(jnp.max(jnp.abs(g1[n]))) > 1e-3


def test_dora_on_conv_is_refused_with_its_path():
    conv, params, leaves, x, _, _, _ = _case("k1")
    model = Net(conv)
    variables = {"params": {"conv": params}}
    adapter = lrj.dora(targets=r".*conv/kernel", layouts=lrj.linen.kernel_layouts(model, x), rank=2)
    lp = adapter.init(jax.random.key(0), variables)
    with pytest.raises(NotImplementedError, match=r"params/conv/kernel"):
        lrj.linen.apply(model, adapter, variables, lp, x)
