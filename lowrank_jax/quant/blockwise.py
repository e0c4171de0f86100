"""Blockwise absmax quantisation to a code book, as bitsandbytes computes it.

The building blocks shared by the 4-bit (:mod:`lowrank_jax.quant.nf4`) and the
8-bit nested (double quantisation) formats. For a flattened float32 vector
``x`` of ``n`` values split into ``ceil(n / B)`` blocks of ``B`` consecutive
values (the last block may be partial and then uses its own absmax):

.. math::

    m_b = \\max_{i \\in b} |x_i|, \\qquad
    s_i = \\mathrm{clip}(x_i \\cdot (1 / m_b), -1, 1), \\qquad
    q_i = \\#\\{k : t_k < s_i\\},\\quad t_k = (c_k + c_{k+1}) / 2

for a sorted code book ``c``: ``q_i`` is the nearest code, ties going to the
lower one (``torch.bucketize(s, t, right=False)``), all in float32. This is the
arithmetic of bitsandbytes' portable backend (``backends/default/ops.py``:
``quantize_4bit`` and ``quantize_blockwise``), which runs ``quantize_4bit`` on CPU,
and of its CUDA kernels (``kQuantizeBlockwise``: ``x * (1/absmax)``, nearest code).
Two details of the portable backend are reproduced bit for bit: the last, partial
block is divided (``x / m``) instead of multiplied by the reciprocal, and an
all-zero partial block stores ``absmax = float32(1e-38)`` (full zero blocks store 0).

Differences that remain, by design:

* XLA:CPU flushes subnormal floats to zero; a block whose absmax is subnormal
  (below 1.18e-38) quantises as a zero block here.
* bitsandbytes' CPU build (``libbitsandbytes_cpu``, used for the 8-bit
  ``quantize_blockwise`` of the nested absmax on CPU) divides by the absmax and
  searches the code with a lookup-table binary search followed by a distance
  test; it picks a neighbouring code for about 0.2% of values. We follow the
  nearest-by-midpoint semantics of the CUDA kernel and the portable backend;
  the tests count the CPU build's differences.

:func:`torch_mean` reproduces the float32 summation order of ``torch.mean`` on
CPU, which bitsandbytes uses for the double-quantisation offset.
"""

from __future__ import annotations

import functools

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "check_block_size",
    "check_floating",
    "check_finite",
    "absmax_scale",
    "nearest",
    "quantize_codebook",
    "dequantize_codebook",
    "lookup",
    "with_auto_axes",
    "scale_blocks",
    "pack_nibbles",
    "unpack_nibbles",
    "torch_mean",
]

#: float32(1e-38): the absmax bitsandbytes' portable backend stores for an all-zero partial block.
TINY = np.float32(1e-38)


# --------------------------------------------------------------------------- validation


