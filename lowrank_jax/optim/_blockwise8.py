r"""Blockwise 8-bit quantisation of optimizer moments with the dynamic (tree) data type.

This is the storage format of 8-bit Adam (Dettmers et al, `8-bit Optimizers via
Block-wise Quantization <https://arxiv.org/abs/2110.02861>`_, 2021), which 8-bit
GaLore uses for its projected moments: the flattened tensor is cut into blocks of
``block_size`` values (bitsandbytes uses 256 for optimizer states); each block
stores its absolute maximum in float32 and every value as the uint8 index of the
nearest entry of a fixed 256-entry code book, applied to ``x / absmax``:

.. math::
    q_i = \operatorname{argmin}_j | x_i / \mathrm{absmax}_{b(i)} - c_j |, \qquad
    \hat x_i = c_{q_i} \, \mathrm{absmax}_{b(i)}.

The code book is the *dynamic* data type (Dettmers, `8-Bit Approximations for
Parallelism in Deep Learning <https://arxiv.org/abs/1511.04561>`_, 2015): a sign
bit (signed version, for the first moment), a run of zero bits selecting the
decade ``10^{-e}``, and a linear fraction, so values from ``1e-7`` to ``1`` of a
block's maximum keep about two significant digits. The unsigned version (for the
second moment) spends the sign bit on the fraction. :func:`dynamic_map` rebuilds
``bitsandbytes.functional.create_dynamic_map`` bit-exactly (it is
:func:`lowrank_jax.quant.codes.create_dynamic_map`); quantisation rounds to the nearest code, which agrees
with bitsandbytes' CPU ``quantize_blockwise`` except for values within a rounding
error of the midpoint between two codes.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.adapters import base
from lowrank_jax.quant import codes

__all__ = ["QuantizedMoment", "dynamic_map", "quantize", "dequantize"]


class QuantizedMoment(NamedTuple):
    """A float tensor stored blockwise in 8 bits (a pytree node; shape and dtype are given at dequantisation).

    codes: ``[n_blocks, block_size]`` uint8, indices into the code book.
    absmax: ``[n_blocks]`` float32, the absolute maximum of each block.
    """

    codes: jax.Array
    absmax: jax.Array


dynamic_map = codes.create_dynamic_map


def n_blocks(size: int, block_size: int) -> int:
    return max(1, math.ceil(size / block_size))


def quantize(x: jax.Array, *, signed: bool, block_size: int = 256) -> QuantizedMoment:
    """Blockwise 8-bit quantisation of ``x`` (any shape) with the dynamic code book."""
    table = jnp.asarray(dynamic_map(signed))
    mids = (table[1:] + table[:-1]) / 2
    # replicated under an Explicit mesh: jnp.searchsorted has no sharding rule for a sharded operand
    flat = base.replicated(x.astype(jnp.float32)).reshape(-1)
    nb = n_blocks(flat.size, block_size)
    flat = jnp.pad(flat, (0, nb * block_size - flat.size))
    blocks = flat.reshape(nb, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    normed = blocks / jnp.where(absmax > 0, absmax, 1.0)[:, None]
    codes = jnp.searchsorted(mids, normed, side="left").astype(jnp.uint8)
    return QuantizedMoment(codes, absmax)


def dequantize(q: QuantizedMoment, shape, dtype=jnp.float32, *, signed: bool) -> jax.Array:
    """The float tensor of ``shape`` that ``q`` stores."""
    table = jnp.asarray(dynamic_map(signed))
    values = table[q.codes.astype(jnp.int32)] * q.absmax[:, None]
    size = math.prod(shape)
    return values.reshape(-1)[:size].reshape(shape).astype(dtype)


def zeros(shape, block_size: int = 256) -> QuantizedMoment:
    nb = n_blocks(math.prod(shape), block_size)
    # absmax = 0 makes every code dequantise to exactly 0
    return QuantizedMoment(jnp.zeros((nb, block_size), jnp.uint8), jnp.zeros((nb,), jnp.float32))
