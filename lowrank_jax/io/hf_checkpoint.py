"""transformers checkpoint directories (LLaMA, Mistral, Qwen2) and GGUF files in; directories out. No torch.

:func:`load_pretrained` reads either

* a transformers directory: ``config.json`` (:meth:`LlamaConfig.from_hf_config`),
  ``model.safetensors`` or the shards of ``model.safetensors.index.json`` (F32, F16 or BF16),
  ``tokenizer.json`` (HF ``tokenizers``, :class:`lowrank_jax.io.tokenizer.HFTokenizer`) and
  ``tokenizer_config.json`` (special tokens, ``chat_template``; or ``chat_template.jinja``); or
* a ``.gguf`` file (:func:`lowrank_jax.io.gguf.load_llama`, the pure-Python byte-level BPE
  tokenizer, the chat template from the metadata key ``tokenizer.chat_template``).

Torch ``nn.Linear`` weights ``[out, in]`` become Flax kernels ``[in, out]``; names map through
:mod:`lowrank_jax.io.hf_names` (the one owner of the name table). Every tensor of the file is
mapped or reported: a tensor with no place in the model, a missing parameter, or a shape the
config does not imply is a ``ValueError`` naming it. Two tensors are consumed as checks, not
params: a tied ``lm_head.weight`` (must equal the embedding) and old checkpoints'
``rotary_emb.inv_freq`` buffers (must equal the config's RoPE frequencies).

:func:`save_pretrained` writes the inverse: a directory that
``transformers.AutoModelForCausalLM.from_pretrained`` loads (``config.json`` naming the original
architecture, ``model.safetensors`` in torch orientation, the tokenizer files).

Reference: transformers' ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM``
state dicts and ``save_pretrained`` (https://github.com/huggingface/transformers,
``src/transformers/models/{llama,mistral,qwen2}``); the safetensors format
(https://github.com/huggingface/safetensors: 8-byte little-endian header size, JSON header,
raw little-endian buffers).

Example:
    >>> from lowrank_jax.io.hf_checkpoint import load_pretrained, save_pretrained  # doctest: +SKIP
    >>> pre = load_pretrained("path/to/Qwen2-0.5B", scan_layers=True)  # doctest: +SKIP
    >>> logits = LlamaForCausalLM(pre.config).apply({"params": pre.params}, ids)  # doctest: +SKIP
    >>> save_pretrained("out", pre.config, merged_params, tokenizer_source=pre.source)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import struct
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from lowrank_jax.io import _memory, hf_names
from lowrank_jax.models.llama import ARCHITECTURES, LlamaConfig, LlamaForCausalLM, stack_layers, unstack_layers

__all__ = ["SAVE_DTYPES", "TOKENIZER_FILES", "Pretrained", "hf_config_dict", "hf_state_dict", "load_pretrained",
           "read_safetensors_file", "save_pretrained"]

#: Files of a transformers directory that describe the tokenizer (copied by :func:`save_pretrained`).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

#: ``dtype`` names :func:`save_pretrained` writes, as transformers names them in ``config.json``.
SAVE_DTYPES = ("float32", "float16", "bfloat16")

_INV_FREQ = "rotary_emb.inv_freq"


class Pretrained(NamedTuple):
    """What :func:`load_pretrained` returns.

    Attributes:
      config: the :class:`LlamaConfig` (``architecture`` records the source's model type).
      params: nested dict of ``jax.Array`` (``layers/...`` stacked when ``scan_layers``).
      tokenizer: :class:`~lowrank_jax.io.tokenizer.HFTokenizer` (directory) or
        :class:`~lowrank_jax.io.tokenizer.ByteLevelBPETokenizer` (GGUF); same interface.
      chat_template: the Jinja chat template, or None.
      bos_token, eos_token: their strings, or None.
      name: the model's name (``general.name`` of a GGUF, else the file/directory name).
      source: the path read (a directory or ``.gguf`` file), for ``save_pretrained(tokenizer_source=...)``.
    """

    config: LlamaConfig
    params: dict
    tokenizer: Any
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    name: str
    source: str


# --------------------------------------------------------------------------- safetensors

def _safetensors_dtypes() -> dict[str, Any]:
    import ml_dtypes  # a jax dependency: numpy's bfloat16

    return {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
            "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors_file(path) -> dict[str, np.ndarray]:
    """All tensors of a ``.safetensors`` file as numpy arrays (memory-mapped), BF16 included.

    ``safetensors.numpy`` cannot return bfloat16, the usual dtype of released LLMs, so this reads
    the format itself: ``u64`` header size, JSON header ``{name: {dtype, shape, data_offsets}}``,
    then the buffers (BF16 as ``ml_dtypes.bfloat16``).

    Raises:
      ValueError: a truncated or malformed file, or an unknown dtype (naming the file and tensor).
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{path} is not a safetensors file (header size {n} > file size {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a safetensors file (bad JSON header: {e})") from None
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
    dtypes = _safetensors_dtypes()
    out = {}
    for name, info in header.items():
        dtype = dtypes.get(info.get("dtype"))
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info.get('dtype')!r}; readable: {sorted(dtypes)}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end > data.size or end - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise ValueError(f"{path} is truncated or corrupt: tensor {name!r} needs bytes {begin}..{end} "
                             f"of {data.size}")
        out[name] = data[begin:end].view(dtype).reshape(shape)
    return out


def _weight_files(folder: pathlib.Path) -> list[pathlib.Path]:
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, Mapping) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map'")
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise ValueError(f"{index} names shard files that are missing: {missing}")
        return files
    others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    hint = f" (found {others}: only safetensors weights are read)" if others else ""
    raise ValueError(f"{folder} has no weights: neither model.safetensors nor model.safetensors.index.json{hint}")


# --------------------------------------------------------------------------- loading

def _expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """``{flax path: shape}`` of every param of the unscanned model (abstract init, nothing allocated)."""
    import jax
    import jax.numpy as jnp

    from lowrank_jax import tree as tree_lib

    model = LlamaForCausalLM(config.replace(scan_layers=False, remat=False))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    return {path: tuple(leaf.shape) for _, path, leaf in tree_lib.flatten_with_paths(shapes)}


def _params_from_state(state: Mapping[str, np.ndarray], config: LlamaConfig, where: str, param_dtype) -> dict:
    """transformers tensors (torch names, ``[out, in]``) -> the unscanned Flax params, every tensor accounted for."""
    import jax.numpy as jnp

    from lowrank_jax import tree as tree_lib

    expected = _expected_shapes(config)
    flat, unknown, bad_shapes = {}, [], []
    checks = {}
    for name, value in state.items():
        if name.endswith(_INV_FREQ):
            checks[name] = value
            continue
        try:
            path = hf_names.llama_param_path(name)
        except ValueError:
            unknown.append(name)
            continue
        if path == "lm_head/kernel" and config.tie_word_embeddings:
            checks[name] = value
            continue
        if path not in expected:
            unknown.append(name)
            continue
        transposed = hf_names.is_transposed(path)
        torch_shape = expected[path][::-1] if transposed else expected[path]
        if tuple(value.shape) != torch_shape:
            bad_shapes.append(f"{name} {tuple(value.shape)} (config.json implies {torch_shape})")
            continue
        flat[path] = value.T if transposed else value
    if unknown:
        raise ValueError(f"{where}: tensors with no place in a {config.architecture} model "
                         f"(bias_projections={config.bias_projections}, tie_word_embeddings="
                         f"{config.tie_word_embeddings}): {sorted(unknown)[:10]}")
    if bad_shapes:
        raise ValueError(f"{where}: shape mismatch: {bad_shapes[:5]}")
    missing = sorted(set(expected) - set(flat))
    if missing:
        raise ValueError(f"{where} lacks tensors for {[hf_names.llama_tensor_name(p) for p in missing][:10]}")
    for name, value in checks.items():
        if name.endswith(_INV_FREQ):
            ours = config.rope_inverse_frequencies
            if value.shape != ours.shape or not np.allclose(np.asarray(value, np.float32), ours, rtol=1e-5, atol=0):
                raise ValueError(f"{where}: {name} disagrees with config.json's RoPE "
                                 f"(rope_type={config.rope_type!r}, rope_theta={config.rope_theta})")
        elif not np.array_equal(np.asarray(value), np.asarray(flat["embed_tokens/embedding"])):
            raise ValueError(f"{where}: config.json ties the embeddings but {name} differs from "
                             f"model.embed_tokens.weight; set tie_word_embeddings=false")
    return tree_lib.nest({tuple(p.split("/")): jnp.asarray(v, dtype=param_dtype) for p, v in flat.items()})


def _load_gguf(path: pathlib.Path, scan_layers: bool, param_dtype, overrides) -> Pretrained:
    from lowrank_jax.io import gguf, tokenizer

    config, params = gguf.load_llama(path, param_dtype=param_dtype, scan_layers=scan_layers, **overrides)
    meta = gguf.read_metadata(path)
    tok = tokenizer.from_gguf(meta)
    token = lambda i: None if i is None else tok.id_to_token(i)  # noqa: E731
    return Pretrained(config, params, tok, tok.chat_template, token(tok.bos_token_id),
                      token(tok.eos_token_id), str(meta.get("general.name") or path.stem), os.fspath(path))


def load_pretrained(path, *, scan_layers: bool = False, param_dtype: Any = None, **config_overrides) -> Pretrained:
    """A LLaMA-family model from a transformers directory or a ``.gguf`` file.

    Args:
      path: a directory with ``config.json``, ``model.safetensors`` (or
        ``model.safetensors.index.json`` and its shards) and ``tokenizer.json``
        (``tokenizer_config.json`` optional); or a ``.gguf`` file.
      scan_layers: return the stacked ``layers/...`` layout (and ``config.scan_layers=True``).
      param_dtype: dtype of the returned params; default float32 (whatever the file holds).
      **config_overrides: further :class:`LlamaConfig` fields (``dtype``, ``remat``, ``attention_fn``...).

    Returns:
      A :class:`Pretrained`; run it as ``LlamaForCausalLM(p.config).apply({"params": p.params}, ids)``.

    Raises:
      ValueError (one line, naming the path or value): a path that does not exist, a directory
        without ``config.json``, an unsupported architecture (with the supported ones), no
        weights file, a missing shard, tensors with no place in the model, missing tensors, a
        shape mismatch, no ``tokenizer.json``.
    """
    import jax.numpy as jnp

    from lowrank_jax.io import tokenizer

    where = pathlib.Path(path)
    param_dtype = jnp.dtype(jnp.float32 if param_dtype is None else param_dtype)
    if where.is_file():
        if where.suffix != ".gguf":
            raise ValueError(f"{where} is a file but not a .gguf; give a transformers directory or a GGUF file")
        return _load_gguf(where, scan_layers, param_dtype, config_overrides)
    if not where.is_dir():
        raise ValueError(f"{where} does not exist (give a transformers checkpoint directory or a .gguf file)")
    config_file = where / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{where} has no config.json: not a transformers checkpoint directory")
    with open(config_file, encoding="utf-8") as f:
        hf_config = json.load(f)
    try:
        config = LlamaConfig.from_hf_config(hf_config, param_dtype=param_dtype, **config_overrides)
    except ValueError as e:
        raise ValueError(f"{config_file}: {e}") from None
    tok = tokenizer.from_hf_dir(where)   # before the weights: a missing tokenizer fails fast
    state: dict[str, np.ndarray] = {}
    for file in _weight_files(where):
        tensors = read_safetensors_file(file)
        twice = sorted(set(tensors) & set(state))
        if twice:
            raise ValueError(f"{file}: tensors also in another shard: {twice[:5]}")
        state.update(tensors)
    params = _params_from_state(state, config, os.fspath(where), param_dtype)
    if scan_layers:
        params = stack_layers(params, config.num_hidden_layers)
        config = config.replace(scan_layers=True)
    del state
    _memory.release_freed_heap()
    ids = {k: hf_config.get(f"{k}_token_id") for k in ("bos", "eos")}
    special = {k: tok.bos_token if k == "bos" else tok.eos_token for k in ids}
    for k, i in ids.items():  # config.json's ids stand in for tokenizer_config.json's strings
        if special[k] is None and isinstance(i, int):
            special[k] = tok.id_to_token(i)
    return Pretrained(config, params, tok, tok.chat_template, special["bos"], special["eos"],
                      where.resolve().name, os.fspath(where))


# --------------------------------------------------------------------------- saving

def hf_config_dict(config: LlamaConfig, *, dtype: str = "float32", bos_token_id: int | None = None,
                   eos_token_id: int | None = None) -> dict:
    """The transformers ``config.json`` of ``config`` (``architectures``/``model_type`` of ``config.architecture``).

    RoPE is written both as transformers 5's ``rope_parameters`` and as the older ``rope_theta`` +
    ``rope_scaling``, so either generation reads the same frequencies.

    Raises:
      ValueError: ``bias_projections`` that the architecture's config cannot express (named).
    """
    arch, biases = config.architecture, set(config.bias_projections)
    attention, mlp = {"q_proj", "k_proj", "v_proj", "o_proj"}, {"gate_proj", "up_proj", "down_proj"}
    expressible = {"llama": [set(), attention, mlp, attention | mlp], "mistral": [set()],
                   "qwen2": [{"q_proj", "k_proj", "v_proj"}]}[arch]
    if biases not in expressible:
        raise ValueError(f"a {arch} config.json cannot express biases on {sorted(biases)}; "
                         f"it allows {[sorted(b) for b in expressible]}")
    rope: dict[str, Any] = {"rope_type": config.rope_type, "rope_theta": config.rope_theta}
    if config.rope_type in ("default", "linear") and config.rope_scaling_factor != 1.0:
        rope["rope_type"] = "linear"
    if rope["rope_type"] != "default":
        rope["factor"] = config.rope_scaling_factor
    if config.rope_type == "llama3":
        rope.update(low_freq_factor=config.rope_low_freq_factor, high_freq_factor=config.rope_high_freq_factor,
                    original_max_position_embeddings=config.rope_original_max_position_embeddings)
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "rope_parameters": rope,
        "rope_theta": config.rope_theta,
        "rope_scaling": None if rope["rope_type"] == "default" else {k: v for k, v in rope.items() if k != "rope_theta"},
        "initializer_range": config.initializer_range,
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "dtype": dtype,
        "use_cache": True,
    }
    if arch == "llama":
        out.update(attention_bias=bool(biases & attention), mlp_bias=bool(biases & mlp))
    elif arch == "mistral":
        out["sliding_window"] = config.sliding_window
    else:
        out.update(use_sliding_window=config.sliding_window is not None, sliding_window=config.sliding_window,
                   max_window_layers=config.num_hidden_layers)
    return out


