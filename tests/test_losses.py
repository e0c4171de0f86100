"""The chunked head loss and the factored LoRA VJP equal the plain computations (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lrj
from lowrank_jax import finetune, losses
from lowrank_jax.factored import lora_linear
from lowrank_jax.models.llama import LlamaConfig, LlamaForCausalLM


def _data(v=50, d=16, shape=(3, 7), seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    h = jax.random.normal(k[0], (*shape, d))
    e = jax.random.normal(k[1], (v, d))
    t = jax.random.randint(k[2], shape, 0, v)
    m = (jax.random.uniform(k[3], shape) > 0.3).astype(jnp.float32)
    return h, e, t, m


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunk", [1, 4, 5, 21, 512])
@pytest.mark.parametrize("masked", [True, False])
def test_lm_cross_entropy_equals_plain(tied, chunk, masked):
    h, e, t, m = _data()
    w = e if tied else e.T
    mask = m if masked else None

    def plain(h, w):
        return finetune.cross_entropy(h @ (w.T if tied else w), t, mask)

    def fused(h, w):
        return losses.lm_cross_entropy(h, w, t, mask, tied=tied, chunk_size=chunk)

    want, (gh_want, gw_want) = jax.value_and_grad(plain, (0, 1))(h, w)
    got, (gh, gw) = jax.jit(jax.value_and_grad(fused, (0, 1)))(h, w)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gh, gh_want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gw, gw_want, rtol=1e-5, atol=1e-7)
    # the hidden states alone (the weight frozen, as under LoRA): the same gradient
    np.testing.assert_allclose(jax.grad(fused)(h, w), gh_want, rtol=1e-5, atol=1e-7)


def test_lm_cross_entropy_second_order_free_of_cotangent_scale():
    h, e, t, _ = _data(seed=3)
    g_plain = jax.grad(lambda h: 2.5 * finetune.cross_entropy(h @ e.T, t))(h)
    g_fused = jax.grad(lambda h: 2.5 * losses.lm_cross_entropy(h, e, t, chunk_size=8))(h)
    np.testing.assert_allclose(g_fused, g_plain, rtol=1e-5, atol=1e-7)


def test_lm_cross_entropy_refuses_bad_shapes():
    h, e, t, _ = _data()
    with pytest.raises(ValueError, match="without its last axis"):
        losses.lm_cross_entropy(h, e, t[:, :3])
    with pytest.raises(ValueError, match=r"\[D, V\] head"):
        losses.lm_cross_entropy(h, e, t, tied=False)
    with pytest.raises(ValueError, match="chunk_size"):
        losses.lm_cross_entropy(h, e, t, chunk_size=0)


@pytest.mark.parametrize("wrt", [(0, 1, 2), (1, 2), (2,), (0,)])
def test_lora_linear_equals_autodiff(wrt):
    k = jax.random.split(jax.random.key(1), 4)
    x, a = jax.random.normal(k[0], (2, 5, 6)), jax.random.normal(k[1], (6, 3))
    b, g = jax.random.normal(k[2], (3, 4)), jax.random.normal(k[3], (2, 5, 4))

    def ours(x, a, b):
        return jnp.sum(jnp.sin(lora_linear(x, a, b, 0.7)) * g)

    def plain(x, a, b):
        return jnp.sum(jnp.sin(((x @ a) * 0.7) @ b) * g)

    np.testing.assert_allclose(ours(x, a, b), plain(x, a, b), rtol=1e-6)
    for got, want in zip(jax.jit(jax.grad(ours, wrt))(x, a, b), jax.grad(plain, wrt)(x, a, b)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _tiny(tie=True):
    config = LlamaConfig.tiny(scan_layers=True, tie_word_embeddings=tie)
    model = LlamaForCausalLM(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    batch = jax.random.randint(jax.random.key(5), (2, 9), 0, config.vocab_size, jnp.int32)
    return config, model, params, batch


def test_hidden_output_times_head_is_the_logits():
    for tie in (True, False):
        config, model, params, batch = _tiny(tie)
        hidden = model.clone(output="hidden").apply({"params": params}, batch[:, :-1])
        w, tied = losses.head_weight(params, config)
        logits = hidden @ (w.T if tied else w)
        np.testing.assert_allclose(logits, model.apply({"params": params}, batch[:, :-1]), rtol=1e-5, atol=1e-5)
        assert tied is tie


def test_fused_head_applies_only_without_a_head_adapter():
    config, model, params, _ = _tiny()
    layouts = lrj.linen.kernel_layouts(model, jnp.zeros((1, 8), jnp.int32))
    on_qv = lrj.lora(rank=2, alpha=4.0, targets=r".*/(q_proj|v_proj)/kernel", layouts=layouts)
    on_embed = lrj.lora(rank=2, alpha=4.0, targets=r"embed_tokens/embedding", layouts=layouts)
    qv_params = on_qv.init(jax.random.key(1), params)
    embed_params = on_embed.init(jax.random.key(1), params)
    assert losses.fused_head_applies(qv_params, {"params": params}, config) is True
    assert losses.fused_head_applies(embed_params, {"params": params}, config) is False
    assert losses.fused_head_applies(None, {"params": params}, config) is True


@pytest.mark.parametrize("targets", ["all-linear", "q_proj,v_proj"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_main_job_loss_is_the_plain_loss(targets, method):
    """The main job's recipe: the chunked head loss and the factored VJP against the model's logits, B != 0."""
    _, model, params, batch = _tiny()
    grads, values = [], []
    for plain in (True, False):
        cfg = finetune.FinetuneConfig(method=method, targets=targets, rank=2, alpha=4.0, dropout=0.0, steps=3,
                                      plain_loss=plain)
        cfg.validate()
        recipe = finetune.RECIPES[method](cfg, model, params)
        trainable = jax.tree.map(lambda x: x + 0.01 * jnp.cos(jnp.arange(x.size).reshape(x.shape)),
                                 recipe.trainable)  # B != 0: the adapter changes the logits
        value, grad = jax.jit(jax.value_and_grad(recipe.loss_fn))(trainable, recipe.frozen, batch, jax.random.key(0))
        values.append(value)
        grads.append(grad)
    np.testing.assert_allclose(values[1], values[0], rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[0])):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


def test_main_job_with_an_embedding_adapter_falls_back_to_the_logits():
    """LoRA on the tied embedding: the loss goes through the model's own logits, the head's gradient included."""
    _, model, params, batch = _tiny()
    cfg = finetune.FinetuneConfig(method="lora", targets=r".*embed_tokens/embedding", rank=2, alpha=4.0,
                                  dropout=0.0, steps=3)
    cfg.validate()
    recipe = finetune.RECIPES["lora"](cfg, model, params)
    assert losses.fused_head_applies(recipe.trainable, recipe.frozen, model.config) is False
    trainable = jax.tree.map(lambda x: x + 0.01, recipe.trainable)

    def plain(tr):
        logits = lrj.linen.apply(model, recipe.adapter, recipe.frozen, tr, batch[:, :-1])
        return finetune.cross_entropy(logits, batch[:, 1:])

    want, g_want = jax.value_and_grad(plain)(trainable)
    got, g_got = jax.value_and_grad(recipe.loss_fn)(trainable, recipe.frozen, batch, jax.random.key(0))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