def check_block_size(block_size, name: str = "block_size") -> int:
    """``block_size`` as an int; ``ValueError`` unless it is a positive power of two.

    Any positive power of two is accepted (bitsandbytes itself accepts 32..4096
    for 4-bit and 64..4096 for 8-bit blocks); an array smaller than a block, or
    whose size is not a multiple of it, gets a last partial block with its own
    absmax, as in bitsandbytes.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise ValueError(f"`{name}` must be a positive power of two (int), got {block_size!r}")
    block_size = int(block_size)
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"`{name}` must be a positive power of two, got {block_size}")
    return block_size


def check_floating(x, what: str = "x"):
    """``x`` as an array; ``TypeError`` naming the dtype unless it is floating point."""
    if not hasattr(x, "dtype"):
        x = np.asarray(x)
    dtype = np.dtype(x.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"`{what}` must be a floating-point array (float32, bfloat16, float16), got dtype {dtype}")
    if math.prod(np.shape(x)) == 0:
        raise ValueError(f"`{what}` is empty (shape {tuple(np.shape(x))}); there is nothing to quantise")
    return x


def check_finite(x, what: str = "x") -> None:
    """``ValueError`` if a concrete ``x`` holds NaN or inf. A no-op on tracers (under jit/vmap).

    Under ``jit`` non-finite values cannot raise; they poison their block instead:
    the block's absmax becomes NaN or inf, and dequantising gives NaN (or inf)
    for every value of that block. With double quantisation the offset is the
    mean of all absmax, so every block of the tensor is poisoned.
    """
    if isinstance(x, jax.core.Tracer):
        return
    bad = ~np.isfinite(np.asarray(x, dtype=np.float32))
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"`{what}` has {int(bad.sum())} non-finite values (NaN or inf), the first at index {first}; "
            f"quantising them would poison their blocks. Clean them first (e.g. jnp.nan_to_num)."
        )


# --------------------------------------------------------------------------- quantisation


def absmax_scale(flat: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
    """``(s, m)``: values scaled into [-1, 1] by their block's absmax, and the absmax.

    ``flat`` is a float32 vector of ``n`` values; ``m`` has ``ceil(n / block_size)``
    entries. Full blocks are multiplied by ``1 / m`` (the CUDA kernel and the
    portable backend), the partial last block is divided by ``m`` (portable
    backend). A zero block scales to zeros.
    """
    n = flat.shape[0]
    full, rem = divmod(n, block_size)
    scaled, absmax = [], []
    if full:
        blocks = flat[: full * block_size].reshape(full, block_size)
        m = jnp.max(jnp.abs(blocks), axis=1)
        inv = jnp.float32(1) / jnp.where(m == 0, jnp.float32(1), m)
        scaled.append(jnp.clip(blocks * inv[:, None], -1, 1).reshape(-1))
        absmax.append(m)
    if rem:
        tail = flat[full * block_size :]
        m = jnp.max(jnp.abs(tail))
        zero = m == 0
        scaled.append(jnp.clip(true_divide(tail, jnp.where(zero, jnp.float32(1), m)), -1, 1))
        absmax.append(jnp.where(zero, TINY, m)[None])
    return jnp.concatenate(scaled), jnp.concatenate(absmax)


def true_divide(x: jax.Array, d: jax.Array) -> jax.Array:
    """``x / d`` rounded once, for a scalar (or constant) ``d``.

    XLA rewrites a division by a constant or by a broadcast scalar into a
    multiplication by the rounded reciprocal, which can differ in the last bit.
    The divisor is given ``x``'s shape through the data (``0 * x`` is not folded
    for floats) and a barrier, so the division stays elementwise.
    """
    d = jnp.where(jnp.isfinite(x), x * 0, jnp.float32(0)) + d
    x, d = jax.lax.optimization_barrier((x, d))
    return x / d


def nearest(scaled: jax.Array, sorted_code: np.ndarray) -> jax.Array:
    """Index into ``sorted_code`` of the nearest code: ``#{k : t_k < s}``, ``t_k`` the float32 midpoints.

    As ``torch.bucketize(s, t, right=False)``: a sum of comparisons for a 4-bit code
    book, a branchless binary search for larger ones.
    """
    bounds = (sorted_code[:-1] + sorted_code[1:]) / np.float32(2)
    if bounds.size < 16:
        index = jnp.zeros(scaled.shape, jnp.int32)
        for t in bounds:
            index = index + (scaled > t).astype(jnp.int32)
        return index
    size = 1 << bounds.size.bit_length()  # a power of two > len(bounds); padded with +inf
    padded = np.concatenate([bounds, np.full(size - bounds.size, np.inf, np.float32)])
    index = jnp.zeros(scaled.shape, jnp.int32)
    step = size // 2
    while step:
        index = jnp.where(lookup(padded, index + step - 1) < scaled, index + step, index)
        step //= 2
    return index


def quantize_codebook(flat: jax.Array, sorted_code: np.ndarray, block_size: int) -> tuple[jax.Array, jax.Array]:
    """``(codes uint8[n], absmax float32[blocks])`` of ``flat`` with a sorted code book.

    bitsandbytes' ``quantize_blockwise(A, code, blocksize)`` with nearest-code
    selection (CUDA / portable backend semantics).
    """
    scaled, absmax = absmax_scale(flat.astype(jnp.float32), block_size)
    return nearest(scaled, sorted_code).astype(jnp.uint8), absmax


def scale_blocks(values: jax.Array, absmax: jax.Array, block_size: int) -> jax.Array:
    """``values[i] * absmax[i // block_size]`` in float32 (one rounding per value)."""
    n = values.shape[0]
    blocks = absmax.shape[0]
    padded = jnp.pad(values, (0, blocks * block_size - n))
    return (padded.reshape(blocks, block_size) * absmax[:, None]).reshape(-1)[:n]


def materialise(x: jax.Array) -> jax.Array:
    """``x``, rounded to float32 before it is used.

    XLA:CPU contracts ``a * b + c`` into a fused multiply-add (one rounding);
    torch rounds the product first. Routing the product through a select keeps
    the two roundings. (A NaN stays NaN.)
    """
    return jnp.where(jnp.isnan(x), jnp.float32(jnp.nan), x)


def _explicit_mesh(args):
    """The abstract mesh in context (or of the first sharded leaf of ``args``) if it has Explicit axes."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        for leaf in jax.tree.leaves(args):
            sharding = getattr(jax.typeof(leaf), "sharding", None)
            leaf_mesh = getattr(sharding, "mesh", None)
            if leaf_mesh is not None and not leaf_mesh.empty:
                mesh = leaf_mesh
                break
    if mesh.empty or jax.sharding.AxisType.Explicit not in mesh.axis_types:
        return None
    return mesh


def with_auto_axes(fn, args, out_sharding=None):
    """``fn(*args)``; under a mesh with Explicit axes, with those axes made Auto for its body.

    Quantisation reshapes flattened blocks in ways Explicit sharding cannot type
    (a sharded axis split into blocks), so the body runs with the compiler
    choosing layouts (``jax.sharding.auto_axes``) and the result is resharded to
    ``out_sharding`` (a ``PartitionSpec``, or a pytree of them; default
    replicated). Without Explicit axes (no mesh, or an Auto mesh) this is a
    plain call and the compiler propagates the input shardings.
    """
    mesh = _explicit_mesh(args)
    if mesh is None:
        return fn(*args)
    out_sharding = jax.sharding.PartitionSpec() if out_sharding is None else out_sharding
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.sharding.auto_axes(fn, out_sharding=out_sharding)(*args)


def lookup(table: np.ndarray, index: jax.Array) -> jax.Array:
    """``table[index]`` for a small constant table, sharded like ``index``.

    The output sharding is given explicitly, which a gather needs under a mesh
    with Explicit axes (the default of ``jax.make_mesh`` in jax 0.10).
    """
    return jnp.asarray(table).at[index].get(out_sharding=jax.typeof(index).sharding)


def dequantize_codebook(codes: jax.Array, absmax: jax.Array, code: np.ndarray, block_size: int) -> jax.Array:
    """``code[codes] * absmax[block]`` in float32 (``dequantize_blockwise``)."""
    return scale_blocks(lookup(code, codes.astype(jnp.int32)), absmax, block_size)


def pack_nibbles(codes: jax.Array, pad_code: int) -> jax.Array:
    """Two 4-bit codes per byte, the first in the HIGH nibble; an odd count is padded with ``pad_code``."""
    codes = codes.astype(jnp.uint8)
    if codes.shape[0] % 2:
        codes = jnp.concatenate([codes, jnp.full((1,), pad_code, jnp.uint8)])
    # hi * 16 + lo as a reduction over pairs: XLA:CPU vectorises it, unlike two strided slices
    pairs = codes.reshape(-1, 2).astype(jnp.int32)
    return jnp.sum(pairs * jnp.array([16, 1], jnp.int32), axis=1).astype(jnp.uint8)


def unpack_nibbles(packed: jax.Array, n: int) -> jax.Array:
    """The first ``n`` 4-bit codes of ``packed`` (high nibble first), as int32."""
    packed = packed.astype(jnp.int32)
    return jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)[:n]


# --------------------------------------------------------------------------- torch's float32 mean

_GRAIN = 32768  # at::internal::GRAIN_SIZE: below it torch reduces on one thread
_LANES = 8  # float32 lanes of the Vectorized<float> that torch's sum kernel uses on x86 CPUs
_ILP = 4  # row_sum's ilp_factor
_LEVELS = 4  # multi_row_sum's num_levels


def _fold(rows: jax.Array) -> jax.Array:
    """Sequential left fold over axis 0, from +0.0: ``((0 + r0) + r1) + ...``."""
    acc = jnp.zeros(rows.shape[1:], jnp.float32)
    for i in range(rows.shape[0]):
        acc = acc + rows[i]
    return acc


def _fold_groups(rows: jax.Array, step: int) -> tuple[jax.Array, jax.Array]:
    """(fold of each full group of ``step`` rows, fold of the rows left over)."""
    groups = rows.shape[0] // step
    full = rows[: groups * step].reshape(groups, step, *rows.shape[1:])
    acc = jnp.zeros((groups, *rows.shape[1:]), jnp.float32)
    for j in range(step):
        acc = acc + full[:, j]
    return acc, _fold(rows[groups * step :])


def _multi_row_sum(rows: jax.Array) -> jax.Array:
    """torch's ``multi_row_sum``: a 4-level cascade over the rows (axis 0) of ``rows``.

    Level 0 adds ``2**p`` consecutive rows (``p = max(4, ceil_log2(rows) // 4)``),
    each full chunk is added into level 1, and every ``2**p`` level-1 chunks into
    level 2, and so on; the leftovers of every level are added at the end.
    """
    size = rows.shape[0]
    ceil_log2 = 1 if size <= 2 else (size - 1).bit_length()
    step = 1 << max(4, ceil_log2 // _LEVELS)
    level0, tail = _fold_groups(rows, step)
    level1, rest1 = _fold_groups(level0, step)
    level2, rest2 = _fold_groups(level1, step)
    return ((tail + rest1) + rest2) + _fold(level2)


def _row_sum(x: jax.Array) -> jax.Array:
    """torch's ``row_sum``: 4 interleaved cascades (ILP), the tail, then the 4 partial sums."""
    size = x.shape[0]
    rows = size // _ILP
    partial = _multi_row_sum(x[: rows * _ILP].reshape(rows, _ILP, *x.shape[1:]))
    total = partial[0]
    for i in range(rows * _ILP, size):
        total = total + x[i]
    for k in range(1, _ILP):
        total = total + partial[k]
    return total


def _serial_sum(x: jax.Array) -> jax.Array:
    """torch's single-thread float32 sum of a contiguous vector (``vectorized_inner_sum``)."""
    n = x.shape[0]
    if n < _LANES:
        return _row_sum(x)
    vectors = n // _LANES
    lanes = _row_sum(x[: vectors * _LANES].reshape(vectors, _LANES))
    total = jnp.float32(0)
    for k in range(vectors * _LANES, n):
        total = total + x[k]
    for k in range(_LANES):
        total = total + lanes[k]
    return total


def torch_mean(x: jax.Array, *, threads: int = 1) -> jax.Array:
    """The float32 mean of a vector, summed in the order of ``torch.mean`` on CPU.

    bitsandbytes' double-quantisation offset is ``absmax.mean()``, a float32
    torch reduction whose rounding depends on its summation order. On CPU torch
    sums a contiguous vector as 8-lane vectors, 4 of them interleaved, each lane
    a 4-level cascade (``aten/src/ATen/native/cpu/SumKernel.cpp``), then divides
    by ``n``. Vectors of 32768 values or more are split across ``threads``
    (``torch.get_num_threads()``) contiguous chunks whose sums are then summed
    the same way; other devices (CUDA) reduce in yet another order, and their
    offsets can differ from this one by an ulp or so.

    Args:
      x: float32 vector.
      threads: torch's thread count to emulate (matters only for ``x.size >= 32768``).

    Returns:
      A float32 scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> from lowrank_jax.quant.blockwise import torch_mean
      >>> float(torch_mean(jnp.arange(10, dtype=jnp.float32)))
      4.5
    """
    x = jnp.asarray(x, jnp.float32).reshape(-1)
    n = x.shape[0]
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"`threads` must be a positive int, got {threads!r}")
    if n < _GRAIN or threads == 1:
        total = _serial_sum(x)
    else:
        used = min(threads, -(-n // _GRAIN))
        chunk = -(-n // used)
        sums = [_serial_sum(x[t * chunk : min(n, (t + 1) * chunk)]) for t in range(used) if t * chunk < n]
        sums += [jnp.float32(0)] * (threads - len(sums))
        total = _serial_sum(jnp.stack(sums))
    return true_divide(total, jnp.float32(n))  # torch: sum.div_(n), one rounding


def dequantize_node(q, node_type: type, dequantize_one, dtype, out_sharding=None) -> jax.Array:
    """Checks ``q`` and ``dtype``, then ``dequantize_one(q, dtype=dtype)`` mapped over ``q.batch_shape``
    (layers quantised with ``jax.vmap``), jitted; shared by the 4-bit and int8 nodes."""
    if not isinstance(q, node_type):
        article = "an" if node_type.__name__[0] in "AEIOU" else "a"
        raise TypeError(f"`q` must be {article} {node_type.__name__}, got {type(q).__name__}")
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"`dtype` must be a floating dtype, got {dtype}")
    return _dequantize_stacked(q, dequantize_one, dtype, out_sharding)


@functools.partial(jax.jit, static_argnames=("dequantize_one", "dtype", "out_sharding"))
def _dequantize_stacked(q, dequantize_one, dtype, out_sharding) -> jax.Array:
    fn = functools.partial(dequantize_one, dtype=dtype)
    for _ in q.batch_shape:
        fn = jax.vmap(fn)
    return with_auto_axes(fn, (q,), out_sharding)
