"""LongLoRA on the reference LLaMA model: configs (S2-Attn in training, full attention at inference, RoPE
interpolation), the trainable set (LoRA q/k/v/o + embeddings + norms), and the evaluation helpers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_jax as lrj
from lowrank_jax import longlora
from lowrank_jax import tree as tree_lib
from lowrank_jax.attention import S2Attention
from lowrank_jax.models import llama
from lowrank_jax.models.llama import LlamaConfig, LlamaForCausalLM

@pytest.fixture(autouse=True, scope="module")
def fast_compile():
    """These tests compile many small programs; XLA's optimisation passes would take most of their time
    (about 2x), so they compile without them (``jax_disable_most_optimizations``; same numbers up to float
    rounding). The setting is restored afterwards."""
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", old)


T = 32  # training length of the tiny model; G = T/4 = 8


class CharTokenizer:
    """ASCII characters as token ids (vocabulary 128 = LlamaConfig.tiny's), BOS = 1."""

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i == 10 or 32 <= i < 128)


@pytest.fixture(scope="module")
def tiny():
    # scanned blocks: the layout `lowrank-jax finetune` loads SmolLM2 in
    base = LlamaConfig.tiny(max_position_embeddings=16, scan_layers=True)
    train_config, eval_config = longlora.configure(base, T)
    ids = jax.random.randint(jax.random.key(0), (2, T + 1), 0, 128, jnp.int32)
    variables = jax.jit(LlamaForCausalLM(eval_config).init)(jax.random.key(1), ids[:, :-1])
    return train_config, eval_config, variables, ids


def test_configure_interpolates_positions_and_puts_s2_in_training_only():
    base = LlamaConfig.tiny(max_position_embeddings=64)
    train, evaluate = longlora.configure(base, 256)
    assert train.rope_scaling_factor == evaluate.rope_scaling_factor == 4.0        # ceil(256 / 64)
    assert train.max_position_embeddings == evaluate.max_position_embeddings == 256
    assert train.attention_fn == S2Attention(group_size_ratio=0.25, variant="no_wrap") and evaluate.attention_fn is None
    assert evaluate == base.replace(rope_scaling_factor=4.0, max_position_embeddings=256)
    assert longlora.configure(base, 256) == (train, evaluate)                        # equal configs: jit cache hits
    assert longlora.configure(base, 100)[1].rope_scaling_factor == 2.0               # ceil(100 / 64)
    assert longlora.configure(base, 32)[1].rope_scaling_factor == 1.0                # fits: no scaling
    assert longlora.configure(evaluate, 1024)[1].rope_scaling_factor == 16.0        # extends an extended config
    assert longlora.configure(base, 256, original_len=32)[1].rope_scaling_factor == 8.0
    roll = longlora.configure(base, 256, group_size=32, variant="roll")[0].attention_fn
    assert roll == S2Attention(group_size=32, variant="roll")
    with pytest.raises(ValueError, match="already uses S2-Attn"):
        longlora.configure(train, 512)
    with pytest.raises(ValueError, match="`target_len` must be a positive integer"):
        longlora.configure(base, 0)


def test_s2_attention_in_the_train_model_full_attention_in_the_eval_model(tiny):
    train_config, eval_config, variables, ids = tiny
    x = ids[:, :-1]

    @jax.jit
    def logits(variables, x):
        full = LlamaForCausalLM(eval_config).apply(variables, x)
        s2 = LlamaForCausalLM(train_config).apply(variables, x)
        # the padding path: the model passes a causal (B1TS) mask to attention_fn
        s2_masked = LlamaForCausalLM(train_config).apply(variables, x, attention_mask=jnp.ones_like(x))
        return full, s2, s2_masked

    full, s2, s2_masked = logits(variables, x)
    # the first G/2 = 4 tokens see the same keys under S2-Attn (no_wrap) and full attention; later ones do not
    np.testing.assert_allclose(s2[:, :4], full[:, :4], atol=1e-5)
    assert np.abs(np.asarray(s2[:, 8:] - full[:, 8:])).max() > 1e-4
    np.testing.assert_allclose(s2_masked, s2, atol=1e-5)


