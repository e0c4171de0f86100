"""Symmetric int8 absmax quantisation, per channel and blockwise (LLM.int8()'s weight format).

Per channel (``quantize``): one scale per index of ``channel_axis``, the absmax
over every other axis:

.. math::

    m_c = \\max_{i:\\, c(i) = c} |x_i|, \\qquad
    q_i = \\mathrm{round}\\big(x_i \\cdot (127 \\cdot (1 / m_{c(i)}))\\big) \\in [-127, 127], \\qquad
    \\hat x_i = (q_i \\, m_{c(i)}) \\cdot \\mathrm{float32}(1/127)

rounding half to even, all in float32 (``1 / m`` rounded before the product, as
torch computes ``127.0 / m``), as bitsandbytes' ``int8_vectorwise_quant``
and ``int8_vectorwise_dequant`` (whose rows are the channels of a torch
``[out, in]`` weight: ``channel_axis=0`` there, ``channel_axis=-1`` for a Flax
``[in, out]`` kernel). A channel that is all zeros gets codes 0 (bitsandbytes
divides by zero there).

Blockwise (``quantize_blockwise``): the same formula with ``m`` the absmax of each
block of ``block_size`` consecutive values of the row-major flattening (the last
block may be partial), the layout of the 4-bit formats. bitsandbytes' own 8-bit
blockwise format is the non-linear dynamic map instead
(``quantize_blockwise``; see :mod:`lowrank_jax.quant.blockwise`).

Storage: ``8 + 32 / B`` bits per value blockwise, ``8 + 32 / (n / C)`` per channel.

References:
  Dettmers et al, `LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale
  <https://arxiv.org/abs/2208.07339>`_, 2022.
Reference matched: bitsandbytes 0.50 ``functional.int8_vectorwise_quant`` /
``int8_vectorwise_dequant`` (fixtures in ``tests/fixtures/bnb_references.npz``).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from lowrank_jax.quant import int8
    >>> kernel = jax.random.normal(jax.random.key(0), (96, 64))      # Flax [in, out]
    >>> q = int8.quantize(kernel)                                    # one scale per output channel
    >>> q.codes.dtype, q.codes.shape, q.absmax.shape
    (dtype('int8'), (96, 64), (64,))
    >>> err = jnp.abs(int8.dequantize(q, jnp.float32) - kernel).max(axis=0)
    >>> bool(jnp.all(err <= q.absmax / 254 * 1.001))
    True
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.quant import blockwise

__all__ = ["Int8Array", "quantize", "quantize_blockwise", "dequantize"]

_INV_127 = np.float32(7.874015718698502e-3)  # the constant bitsandbytes multiplies by


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "absmax"],
    meta_fields=["shape", "dtype", "channel_axis", "block_size"],
)
@dataclasses.dataclass(frozen=True, eq=False)  # identity equality: leaves are arrays
class Int8Array:
    """An int8 absmax-quantised array: a pytree node (jit, vmap, sharding, orbax).

    Attributes:
      codes: ``int8``, of ``shape`` per channel, ``[n]`` (flattened) blockwise.
      absmax: ``float32[shape[channel_axis]]`` per channel, ``float32[ceil(n / block_size)]`` blockwise.
      shape: the shape of the represented array.
      dtype: the dtype it had.
      channel_axis: the channel axis (non-negative) per channel, ``None`` blockwise.
      block_size: values per block blockwise, ``None`` per channel.
    """

    codes: Any
    absmax: Any
    shape: tuple[int, ...]
    dtype: np.dtype
    channel_axis: int | None = None
    block_size: int | None = None

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(self))

    @property
    def bits_per_param(self) -> float:
        stacked = math.prod(self.codes.shape[: self.codes.ndim - self._codes_ndim])
        return 8 * self.nbytes / (self.size * stacked)

    @property
    def _codes_ndim(self) -> int:
        return 1 if self.channel_axis is None else len(self.shape)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Leading stack axes of the leaves (layers quantised with ``jax.vmap``); ``()`` for one array."""
        return tuple(self.codes.shape[: self.codes.ndim - self._codes_ndim])

    def dequantize(self, dtype=jnp.bfloat16, *, out_sharding=None) -> jax.Array:
        return dequantize(self, dtype, out_sharding=out_sharding)


def _codes(x, absmax):
    """``round(x * (127 * (1 / m)))`` as int8; zero where ``m == 0``.

    torch evaluates bitsandbytes' ``127.0 / row_stats`` as ``row_stats.reciprocal() * 127``
    (two roundings), which decides exact ties of ``round``; so does this.
    """
    zero = absmax == 0
    scale = jnp.float32(127) * (jnp.float32(1) / jnp.where(zero, jnp.float32(1), absmax))
    return jnp.clip(jnp.round(x * jnp.where(zero, jnp.float32(0), scale)), -127, 127).astype(jnp.int8)


