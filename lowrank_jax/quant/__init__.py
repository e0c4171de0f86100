"""Quantised base weights for QLoRA: NF4 / FP4 (with double quantisation) and int8.

* :mod:`lowrank_jax.quant.nf4` -- 4-bit NF4 and FP4, blockwise absmax, double
  quantisation; bit-compatible with bitsandbytes' ``quantize_4bit``.
* :mod:`lowrank_jax.quant.int8` -- int8 absmax per channel (bitsandbytes'
  ``int8_vectorwise_quant``) and blockwise.
* :mod:`lowrank_jax.quant.bnb` -- bitsandbytes' stored 4-bit state (``Linear4bit``
  state dicts) to and from :class:`QuantizedArray`, with numpy only.
* :mod:`lowrank_jax.quant.params` -- ``quantize_params`` / ``dequantize_params``
  on params pytrees, targeted by path like the adapters.
* :mod:`lowrank_jax.quant.codes`, :mod:`lowrank_jax.quant.blockwise` -- the code
  books and the blockwise arithmetic they share.

Quantised arrays are pytree nodes (registered dataclasses) whose array leaves are
the codes and scales and whose shape, dtype and format are static metadata, so
they pass through ``jax.jit``, ``jax.vmap``, ``jax.tree`` functions, sharding and
orbax checkpoints.

References:
  Dettmers et al, `QLoRA: Efficient Finetuning of Quantized LLMs
  <https://arxiv.org/abs/2305.14314>`_, 2023.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from lowrank_jax import quant
    >>> w = jax.random.normal(jax.random.key(0), (576, 1536)) * 0.02
    >>> q = quant.nf4.quantize(w)                       # what QLoRA stores
    >>> round(q.bits_per_param, 3)
    4.127
    >>> w_bf16 = jax.jit(quant.nf4.dequantize)(q)      # what its forward pass uses
    >>> w_bf16.dtype, w_bf16.shape
    (dtype(bfloat16), (576, 1536))
"""

from lowrank_jax.quant import blockwise as blockwise
from lowrank_jax.quant import bnb as bnb
from lowrank_jax.quant import codes as codes
from lowrank_jax.quant import int8 as int8
from lowrank_jax.quant import nf4 as nf4
from lowrank_jax.quant import params as params
from lowrank_jax.quant.bnb import bnb_weight_keys as bnb_weight_keys
from lowrank_jax.quant.bnb import from_bnb_state as from_bnb_state
from lowrank_jax.quant.bnb import to_bnb_state as to_bnb_state
from lowrank_jax.quant.int8 import Int8Array as Int8Array
from lowrank_jax.quant.nf4 import QuantizedArray as QuantizedArray
from lowrank_jax.quant.params import dequantize_params as dequantize_params
from lowrank_jax.quant.params import quantize_params as quantize_params
from lowrank_jax.tree import is_quantized as is_quantized  # the one definition; quant.params re-exports it too

__all__ = [
    "Int8Array",
    "QuantizedArray",
    "blockwise",
    "bnb",
    "bnb_weight_keys",
    "codes",
    "dequantize_params",
    "from_bnb_state",
    "int8",
    "is_quantized",
    "nf4",
    "params",
    "quantize_params",
    "to_bnb_state",
]