def test_recipe_train_step_changes_exactly_lora_embeddings_and_norms(tiny):
    train_config, _, variables, ids = tiny
    model = LlamaForCausalLM(train_config)
    adapter = longlora.recipe(layouts=lrj.linen.kernel_layouts(model, ids[:, :-1]))
    lora_config = adapter.config["components"][0]
    assert (lora_config["rank"], lora_config["alpha"]) == (8, 16.0)
    trainable = adapter.init(jax.random.key(2), variables)
    frozen_copy = jax.tree.map(np.array, variables)

    def loss_fn(trainable, variables, batch, rng):
        logits = lrj.linen.apply(model, adapter, variables, trainable, batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch[:, 1:]).mean()

    optimizer = optax.adam(1e-2)
    step = jax.jit(lrj.make_train_step(loss_fn, optimizer, adapter=adapter))
    new, _, metrics = step(trainable, optimizer.init(trainable), variables, ids, jax.random.key(3))
    assert np.isfinite(float(metrics["loss"]))

    before = {p: np.asarray(x) for _, p, x in tree_lib.flatten_with_paths(variables)}
    after = {p: np.asarray(x) for _, p, x in tree_lib.flatten_with_paths(adapter.merge(variables, new))}
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    extra_paths = {"params/embed_tokens/embedding", "params/norm/scale", "params/layers/input_layernorm/scale",
                   "params/layers/post_attention_layernorm/scale"}
    lora_paths = {f"params/layers/self_attn/{n}/kernel" for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert changed == extra_paths | lora_paths
    for path in sorted(p for p in changed if p.startswith("params/layers/")):  # every layer of a stacked leaf moved
        assert all(not np.array_equal(b, a) for b, a in zip(before[path], after[path])), path
    # the trained base leaves are copies under "w"; every one and every b moved (a has zero gradient
    # at step 0 because b = 0), and the frozen variables were not touched
    whole = {p.removesuffix("/w") for _, p, _ in tree_lib.flatten_with_paths(trainable) if p.endswith("/w")}
    assert whole == extra_paths
    assert trainable["params"]["layers"]["self_attn"]["q_proj"]["kernel"]["a"].shape == (2, 64, 8)
    for (_, p, old), (_, _, x) in zip(tree_lib.flatten_with_paths(trainable), tree_lib.flatten_with_paths(new)):
        assert np.array_equal(old, x) == p.endswith("/a"), p
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, variables), frozen_copy)
    copied = trainable["params"]["embed_tokens"]["embedding"]["w"]
    assert copied is not variables["params"]["embed_tokens"]["embedding"]
    np.testing.assert_array_equal(copied, variables["params"]["embed_tokens"]["embedding"])


