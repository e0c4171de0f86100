"""bitsandbytes' stored 4-bit state <-> :class:`~lowrank_jax.quant.nf4.QuantizedArray`, with numpy only.

A bitsandbytes ``Linear4bit`` writes its quantised weight to a state dict (and
from there to safetensors) as these entries, for a weight key ``k`` (e.g.
``"model.layers.0.mlp.up_proj.weight"``)::

    k                                     uint8[ceil(n / 2), 1]   packed codes (high nibble first)
    k + ".absmax"                         float32[nb], or uint8[nb] with double quantisation
    k + ".quant_map"                      float32[16]             the NF4 / FP4 code book
    k + ".nested_absmax"                  float32[ceil(nb / 256)] (double quantisation only)
    k + ".nested_quant_map"               float32[256]            the dynamic map (idem)
    k + ".quant_state.bitsandbytes__nf4"  uint8[...]              JSON: quant_type, blocksize,
                                                                  dtype, shape, nested_blocksize,
                                                                  nested_dtype, nested_offset

(``QuantState.as_dict(packed=True)``; the last key ends in ``__fp4`` for FP4.)
``shape`` is torch's ``[out, in]``: pass ``transpose=True`` to get a Flax
``[in, out]`` kernel out of it, stored without moving a byte.

Reference matched: bitsandbytes 0.50 ``QuantState.as_dict`` / ``from_dict`` and
``Linear4bit._save_to_state_dict``; the tests load a state dict saved by a real
``Linear4bit`` (``tests/fixtures/bnb_linear4bit.safetensors``) and write it back
byte for byte.

Example:
    >>> import numpy as np, jax.numpy as jnp
    >>> from lowrank_jax.quant import nf4, bnb
    >>> w = np.linspace(-1, 1, 64 * 96, dtype=np.float32).reshape(64, 96)   # torch [out, in]
    >>> state = bnb.to_bnb_state(nf4.quantize(w), "weight")
    >>> for key in sorted(state):
    ...     print(key, state[key].dtype, state[key].shape)
    weight uint8 (3072, 1)
    weight.absmax uint8 (96,)
    weight.nested_absmax float32 (1,)
    weight.nested_quant_map float32 (256,)
    weight.quant_map float32 (16,)
    weight.quant_state.bitsandbytes__nf4 uint8 (...,)
    >>> bytes(state["weight.quant_state.bitsandbytes__nf4"])[:40]
    b'{"quant_type": "nf4", "blocksize": 64, "'
    >>> kernel = bnb.from_bnb_state(state, "weight", transpose=True)   # as a Flax [in, out] kernel
    >>> kernel.shape, nf4.dequantize(kernel, jnp.float32).shape
    ((96, 64), (96, 64))
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.quant import codes as codes_lib
from lowrank_jax.quant.nf4 import NESTED_BLOCK_SIZE, QuantizedArray

__all__ = ["to_bnb_state", "from_bnb_state", "bnb_weight_keys", "BNB_BLOCK_SIZES", "BNB_DTYPES"]

#: Block sizes bitsandbytes 0.50's ``quantize_4bit`` / ``dequantize_4bit`` accept.
BNB_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: Original dtypes bitsandbytes' 4-bit state can record.
BNB_DTYPES = ("float32", "bfloat16", "float16")

_STATE_SUFFIX = ".quant_state.bitsandbytes__"


def _state_key(state: Mapping[str, Any], key: str) -> str:
    found = [key + _STATE_SUFFIX + t for t in codes_lib.QUANT_TYPES if key + _STATE_SUFFIX + t in state]
    if not found:
        near = [k for k in state if k.startswith(key)][:8]
        raise KeyError(
            f"no bitsandbytes 4-bit state for {key!r}: expected {key + _STATE_SUFFIX}nf4 (or fp4); "
            f"keys starting with it: {near}; 4-bit weights in this state: {bnb_weight_keys(state)[:8]}"
        )
    return found[0]


def bnb_weight_keys(state: Mapping[str, Any]) -> list[str]:
    """The keys of the 4-bit quantised weights in a bitsandbytes state dict, sorted."""
    return sorted(k.split(_STATE_SUFFIX)[0] for k in state if _STATE_SUFFIX in k)


def _as_numpy(value) -> np.ndarray:
    return np.asarray(jax.device_get(value))


def to_bnb_state(q: QuantizedArray, key: str = "weight") -> dict[str, np.ndarray]:
    """The entries a bitsandbytes ``Linear4bit`` state dict holds for ``q``, as numpy arrays.

    The JSON entry is byte-identical to bitsandbytes' (same keys, order and
    formatting), so ``safetensors.numpy.save_file(to_bnb_state(q, "weight"), path)``
    gives a file that ``Linear4bit.load_state_dict`` (after
    ``safetensors.torch.load_file``) accepts. Use ``quantize(kernel, transpose=True)``
    for a Flax ``[in, out]`` kernel so that the recorded shape is torch's ``[out, in]``.

    Args:
      q: an unstacked :class:`~lowrank_jax.quant.nf4.QuantizedArray` with concrete leaves.
      key: the weight's key in the state dict (``"weight"`` for a lone ``Linear4bit``).

    Returns:
      ``{key: uint8[ceil(n/2), 1], key + ".absmax": ..., ...}``.

    Raises:
      ValueError: a block size or dtype bitsandbytes cannot read, or stacked leaves.
    """
    if not isinstance(q, QuantizedArray):
        raise TypeError(f"`q` must be a QuantizedArray, got {type(q).__name__}")
    if q.packed.ndim != 1:
        raise ValueError(f"`q` has stacked leaves (packed shape {q.packed.shape}); export each layer separately")
    if q.block_size not in BNB_BLOCK_SIZES:
        raise ValueError(f"bitsandbytes reads block sizes {BNB_BLOCK_SIZES}, got block_size={q.block_size}")
    if q.dtype.name not in BNB_DTYPES:
        raise ValueError(f"bitsandbytes records dtypes {BNB_DTYPES}, got {q.dtype.name}")
    packed = _as_numpy(q.packed).astype(np.uint8).reshape(-1, 1)
    state = {key: packed, key + ".absmax": _as_numpy(q.absmax)}
    state[key + ".quant_map"] = np.array(codes_lib.code_book(q.quant_type))
    # bitsandbytes' QuantState.as_dict: non-tensor items, in this order, json.dumps'ed to uint8
    meta: dict[str, Any] = {
        "quant_type": q.quant_type,
        "blocksize": q.block_size,
        "dtype": q.dtype.name,
        "shape": list(q.stored_shape),
    }
    if q.double_quant:
        state[key + ".nested_absmax"] = _as_numpy(q.nested_absmax).astype(np.float32)
        state[key + ".nested_quant_map"] = np.array(codes_lib.DYNAMIC)
        meta.update(
            nested_blocksize=q.nested_block_size,
            nested_dtype="float32",
            nested_offset=float(_as_numpy(q.offset)),
        )
    state[key + _STATE_SUFFIX + q.quant_type] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8).copy()
    return state


def _check_map(state, name: str, expected: np.ndarray) -> None:
    if name not in state:
        return
    stored = _as_numpy(state[name]).astype(np.float32).reshape(-1)
    if stored.shape != expected.shape or not np.array_equal(stored, expected):
        raise ValueError(f"{name!r} is not bitsandbytes' standard code book; custom code books are not supported")


def from_bnb_state(state: Mapping[str, Any], key: str = "weight", *, transpose: bool = False) -> QuantizedArray:
    """A :class:`~lowrank_jax.quant.nf4.QuantizedArray` from a bitsandbytes 4-bit state dict.

    Works on numpy arrays (e.g. ``safetensors.numpy.load_file``), no torch. The
    codes, absmaxes and offset are taken as stored, so the result dequantises
    exactly as bitsandbytes' ``dequantize_4bit`` does. A packed weight stored with
    another ``quant_storage`` dtype is read as its bytes.

    Args:
      state: mapping from state-dict keys to arrays.
      key: the weight's key (``"weight"``, ``"model.layers.0.mlp.up_proj.weight"``, ...).
      transpose: return the 2-D weight transposed (a Flax ``[in, out]`` kernel
        from torch's ``[out, in]``); the bytes are not moved.

    Raises:
      KeyError: no 4-bit state under ``key`` (the message lists the ones present).
      ValueError: inconsistent sizes, an unknown format, or a custom code book.
    """
    meta_key = _state_key(state, key)
    meta = json.loads(bytes(_as_numpy(state[meta_key]).astype(np.uint8).reshape(-1)).decode("utf-8"))
    quant_type = meta.get("quant_type")
    if quant_type not in codes_lib.QUANT_TYPES:
        raise ValueError(f"{meta_key!r}: unknown quant_type {quant_type!r}")
    block_size = int(meta["blocksize"])
    shape = tuple(int(s) for s in meta["shape"])
    dtype = np.dtype(jnp.dtype(meta.get("dtype", "float32")))
    n = math.prod(shape)
    blocks = -(-n // block_size)
    if key not in state:
        raise KeyError(f"the packed weight {key!r} is missing from the state")
    packed = np.ascontiguousarray(_as_numpy(state[key])).view(np.uint8).reshape(-1)
    if packed.size != -(-n // 2):
        raise ValueError(f"{key!r} holds {packed.size} bytes; shape {shape} needs {-(-n // 2)}")
    absmax = _as_numpy(state[key + ".absmax"]).reshape(-1)
    if absmax.size != blocks:
        raise ValueError(f"{key + '.absmax'!r} has {absmax.size} entries; {n} values in blocks of {block_size} "
                         f"need {blocks}")
    _check_map(state, key + ".quant_map", codes_lib.code_book(quant_type))
    nested_absmax = offset = None
    nested_block_size = NESTED_BLOCK_SIZE
    if key + ".nested_absmax" in state:
        nested_block_size = int(meta.get("nested_blocksize", NESTED_BLOCK_SIZE))
        _check_map(state, key + ".nested_quant_map", codes_lib.DYNAMIC)
        if absmax.dtype != np.uint8:
            raise ValueError(f"{key + '.absmax'!r} must be uint8 codes with double quantisation, got {absmax.dtype}")
        nested_absmax = _as_numpy(state[key + ".nested_absmax"]).astype(np.float32).reshape(-1)
        if nested_absmax.size != -(-blocks // nested_block_size):
            raise ValueError(f"{key + '.nested_absmax'!r} has {nested_absmax.size} entries, expected "
                             f"{-(-blocks // nested_block_size)}")
        offset = jnp.asarray(np.float32(meta["nested_offset"]))
        nested_absmax = jnp.asarray(nested_absmax)
    else:
        absmax = absmax.astype(np.float32)
    if transpose:
        if len(shape) != 2:
            raise ValueError(f"`transpose=True` needs a 2-D weight, {key!r} has shape {shape}")
        shape = shape[::-1]
    return QuantizedArray(jnp.asarray(packed), jnp.asarray(absmax), nested_absmax, offset, shape, dtype, block_size,
                          quant_type, nested_block_size, bool(transpose))
