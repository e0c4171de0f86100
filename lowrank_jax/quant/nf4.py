"""4-bit NormalFloat (NF4) and FP4 blockwise quantisation with double quantisation (QLoRA).

Bit-compatible with bitsandbytes' ``quantize_4bit`` / ``dequantize_4bit`` for the
same flattened input. For ``x`` flattened row-major into ``n`` values and cut
into blocks of ``B`` (default 64; the last block may be partial):

.. math::

    m_b = \\max_{i \\in b} |x_i|, \\qquad
    q_i = \\operatorname{nearest}_c\\big(\\mathrm{clip}(x_i / m_b, -1, 1)\\big), \\qquad
    \\hat x_i = c_{q_i} \\, m_{b(i)}

with ``c`` the 16 values of :data:`~lowrank_jax.quant.codes.NF4` or
:data:`~lowrank_jax.quant.codes.FP4`, the nearest code chosen by midpoints in
float32. Two codes go in a byte, the first element in the HIGH nibble; an odd
``n`` is padded with the code of 0.0 (7 for NF4, 0 for FP4).

Double quantisation (``double_quant=True``, bitsandbytes' ``compress_statistics``)
stores the block absmaxes in 8 bits:

.. math::

    \\mu = \\operatorname{mean}(m), \\qquad
    (a, M) = \\mathrm{quantize\\_blockwise}(m - \\mu;\\ \\text{dynamic map}, 256), \\qquad
    \\hat m_b = d_{a_b} M_{\\lfloor b / 256 \\rfloor} + \\mu

with ``d`` the signed dynamic map (:data:`~lowrank_jax.quant.codes.DYNAMIC`),
``a`` uint8 codes and ``M`` float32 absmaxes of blocks of 256 absmaxes; ``mu`` is
summed in torch's CPU order (:func:`~lowrank_jax.quant.blockwise.torch_mean`).
Storage per parameter: ``4 + 32 / B`` bits (4.5 at B = 64), or
``4 + 8 / B + 32 / (256 B)`` with double quantisation (4.127 at B = 64).

FP4 follows bitsandbytes' CUDA kernel (``dQuantizeFP4``): the sign bit comes from
``x < 0`` and the magnitude is the nearest of the 8 FP4 magnitudes, an exact tie
going to the smaller one. bitsandbytes' portable backend (which runs
``quantize_4bit`` on CPU) searches the signed, sorted code instead, which differs
in two cases, both harmless: values that round to zero get the other zero code
(+0 for x < 0 and -0 for x > 0, by ``torch.argsort``'s order of the tied ±0), and
negative values exactly at a midpoint go to the larger magnitude (equally near).
The NF4 codes and all statistics are identical to both. (The CUDA kernels compare
with decimal literals that are a few float32 ulps off the exact midpoints, e.g.
``0.583333f``; values inside those gaps, never met in our fixtures, can quantise
to the neighbouring code on GPU.)

References:
  Dettmers et al, `QLoRA: Efficient Finetuning of Quantized LLMs
  <https://arxiv.org/abs/2305.14314>`_, 2023.
Reference matched: bitsandbytes 0.50 ``functional.quantize_4bit`` /
``dequantize_4bit`` (``backends/default/ops.py``); the tests compare packed bytes,
absmax, nested absmax, offset and dequantised values with fixtures recorded from
it (``tests/fixtures/make_bnb_references.py``).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from lowrank_jax.quant import nf4
    >>> w = jax.random.normal(jax.random.key(0), (64, 96)) * 0.02
    >>> q = nf4.quantize(w)                      # NF4, blocks of 64, double quantisation
    >>> q.packed.shape, q.packed.dtype, q.absmax.dtype, q.nested_absmax.shape
    ((3072,), dtype('uint8'), dtype('uint8'), (1,))
    >>> round(q.bits_per_param, 3)
    4.135
    >>> w_hat = nf4.dequantize(q, jnp.float32)
    >>> w_hat.shape, bool(jnp.abs(w_hat - w).max() < 0.01)
    ((64, 96), True)
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
from lowrank_jax.quant import codes as codes_lib

__all__ = ["QuantizedArray", "quantize", "dequantize", "bits_per_param", "NESTED_BLOCK_SIZE"]

#: Block size of the double quantisation of the absmaxes (fixed at 256 in bitsandbytes).
NESTED_BLOCK_SIZE = 256

# FP4 by magnitude: the 8 non-negative values in increasing order, and their 3-bit codes.
_FP4_MAGNITUDES = codes_lib.FP4[:8][np.argsort(codes_lib.FP4[:8], kind="stable")]
_FP4_MAGNITUDE_CODES = np.argsort(codes_lib.FP4[:8], kind="stable")  # [0, 1, 6, 7, 4, 5, 2, 3]
_FP4_MAGNITUDE_NIBBLES = int(sum(int(c) << (4 * m) for m, c in enumerate(_FP4_MAGNITUDE_CODES)))  # 0x32547610


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["packed", "absmax", "nested_absmax", "offset"],
    meta_fields=["shape", "dtype", "block_size", "quant_type", "nested_block_size", "transposed"],
)
@dataclasses.dataclass(frozen=True, eq=False)  # identity equality: leaves are arrays
class QuantizedArray:
    """A 4-bit blockwise-quantised array: a pytree node (jit, vmap, sharding, orbax).

    The array leaves are the children; everything else is static metadata (part
    of the treedef, so two arrays of different shape or format have different
    tree structures). Field names follow bitsandbytes' ``QuantState``.

    Attributes:
      packed: ``uint8[ceil(n / 2)]``, two 4-bit codes per byte, first in the high nibble.
      absmax: ``float32[nb]`` block absmaxes, ``nb = ceil(n / block_size)``; with
        double quantisation ``uint8[nb]``, the 8-bit codes of ``absmax - offset``.
      nested_absmax: ``float32[ceil(nb / 256)]`` with double quantisation, else ``None``.
      offset: ``float32[]`` (the mean absmax) with double quantisation, else ``None``.
      shape: the shape of the represented array (what :func:`dequantize` returns).
      dtype: the dtype it had (``numpy.dtype``).
      block_size: values per absmax block.
      quant_type: ``"nf4"`` or ``"fp4"``.
      nested_block_size: absmaxes per nested block (256).
      transposed: the codes are those of ``x.T`` (2-D only): bitsandbytes' ``[out, in]``
        order for a Flax ``[in, out]`` kernel. :func:`dequantize` transposes back.

    Leaves may carry extra leading axes (a stack of layers quantised with
    ``jax.vmap``, as ``nn.scan`` stores them); :func:`dequantize` maps over them.
    """

    packed: Any
    absmax: Any
    nested_absmax: Any
    offset: Any
    shape: tuple[int, ...]
    dtype: np.dtype
    block_size: int
    quant_type: str
    nested_block_size: int = NESTED_BLOCK_SIZE
    transposed: bool = False

    @property
    def size(self) -> int:
        """Number of represented values."""
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Leading stack axes of the leaves (layers quantised with ``jax.vmap``); ``()`` for one array.

        The represented array is ``batch_shape + shape``; inside ``nn.scan`` the slice has ``()``.
        """
        return tuple(self.packed.shape[:-1])

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape whose row-major flattening the codes follow (``shape[::-1]`` when transposed)."""
        return self.shape[::-1] if self.transposed else self.shape

    @property
    def nbytes(self) -> int:
        """Bytes of all array leaves (of every stacked copy)."""
        return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(self))

    @property
    def bits_per_param(self) -> float:
        """Storage bits per represented value, all leaves included."""
        stacked = math.prod(self.packed.shape[:-1])
        return 8 * self.nbytes / (self.size * stacked)

    def dequantize(self, dtype=jnp.bfloat16, *, out_sharding=None) -> jax.Array:
        """:func:`dequantize` ``(self, dtype, out_sharding=out_sharding)``."""
        return dequantize(self, dtype, out_sharding=out_sharding)


def bits_per_param(block_size: int = 64, double_quant: bool = True, n: int | None = None) -> float:
    """Storage bits per parameter of the 4-bit format.

    .. math::

        4 + \\frac{32}{B}  \\quad\\text{or, with double quantisation,}\\quad
        4 + \\frac{8}{B} + \\frac{32}{256 B} + \\frac{32}{n}

    The ``32 / n`` term (the float32 offset) is dropped when ``n`` is not given;
    for a finite ``n`` partial blocks and the padding byte are counted exactly.

    Example:
      >>> from lowrank_jax.quant.nf4 import bits_per_param
      >>> bits_per_param(64, double_quant=False), round(bits_per_param(64), 4)
      (4.5, 4.127)
    """
    block_size = blockwise.check_block_size(block_size)
    if n is None:
        if double_quant:
            return 4 + 8 / block_size + 32 / (NESTED_BLOCK_SIZE * block_size)
        return 4 + 32 / block_size
    blocks = -(-n // block_size)
    bits = 8 * -(-n // 2)
    if double_quant:
        bits += 8 * blocks + 32 * -(-blocks // NESTED_BLOCK_SIZE) + 32
    else:
        bits += 32 * blocks
    return bits / n


def _check_quant_type(quant_type) -> str:
    if quant_type not in codes_lib.QUANT_TYPES:
        raise ValueError(f"`quant_type` must be one of {codes_lib.QUANT_TYPES}, got {quant_type!r}")
    return quant_type


def _codes_4bit(scaled: jax.Array, quant_type: str) -> jax.Array:
    """4-bit code of each scaled value in [-1, 1]."""
    if quant_type == "nf4":
        return blockwise.nearest(scaled, codes_lib.NF4)  # NF4 is sorted: the index is the code
    # FP4: sign bit from x < 0 (CUDA's dQuantizeFP4), magnitude to the nearest of the 8 magnitudes (ties down)
    magnitude = blockwise.nearest(jnp.abs(scaled), _FP4_MAGNITUDES)
    # the 3-bit code of magnitude index m is nibble m of 0x32547610 ([0, 1, 6, 7, 4, 5, 2, 3])
    code = (jnp.int32(_FP4_MAGNITUDE_NIBBLES) >> (4 * magnitude)) & 0x7
    return code + jnp.where(scaled < 0, 8, 0)


@functools.partial(jax.jit, static_argnames=("block_size", "double_quant", "quant_type", "transpose"))
def _quantize(x, **options):
    return blockwise.with_auto_axes(functools.partial(_quantize_core, **options), (x,))


def _quantize_core(x, *, block_size: int, double_quant: bool, quant_type: str, transpose: bool):
    flat = (x.T if transpose else x).reshape(-1).astype(jnp.float32)
    scaled, absmax = blockwise.absmax_scale(flat, block_size)
    packed = blockwise.pack_nibbles(_codes_4bit(scaled, quant_type), codes_lib.zero_code(quant_type))
    if not double_quant:
        return packed, absmax, None, None
    offset = blockwise.torch_mean(absmax)
    absmax_codes, nested_absmax = blockwise.quantize_codebook(absmax - offset, codes_lib.DYNAMIC, NESTED_BLOCK_SIZE)
    return packed, absmax_codes, nested_absmax, offset


def quantize(x, block_size: int = 64, double_quant: bool = True, quant_type: str = "nf4", *,
             transpose: bool = False) -> QuantizedArray:
    """Quantises ``x`` to 4 bits per value, blockwise, as bitsandbytes' ``quantize_4bit``.

    .. math::

        q_i = \\operatorname{nearest}_c\\big(\\mathrm{clip}(x_i / m_{b(i)}, -1, 1)\\big), \\qquad
        m_b = \\max_{i \\in b} |x_i|

    over the row-major flattening of ``x`` (see the module docstring, including
    double quantisation of ``m``). Equals ``bitsandbytes.functional.quantize_4bit(x,
    blocksize=block_size, compress_statistics=double_quant, quant_type=quant_type)``:
    same packed bytes, absmax, nested absmax and offset (for FP4, up to the zero
    sign and exact ties described in the module docstring; the nested codes as
    its portable backend and CUDA kernel compute them).

    Not jitted itself (a jitted helper does the work), so it composes inside a
    caller's ``jit`` or ``vmap``; the leaves are then traced.

    Args:
      x: floating-point array of any shape (float32, bfloat16, float16); other
        dtypes raise ``TypeError``.
      block_size: values per absmax block, a positive power of two (bitsandbytes
        accepts 32..4096). A last partial block has its own absmax.
      double_quant: quantise the absmaxes to 8 bits (bitsandbytes' ``compress_statistics``).
      quant_type: ``"nf4"`` or ``"fp4"``.
      transpose: quantise ``x.T`` (2-D ``x`` only): a Flax ``[in, out]`` kernel in
        torch's ``[out, in]`` order, so that :func:`~lowrank_jax.quant.to_bnb_state`
        gives a state a bitsandbytes ``Linear4bit`` loads. :func:`dequantize`
        still returns ``x``'s shape.

    Returns:
      A :class:`QuantizedArray`.

    Raises:
      ValueError: bad ``block_size`` or ``quant_type``; an empty ``x``; NaN or
        inf in a concrete ``x``. Under ``jit``/``vmap`` non-finite values are not
        checked: they poison their block (every value of it dequantises to NaN or
        inf; with double quantisation, every block of the array).
      TypeError: ``x`` is not floating point.
    """
    x = blockwise.check_floating(x)
    block_size = blockwise.check_block_size(block_size)
    quant_type = _check_quant_type(quant_type)
    if transpose and np.ndim(x) != 2:
        raise ValueError(f"`transpose=True` needs a 2-D array, got shape {tuple(np.shape(x))}")
    blockwise.check_finite(x)
    x = jnp.asarray(x)
    packed, absmax, nested_absmax, offset = _quantize(
        x, block_size=block_size, double_quant=bool(double_quant), quant_type=quant_type, transpose=bool(transpose))
    return QuantizedArray(packed, absmax, nested_absmax, offset, tuple(x.shape), np.dtype(x.dtype), block_size,
                          quant_type, NESTED_BLOCK_SIZE, bool(transpose))


def dequantize_absmax(q: QuantizedArray) -> jax.Array:
    """The float32 block absmaxes of ``q``: ``d[a] * M + offset`` with double quantisation.

    Rounded as bitsandbytes does (product, then sum; no fused multiply-add).
    """
    if not q.double_quant:
        return q.absmax.astype(jnp.float32)
    product = blockwise.dequantize_codebook(q.absmax, q.nested_absmax, codes_lib.DYNAMIC, q.nested_block_size)
    return blockwise.materialise(product) + q.offset


def _dequantize_one(q: QuantizedArray, dtype) -> jax.Array:
    n = q.size
    values = blockwise.lookup(codes_lib.code_book(q.quant_type), blockwise.unpack_nibbles(q.packed, n))
    # the barrier keeps XLA from fusing the (small) absmax computation into the per-value loop
    absmax = jax.lax.optimization_barrier(dequantize_absmax(q))
    out = blockwise.scale_blocks(values, absmax, q.block_size).astype(dtype)
    out = out.reshape(q.stored_shape)
    return out.T if q.transposed else out


def dequantize(q: QuantizedArray, dtype=jnp.bfloat16, *, out_sharding=None) -> jax.Array:
    """The array that ``q`` represents, in ``dtype``: ``c[q_i] * m_{b(i)}``.

    Computed in float32 (one rounding per value) and then cast to ``dtype``
    (round to nearest even), like bitsandbytes' ``dequantize_4bit``; equal to it
    for the same state. Jittable; leaves with extra leading axes (a stack of
    layers) are mapped over with ``jax.vmap``.

    Args:
      q: a :class:`QuantizedArray`.
      dtype: floating dtype of the result (default bfloat16, the compute dtype of QLoRA).
      out_sharding: ``PartitionSpec`` of the result under a mesh with Explicit
        axes (default replicated; e.g. the spec of the kernel ``q`` replaces).
        Ignored otherwise: with Auto axes the compiler propagates the shardings
        of ``q``'s leaves.

    Returns:
      An array of shape ``q.shape`` (with the stack axes in front).
    """
    return blockwise.dequantize_node(q, QuantizedArray, _dequantize_one, dtype, out_sharding)