def test_recipe_paths_without_scan_and_errors():
    config = LlamaConfig.tiny()
    model = LlamaForCausalLM(config)
    ids = jnp.zeros((1, 8), jnp.int32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), ids)
    tree = jax.eval_shape(longlora.recipe().init, jax.random.key(1), abstract)
    layers = range(config.num_hidden_layers)
    paths = {p for _, p, _ in tree_lib.flatten_with_paths(tree)}
    assert {p.removesuffix("/w") for p in paths if p.endswith("/w")} == (
        {"params/embed_tokens/embedding", "params/norm/scale"}
        | {f"params/layers_{i}/{n}/scale" for i in layers for n in ("input_layernorm", "post_attention_layernorm")})
    assert {p.rsplit("/", 1)[0] for p in paths if not p.endswith("/w")} == {
        f"params/layers_{i}/self_attn/{n}/kernel" for i in layers for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    with pytest.raises(ValueError, match="matched no parameter"):
        longlora.recipe(trainable=r".*/nothing").init(jax.random.key(0), abstract)
    with pytest.raises(ValueError, match="'params/embed_tokens/embedding' is targeted by both 'lora' and 'full_finetune'"):
        longlora.recipe(targets=r".*embed_tokens/embedding").init(jax.random.key(0), abstract)


def test_passkey_prompt():
    tok = CharTokenizer()
    p = longlora.passkey_prompt(tok, 600, seed=3)
    assert p.ids.shape == (600,) and p.ids.dtype == np.int32 and 1 <= p.passkey < 50000
    text = tok.decode(p.ids)
    assert text.startswith("There is an important info hidden inside a lot of irrelevant text.")
    assert text.endswith("\nWhat is the pass key? The pass key is")
    assert f"\nThe pass key is {p.passkey}. Remember it. {p.passkey} is the pass key.\n" in text
    assert "The grass is green. The sky is blue." in text
    assert tok.decode(p.ids[p.key_position:]).startswith(f"\nThe pass key is {p.passkey}.")
    again = longlora.passkey_prompt(tok, 600, seed=3)
    np.testing.assert_array_equal(again.ids, p.ids)
    assert longlora.passkey_prompt(tok, 600, seed=4).passkey != p.passkey
    first = longlora.passkey_prompt(tok, 400, passkey=42, depth=0.0)
    last = longlora.passkey_prompt(tok, 400, passkey=42, depth=1.0)
    assert tok.decode(first.ids).split("\n")[1:3] == ["", "The pass key is 42. Remember it. 42 is the pass key."]
    assert tok.decode(last.ids).split("\n")[-2] == ""  # the key line is followed directly by the question
    assert tok.decode(last.ids).split("\n")[-3].startswith("The pass key is 42.")
    with pytest.raises(ValueError, match="too short"):
        longlora.passkey_prompt(tok, 100)
    with pytest.raises(ValueError, match="depth"):
        longlora.passkey_prompt(tok, 600, depth=1.5)


def test_passkey_retrieval_scores_the_generated_number(tiny):
    _, eval_config, variables, _ = tiny
    tok = CharTokenizer()
    model = LlamaForCausalLM(eval_config)
    prompt = longlora.passkey_prompt(tok, 300, passkey=31337)

    def answers(text):
        return lambda model, params, prompts, max_new_tokens: np.asarray([tok.encode(text, False)[:max_new_tokens]])

    right = longlora.passkey_retrieval(model, variables["params"], tok, prompt, generate=answers(" 31337. "))
    assert right == longlora.PasskeyResult(True, 31337, 31337, " 31337. ", 300)
    wrong = longlora.passkey_retrieval(model, variables["params"], tok, prompt, generate=answers(" 3133 7"))
    assert not wrong.correct and wrong.predicted == 3133
    none = longlora.passkey_retrieval(model, variables["params"], tok, prompt, generate=answers(" blue"))
    assert not none.correct and none.predicted is None
    calls = []

    def recorded(model, params, prompts, max_new_tokens):  # answers right for every other prompt
        calls.append(len(prompts[0]))
        key = longlora.passkey_prompt(tok, len(prompts[0]), seed=(len(calls) - 1) % 2).passkey
        return np.asarray([tok.encode(f" {key if len(calls) % 2 else 7}", False)])

    acc = longlora.passkey_accuracy(model, variables["params"], tok, [260, 300], num_tests=2, generate=recorded)
    assert acc == {260: 0.5, 300: 0.5} and calls == [260, 260, 300, 300]
    # end to end with the tiny model's greedy decoding (an untrained model: only the plumbing is checked)
    real = longlora.passkey_retrieval(model, variables["params"], tok, prompt)
    assert real.length == 300 and real.correct == (real.predicted == 31337)
    expected = llama.generate(model, variables["params"], [prompt.ids.tolist()], max_new_tokens=8)
    assert real.text == tok.decode(expected[0].tolist())


def test_perplexity_at_the_target_length(tiny):
    _, eval_config, variables, ids = tiny
    model = LlamaForCausalLM(eval_config)
    tokens = np.asarray(ids).ravel()[: 2 * T]
    ppl = longlora.perplexity(model, variables["params"], tokens, T)
    assert ppl == llama.perplexity(model, variables["params"], tokens, window=T, batch_size=1)
    assert 1.0 < ppl < 1000.0
    with pytest.raises(ValueError, match="needs at least 32 tokens"):
        longlora.perplexity(model, variables["params"], tokens[:20], T)


class DenseUnderMask:
    """Full attention restricted to :func:`s2_mask`'s explicit ``[N, T, T]`` pattern: S2-Attn's definition,
    computed the slow way, as a hashable ``attention_fn``."""

    def __init__(self, variant):
        self.variant = variant

    def __hash__(self):
        return hash(("dense-under-s2-mask", self.variant))

    def __eq__(self, other):
        return isinstance(other, DenseUnderMask) and other.variant == self.variant

    def __call__(self, query, key, value, *, mask=None, is_causal=True, **unused):
        from lowrank_jax.attention import s2_mask

        t, n = query.shape[1], query.shape[2]
        allowed = jnp.asarray(s2_mask(t, n, group_size=t // 4, variant=self.variant, is_causal=is_causal))[None]
        if mask is not None:
            allowed = allowed & mask
        return jax.nn.dot_product_attention(query, key, value, mask=allowed)


@pytest.mark.parametrize("variant", ["no_wrap", "roll"])
def test_s2_in_the_model_equals_attention_under_the_s2_mask(tiny, variant):
    """The model-level check the parity tests (on bare q, k, v) could not make: RoPE is applied at each
    token's own position before the shift, grouped-query heads are split as the mask says, and the
    grouped computation inside the scanned blocks gives the logits of attention under the explicit mask.
    This is what makes a first LongLoRA loss far above full attention's (7.2 against 4.0 on SmolLM2,
    benchmarks/bench_longlora_loss.py) the pattern's own effect and not a wrong roll."""
    train_config, eval_config, variables, ids = tiny
    x = ids[:, :-1]
    s2 = LlamaForCausalLM(train_config.replace(attention_fn=S2Attention(variant=variant))).apply(variables, x)
    dense = LlamaForCausalLM(eval_config.replace(attention_fn=DenseUnderMask(variant))).apply(variables, x)
    np.testing.assert_allclose(s2, dense, atol=2e-5, rtol=1e-5)
    # and a pattern that differs (no shift at all) is visibly different: the check has power
    plain = np.tril(np.ones((T, T), bool)) & (np.arange(T)[:, None] // 8 == np.arange(T)[None] // 8)

    class NoShift(DenseUnderMask):
        def __call__(self, query, key, value, *, mask=None, is_causal=True, **unused):
            allowed = jnp.asarray(plain)[None, None] & (mask if mask is not None else True)
            return jax.nn.dot_product_attention(query, key, value, mask=allowed)

    unshifted = LlamaForCausalLM(eval_config.replace(attention_fn=NoShift("none"))).apply(variables, x)
    assert float(jnp.abs(unshifted - s2).max()) > 1e-3