def _numpy_dtype(dtype):
    import ml_dtypes

    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    table = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
    if name not in table:
        raise ValueError(f"dtype {dtype!r} cannot be written; supported: {', '.join(SAVE_DTYPES)}")
    return name, table[name]


def _tokenizer_files(source, out: pathlib.Path) -> tuple[int | None, int | None]:
    """Writes the tokenizer files of ``source`` into ``out``; returns its ``(bos_token_id, eos_token_id)``."""
    from lowrank_jax.io import tokenizer

    source = pathlib.Path(source.source if isinstance(source, Pretrained) else source)
    if source.is_dir():
        tok = tokenizer.from_hf_dir(source)
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, out / name)
        return tok.bos_token_id, tok.eos_token_id
    if source.suffix == ".gguf" and source.is_file():
        from lowrank_jax.io.gguf import read_metadata

        meta = read_metadata(source)
        tok = tokenizer.from_gguf(meta)
        tok.to_tokenizers().save(os.fspath(out / "tokenizer.json"))
        token = lambda i: None if i is None else tok.id_to_token(i)  # noqa: E731
        settings = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token(tok.bos_token_id),
                    "eos_token": token(tok.eos_token_id), "pad_token": token(tok.pad_token_id),
                    "unk_token": token(tok.unk_token_id), "add_bos_token": tok.add_bos_token,
                    "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000_000}
        if meta.get("tokenizer.chat_template"):
            settings["chat_template"] = meta["tokenizer.chat_template"]
        with open(out / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=2, ensure_ascii=False)
        return tok.bos_token_id, tok.eos_token_id
    raise ValueError(f"tokenizer_source {os.fspath(source)!r} is neither a transformers directory nor a .gguf file")