@functools.partial(jax.jit, static_argnames=("channel_axis",))
def _quantize_channels(x, channel_axis: int):
    return blockwise.with_auto_axes(functools.partial(_channels_core, channel_axis=channel_axis), (x,))


def _channels_core(x, channel_axis: int):
    xf = x.astype(jnp.float32)
    others = tuple(a for a in range(x.ndim) if a != channel_axis)
    absmax = jnp.max(jnp.abs(xf), axis=others)
    return _codes(xf, jnp.expand_dims(absmax, others)), absmax


@functools.partial(jax.jit, static_argnames=("block_size",))
def _quantize_blocks(x, block_size: int):
    return blockwise.with_auto_axes(functools.partial(_blocks_core, block_size=block_size), (x,))


def _blocks_core(x, block_size: int):
    flat = x.reshape(-1).astype(jnp.float32)
    n = flat.shape[0]
    blocks = -(-n // block_size)
    padded = jnp.pad(flat, (0, blocks * block_size - n)).reshape(blocks, block_size)
    absmax = jnp.max(jnp.abs(padded), axis=1)
    return _codes(padded, absmax[:, None]).reshape(-1)[:n], absmax


def quantize(x, channel_axis: int = -1) -> Int8Array:
    """Int8 codes with one absmax per channel: ``q = round(x * 127 / m_c)``.

    Equals bitsandbytes' ``int8_vectorwise_quant(W)`` (codes and ``row_stats``)
    for a torch ``[out, in]`` weight ``W`` with ``channel_axis=0``, and for
    its Flax kernel ``W.T`` with the default ``channel_axis=-1``.

    Args:
      x: floating-point array with at least one dimension.
      channel_axis: the axis that keeps one scale per index (the output axis of a kernel).

    Raises:
      TypeError: ``x`` is not floating point.
      ValueError: ``channel_axis`` out of range; NaN or inf in a concrete ``x``
        (under ``jit`` they poison their channel).
    """
    x = blockwise.check_floating(x)
    ndim = np.ndim(x)
    if isinstance(channel_axis, bool) or not isinstance(channel_axis, int) or not -ndim <= channel_axis < ndim:
        raise ValueError(f"`channel_axis` must be an int in [-{ndim}, {ndim}) for shape {tuple(np.shape(x))}, "
                         f"got {channel_axis!r}")
    channel_axis %= ndim
    blockwise.check_finite(x)
    x = jnp.asarray(x)
    codes, absmax = _quantize_channels(x, channel_axis)
    return Int8Array(codes, absmax, tuple(x.shape), np.dtype(x.dtype), channel_axis, None)


def quantize_blockwise(x, block_size: int = 64) -> Int8Array:
    """Int8 codes with one absmax per block of the row-major flattening (last block may be partial).

    Raises:
      TypeError: ``x`` is not floating point.
      ValueError: ``block_size`` not a positive power of two; NaN or inf in a concrete ``x``.
    """
    x = blockwise.check_floating(x)
    block_size = blockwise.check_block_size(block_size)
    blockwise.check_finite(x)
    x = jnp.asarray(x)
    codes, absmax = _quantize_blocks(x, block_size)
    return Int8Array(codes, absmax, tuple(x.shape), np.dtype(x.dtype), None, block_size)


def _dequantize_one(q: Int8Array, dtype) -> jax.Array:
    codes = q.codes.astype(jnp.float32)
    if q.channel_axis is None:
        out = blockwise.scale_blocks(codes, q.absmax, q.block_size).reshape(q.shape)
    else:
        shape = [1] * q.ndim
        shape[q.channel_axis] = q.shape[q.channel_axis]
        out = codes * q.absmax.reshape(shape)
    return (out * _INV_127).astype(dtype)


def dequantize(q: Int8Array, dtype=jnp.bfloat16, *, out_sharding=None) -> jax.Array:
    """``(q * m) * float32(1/127)``, cast to ``dtype`` (bitsandbytes' ``int8_vectorwise_dequant``).

    Jittable; stacked leaves (extra leading axes) are mapped over. ``out_sharding``
    as for :func:`lowrank_jax.quant.nf4.dequantize` (used under Explicit mesh axes).
    """
    return blockwise.dequantize_node(q, Int8Array, _dequantize_one, dtype, out_sharding)