def hf_state_dict(params, dtype=np.float32) -> dict[str, np.ndarray]:
    """LLaMA params (scanned or not) -> transformers' tensor names and torch orientation
    (``nn.Linear`` weights ``[out, in]``), as contiguous numpy arrays of ``dtype``."""
    from lowrank_jax import tree as tree_lib

    if "layers" in params:
        params = unstack_layers(params)
    out = {}
    for _, path, leaf in tree_lib.flatten_with_paths(params):
        value = np.asarray(leaf, np.float32)
        value = value.T if hf_names.is_transposed(path) else value
        out[hf_names.llama_tensor_name(path)] = np.ascontiguousarray(value.astype(dtype))
    return out


def save_pretrained(out_dir, config: LlamaConfig, params, *, tokenizer_source=None, dtype: Any = "float32",
                    overwrite: bool = False) -> pathlib.Path:
    """Writes a transformers checkpoint directory that ``AutoModelForCausalLM.from_pretrained`` loads.

    Files: ``config.json`` (:func:`hf_config_dict`: the architecture of ``config.architecture``),
    ``model.safetensors`` (one file, torch names and ``[out, in]`` orientation, written with
    ``safetensors.numpy``; a tied model has no ``lm_head.weight``, as transformers writes it), and
    the tokenizer of ``tokenizer_source``: a transformers directory's files copied
    (:data:`TOKENIZER_FILES`), or from a ``.gguf`` file a ``tokenizer.json`` built with HF
    ``tokenizers`` (:meth:`~lowrank_jax.io.tokenizer.ByteLevelBPETokenizer.to_tokenizers`) and a
    ``tokenizer_config.json`` carrying its special tokens and chat template. ``None``: no tokenizer files.

    Args:
      out_dir: the directory (created; must be empty unless ``overwrite``).
      config: the model's :class:`LlamaConfig`.
      params: its params (bare or ``{"params": ...}``; scanned params are unstacked). Merge an
        adapter first (``adapter.merge``).
      tokenizer_source: a directory, a ``.gguf`` file, a :class:`Pretrained`, or None.
      dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` (also as a numpy/jax dtype).
      overwrite: allow writing into a non-empty directory.

    Returns:
      ``out_dir`` as a ``pathlib.Path``.

    Raises:
      ValueError: a non-empty ``out_dir`` without ``overwrite``, an unwritable dtype, params that
        are not exactly the model's (missing/extra paths or shapes, named), biases the
        architecture cannot express, or a bad ``tokenizer_source``.
    """
    from safetensors.numpy import save_file

    from lowrank_jax import tree as tree_lib

    dtype_name, np_dtype = _numpy_dtype(dtype)
    out = pathlib.Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise ValueError(f"{out} exists and is not an empty directory (pass overwrite=True to write into it)")
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    if "layers" in params:
        params = unstack_layers(params)
    flat = {path: leaf for _, path, leaf in tree_lib.flatten_with_paths(params)}
    expected = _expected_shapes(config)
    extra, missing = sorted(set(flat) - set(expected)), sorted(set(expected) - set(flat))
    wrong = [f"{p} {tuple(np.shape(flat[p]))} != {expected[p]}" for p in sorted(set(flat) & set(expected))
             if tuple(np.shape(flat[p])) != expected[p]]
    if extra or missing or wrong:
        raise ValueError(f"params are not those of the config's model: extra {extra[:5]}, missing {missing[:5]}, "
                         f"shapes {wrong[:5]} (merge an adapter into the base params first)")
    hf_config_dict(config)  # refuses biases the architecture cannot express, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    ids = _tokenizer_files(tokenizer_source, out) if tokenizer_source is not None else (None, None)
    config_json = hf_config_dict(config, dtype=dtype_name, bos_token_id=ids[0], eos_token_id=ids[1])
    tensors = hf_state_dict(params, np_dtype)
    save_file(tensors, os.fspath(out / "model.safetensors"), metadata={"format": "pt"})
    with open(out / "config.json", "w", encoding="utf-8") as f:
        json.dump(config_json, f, indent=2)
    return out
