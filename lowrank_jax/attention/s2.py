r"""S2-Attn, the shifted sparse attention of LongLoRA, on ``(BTNH)`` arrays.

Shape letters as in :func:`jax.nn.dot_product_attention`: B batch, T query
length, S key/value length (S2-Attn is self-attention, so S = T), N query
heads, K key/value heads (grouped-query attention when K < N, N % K == 0),
H head dim; G is the group size (``T % G == 0``, G even) and ``m = T / G``.

The pattern. The heads split in two halves, ``n < N // 2`` ("plain") and
``n >= N // 2`` ("shifted"; with odd N the shifted half is the larger one, as
in the reference's ``qkv[:, num_heads // 2:]``). Query ``i`` attends to key
``j`` when (causal case)

.. math::

    \text{plain:}\quad & \lfloor i/G \rfloor = \lfloor j/G \rfloor,\; j \le i \\
    \text{shifted, roll:}\quad & \lfloor r(i)/G \rfloor = \lfloor r(j)/G \rfloor,\;
        r(j) \le r(i), \qquad r(i) = (i - G/2) \bmod T \\
    \text{shifted, no\_wrap:}\quad & \lfloor (i + G/2)/G \rfloor = \lfloor (j + G/2)/G \rfloor,\; j \le i

and, over the allowed set :math:`A_i`,
:math:`o_i = \sum_{j \in A_i} \mathrm{softmax}_j(s\, q_i \cdot k_j)\, v_j` with
``s = scale = 1/sqrt(H)`` by default (softmax in float32).

* ``"roll"`` is exactly the reference's roll-based computation
  (``forward_noflashattn`` of LongLoRA's ``llama_attn_replace.py``): the
  shifted heads of q, k and v are rolled by ``-G/2`` along the sequence,
  attention runs causally inside each of the ``m`` groups of G tokens, and the
  outputs are rolled back by ``+G/2``. The roll wraps around: the last group
  holds tokens ``T-G/2 .. T-1`` followed by ``0 .. G/2-1``, so with
  ``is_causal=True`` the first G/2 tokens attend to the last G/2 tokens (the
  future). That leak is reproduced on purpose; use it to match the reference.
* ``"no_wrap"`` (the default) is the partition of the reference's flash path
  (``forward_flashattn``: ``cu_seqlens`` at ``0, G/2, 3G/2, ..., T-G/2, T`` for
  the shifted heads): groups ``[0, G/2), [G/2, 3G/2), ..., [T-G/2, T)``, never
  wrapping, so with ``is_causal=True`` no token attends to a later one. One
  documented difference: when ``G == T`` (a single group) there is nothing to
  shift between, and ``"no_wrap"`` is plain full attention on every head
  (the flash path would cut the shifted heads' context in two halves).

Masks and padding. ``mask`` (broadcastable to ``(BNTS)``) is read at the
(query, key) positions it names and intersected with the pattern. (The
reference's roll path instead adds the first ``G x G`` block of its 4-D mask
to every group, so it ignores padding after the first group.) A mask that
contains the causal triangle, as the LLaMA model's padding mask does, therefore
removes the ``"roll"`` variant's wrapped links; ``key_value_seq_lengths``
masks keys only and keeps them. T must be a multiple of G: S2-Attn raises a
``ValueError`` with the numbers rather than padding silently (see
:func:`resolve_group_size`).

Cost. The shifted heads of q, k and v are rolled by ``-G/2`` and attention
runs per group on ``[B * m, G, N, H]`` reshapes, delegated to
:func:`jax.nn.dot_product_attention` (so ``implementation`` selects its
backend): one call over all heads for ``"roll"``; for ``"no_wrap"`` one call
for groups ``0 .. m-2`` and two small ones for the last group (plain heads
whole, shifted heads as two halves of G/2), so neither variant needs a mask
of its own. No ``T x T`` score matrix exists, and the score FLOPs and memory
are ``G/T`` of full attention (slightly less for ``"no_wrap"``). A user
``mask`` is read only on its diagonal blocks.

References:
  Chen et al, `LongLoRA: Efficient Fine-tuning of Long-Context Large Language
  Models <https://arxiv.org/abs/2309.12307>`_, 2023.
Reference implementation matched: ``llama_attn_replace.py`` of
dvlab-research/LongLoRA (``forward_noflashattn`` for ``"roll"``, the
``cu_q_lens`` construction of ``forward_flashattn`` for ``"no_wrap"``); tests
transliterate both and compare outputs and VJPs with a masked-softmax
reference.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["S2Attention", "VARIANTS", "resolve_group_size", "s2_attention", "s2_mask"]

#: The two S2-Attn variants: ``"no_wrap"`` (default, never attends to a later
#: token when causal) and ``"roll"`` (the reference's roll, which wraps around).
VARIANTS = ("no_wrap", "roll")


def resolve_group_size(seq_len: int, group_size: int | None = None, group_size_ratio: float = 0.25) -> int:
    """The group size G for a sequence of ``seq_len`` tokens, validated.

    ``group_size`` wins when given; otherwise ``G = int(seq_len * group_size_ratio)``
    as in the reference (``group_size = int(q_len * group_size_ratio)``).

    Raises:
      ValueError: G odd or below 2 (the shift is G/2), G > T, or T not a multiple
        of G. S2-Attn does not pad by itself: pad the sequence to a multiple of G
        and mask the padded keys (``mask`` or ``key_value_seq_lengths``). With
        the causal ``"no_wrap"`` variant padding at the end never reaches a real
        token, so real tokens get exactly the unpadded result for the same G.

    Example:
      >>> from lowrank_jax.attention import resolve_group_size
      >>> resolve_group_size(8192), resolve_group_size(8192, group_size=1024)
      (2048, 1024)
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len <= 0:
        raise ValueError(f"the sequence length must be a positive integer, got {seq_len!r}")
    if group_size is None:
        if (isinstance(group_size_ratio, bool) or not isinstance(group_size_ratio, (int, float))
                or not 0 < group_size_ratio <= 1):
            raise ValueError(f"`group_size_ratio` must be in (0, 1], got {group_size_ratio!r}")
        g = int(seq_len * group_size_ratio)
        origin = f" (G = int(T * group_size_ratio) = int({seq_len} * {group_size_ratio}))"
    else:
        if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size <= 0:
            raise ValueError(f"`group_size` must be a positive integer, got {group_size!r}")
        g, origin = int(group_size), ""
    if g < 2 or g % 2:
        raise ValueError(f"the group size must be even and at least 2 (the shift is G/2), got G={g}{origin}")
    if g > seq_len:
        raise ValueError(f"the group size G={g}{origin} exceeds the sequence length T={seq_len}")
    if seq_len % g:
        padded = -(-seq_len // g) * g
        raise ValueError(
            f"sequence length T={seq_len} is not a multiple of the group size G={g}{origin}; pad the sequence "
            f"to {padded} tokens and mask the padding (`mask` or `key_value_seq_lengths`)")
    return g


class _Plan(NamedTuple):
    """How to compute S2-Attn with grouped calls.

    Heads ``[split, N)`` are rolled by ``-shift`` along the sequence (the others
    are not); then each segment ``(offset, length, parts)`` of the rolled
    sequence is computed by one attention call per part ``(group, lo, hi)``:
    heads ``[lo, hi)``, cut into groups of ``group`` tokens.
    """

    split: int
    shift: int
    segments: tuple[tuple[int, int, tuple[tuple[int, int, int], ...]], ...]


def _plan(seq_len: int, num_heads: int, group: int, variant: str) -> _Plan:
    split = num_heads // 2
    if variant == "roll":
        return _Plan(split, group // 2, ((0, seq_len, ((group, 0, num_heads),)),))
    if seq_len == group:  # one group: nothing to shift between (see the module docstring)
        return _Plan(num_heads, 0, ((0, seq_len, ((group, 0, num_heads),)),))
    # rolled like "roll", but the wrapped last group [T-G/2 .. T-1, 0 .. G/2-1] of the shifted heads is cut
    # into its two halves: their groups are [G/2, 3G/2), ..., [T-3G/2, T-G/2), [T-G/2, T), [0, G/2)
    last = ((group, 0, split),) if split else ()
    last += ((group // 2, split, num_heads),)
    return _Plan(split, group // 2, ((0, seq_len - group, ((group, 0, num_heads),)), (seq_len - group, group, last)))


def _positions(plan: _Plan, seq_len: int, offset: int, length: int, group: int, shifted: bool) -> np.ndarray:
    """Original positions ``[m, g]`` of the members of each group of a segment."""
    pos = np.arange(offset, offset + length)
    if shifted:
        pos = (pos + plan.shift) % seq_len
    return pos.reshape(length // group, group)


def s2_mask(seq_len: int, num_heads: int, *, group_size: int | None = None, group_size_ratio: float = 0.25,
            variant: str = "no_wrap", is_causal: bool = True) -> np.ndarray:
    """The explicit ``[N, T, T]`` boolean pattern (query, key) that :func:`s2_attention` computes.

    For inspection and tests only (it is ``O(T^2)``); :func:`s2_attention`
    never builds it.

    Example (T=8, G=4: head 0 plain, head 1 shifted; ``"roll"`` lets tokens 0
    and 1 see tokens 6 and 7):
      >>> from lowrank_jax.attention import s2_mask
      >>> print(s2_mask(8, 2, group_size=4, variant="roll")[1].astype(int))
      [[1 0 0 0 0 0 1 1]
       [1 1 0 0 0 0 1 1]
       [0 0 1 0 0 0 0 0]
       [0 0 1 1 0 0 0 0]
       [0 0 1 1 1 0 0 0]
       [0 0 1 1 1 1 0 0]
       [0 0 0 0 0 0 1 0]
       [0 0 0 0 0 0 1 1]]
    """
    _check_variant(variant)
    g = resolve_group_size(seq_len, group_size, group_size_ratio)
    plan = _plan(seq_len, num_heads, g, variant)
    out = np.zeros((num_heads, seq_len, seq_len), bool)
    for offset, length, parts in plan.segments:
        for group, lo, hi in parts:
            local = np.tril(np.ones((group, group), bool)) if is_causal else np.ones((group, group), bool)
            for head in range(lo, hi):
                pos = _positions(plan, seq_len, offset, length, group, head >= plan.split)
                for members in pos:
                    out[head, members[:, None], members[None, :]] = local
    return out


def _check_variant(variant):
    if variant not in VARIANTS:
        raise ValueError(f"`variant` must be one of {VARIANTS}, got {variant!r}")


def _ensure_4d(x, name: str, letters: str):
    if x.ndim == 3:
        return x[None]
    if x.ndim != 4:
        raise ValueError(f"`{name}` must be ({letters}) or ({letters[1:]}), got shape {x.shape}")
    return x


def _dot_product_attention(query, key, value, mask, is_causal, scale, implementation):
    # jax promotes bf16 logits to f32 inside; run that step under standard promotion so the forward pass
    # also works under strict dtype promotion (jax's bf16 backward still needs standard promotion, as for
    # the LLaMA model's default attention).
    with jax.numpy_dtype_promotion("standard"):
        return jax.nn.dot_product_attention(query, key, value, mask=mask, scale=scale, is_causal=is_causal,
                                            implementation=implementation)


def _block_mask(mask, kv_valid, plan: _Plan, seq_len: int, batch: int, num_heads: int, offset: int, length: int,
                group: int, lo: int, hi: int):
    """The user mask and key validity on the diagonal blocks of one call: ``[B * m, 1 | hi - lo, g, g]``."""
    if mask is None and kv_valid is None:
        return None
    m = length // group
    halves = [(a, b) for a, b in ((lo, min(hi, plan.split)), (max(lo, plan.split), hi)) if a < b]
    blocks = []
    for a, b in halves:
        pos = _positions(plan, seq_len, offset, length, group, a >= plan.split)
        out = None
        if mask is not None:
            sub = mask[:, a:b] if mask.shape[1] == num_heads else mask
            qi = pos[:, :, None] if mask.shape[2] > 1 else np.zeros((m, group, 1), np.int32)
            ki = pos[:, None, :] if mask.shape[3] > 1 else np.zeros((m, 1, group), np.int32)
            blk = sub[:, :, qi, ki]                                          # [Bm, n, m, g, g]
            blk = jnp.broadcast_to(blk, (batch,) + blk.shape[1:])
            out = jnp.moveaxis(blk, 2, 1).reshape(batch * m, blk.shape[1], group, group)
        if kv_valid is not None:
            valid = kv_valid[:, pos].reshape(batch * m, 1, 1, group)
            out = valid if out is None else out & valid
        blocks.append((out, b - a))
    if len(blocks) == 1:
        return blocks[0][0]
    return jnp.concatenate([jnp.broadcast_to(x, (x.shape[0], n) + x.shape[2:]) for x, n in blocks], axis=1)


def _roll_heads(x, split: int, shift: int):
    """Rolls heads ``[split, ...)`` of ``x (BTNH)`` by ``shift`` along the sequence."""
    if not shift or split >= x.shape[2]:
        return x
    rolled = jnp.roll(x[:, :, split:], shift, axis=1)
    return rolled if split == 0 else jnp.concatenate([x[:, :, :split], rolled], axis=2)


def s2_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    group_size: int | None = None,
    group_size_ratio: float = 0.25,
    variant: str = "no_wrap",
    is_causal: bool = True,
    mask: jax.Array | None = None,
    scale: float | None = None,
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
    implementation: str | None = None,
) -> jax.Array:
    r"""Shifted sparse attention (S2-Attn) of LongLoRA; see the module docstring for the pattern.

    .. math::

        o_i = \sum_{j \in A_i} \mathrm{softmax}_j\!\left(s\, q_i \cdot k_{\kappa(n), j}\right) v_{\kappa(n), j},
        \qquad \kappa(n) = \lfloor n K / N \rfloor

    where :math:`A_i` is query ``i``'s group (shifted by G/2 on heads
    ``n >= N // 2``), intersected with ``j <= i`` when causal and with ``mask``.
    Not jitted itself (it composes inside the caller's ``jit``); ``group_size``
    and the other options are static Python values.

    Args:
      query: ``(BTNH)`` or ``(TNH)``, after RoPE.
      key: ``(BSKH)`` or ``(SKH)`` with ``S == T`` and ``N % K == 0``; the K heads
        are not repeated (grouped-query attention is native).
      value: the same shape and dtype as ``key``.
      group_size: G; default ``int(T * group_size_ratio)``. Must be even and divide T.
      group_size_ratio: G / T when ``group_size`` is ``None``; the paper's 1/4.
      variant: ``"no_wrap"`` (default; never attends to a later token when
        causal) or ``"roll"`` (the reference's roll, wrapping around).
      is_causal: causal attention inside each group (the reference is always causal).
      mask: optional boolean mask broadcastable to ``(BNTS)`` (``True`` = attend),
        e.g. the ``(B1TS)`` padding mask of a LLaMA forward pass; it is
        intersected with the S2 pattern and only its diagonal blocks are read.
      scale: logit scale; default ``1/sqrt(H)``.
      query_seq_lengths: optional ``int32 (B)``; outputs of later queries are zero
        (as in :func:`jax.nn.dot_product_attention`).
      key_value_seq_lengths: optional ``int32 (B)``; later keys are masked (right
        padding, in ``O(T G)`` memory instead of a ``(B1TS)`` mask).
      implementation: the backend of :func:`jax.nn.dot_product_attention` used on
        each group: ``None`` (XLA), ``"xla"`` or ``"cudnn"``.

    Returns:
      The attention output, shaped and typed like ``query``. A query row with no
      allowed key (e.g. padding under a mask) gets a finite, meaningless value.

    Raises:
      ValueError: bad ranks, shapes or dtypes (naming the shapes), ``S != T``,
        ``N % K != 0``, an odd G or a T that G does not divide, or an unknown variant.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lowrank_jax.attention import s2_attention
      >>> q = jax.random.normal(jax.random.key(0), (2, 64, 4, 16))   # B T N H
      >>> kv = jax.random.normal(jax.random.key(1), (2, 64, 2, 16))  # B S K H
      >>> s2_attention(q, kv, kv, group_size=16).shape
      (2, 64, 4, 16)
      >>> full = jax.nn.dot_product_attention(q, kv, kv, is_causal=True)
      >>> bool(jnp.allclose(s2_attention(q, kv, kv, group_size=64), full, atol=1e-5))  # G == T
      True

    References:
      Chen et al, `LongLoRA: Efficient Fine-tuning of Long-Context Large Language
      Models <https://arxiv.org/abs/2309.12307>`_, 2023.
    """
    _check_variant(variant)
    if implementation not in (None, "xla", "cudnn"):
        raise ValueError(f"`implementation` must be None, 'xla' or 'cudnn', got {implementation!r}")
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    unbatched = query.ndim == 3
    if key.ndim != query.ndim or value.ndim != query.ndim:
        raise ValueError(f"`query`, `key` and `value` must have the same rank, got shapes "
                         f"{query.shape}, {key.shape}, {value.shape}")
    query, key, value = (_ensure_4d(x, n, l) for x, n, l in ((query, "query", "BTNH"), (key, "key", "BSKH"),
                                                              (value, "value", "BSKH")))
    b, t, n, h = query.shape
    _, s, k, _ = key.shape
    if key.shape[0] != b or key.shape[3] != h:
        raise ValueError(f"`key` (BSKH) {key.shape} must have the batch size B={b} and head dim H={h} of "
                         f"`query` (BTNH) {query.shape}")
    if value.shape != key.shape:
        raise ValueError(f"`value` shape {value.shape} must equal `key` shape {key.shape}")
    if not (query.dtype == key.dtype == value.dtype) or not jnp.issubdtype(query.dtype, jnp.floating):
        raise ValueError(f"`query`, `key` and `value` must share one floating dtype, got "
                         f"{query.dtype}, {key.dtype}, {value.dtype}")
    if s != t:
        raise ValueError(f"S2-Attn is self-attention: the key length S={s} must equal the query length T={t} "
                         f"(query {query.shape}, key {key.shape}); decode with a KV cache uses full attention")
    if n % k:
        raise ValueError(f"the number of query heads N={n} must be a multiple of the key/value heads K={k} "
                         f"(query {query.shape}, key {key.shape})")
    g = resolve_group_size(t, group_size, group_size_ratio)

    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            raise ValueError(f"`mask` must be boolean (True = attend), got dtype {mask.dtype}")
        if mask.ndim > 4:
            raise ValueError(f"`mask` must broadcast to (BNTS) = {(b, n, t, s)}, got shape {mask.shape}")
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        if any(d not in (1, full) for d, full in zip(mask.shape, (b, n, t, s))):
            raise ValueError(f"`mask` shape {mask.shape} does not broadcast to (BNTS) = {(b, n, t, s)}")
    lengths = {}
    for name, x in (("query_seq_lengths", query_seq_lengths), ("key_value_seq_lengths", key_value_seq_lengths)):
        if x is not None:
            x = jnp.asarray(x)
            if x.shape != (b,) or not jnp.issubdtype(x.dtype, jnp.integer):
                raise ValueError(f"`{name}` must be an integer array of shape (B,) = ({b},), "
                                 f"got {x.dtype} {x.shape}")
            lengths[name] = x
    kv_valid = None
    if "key_value_seq_lengths" in lengths:
        kv_valid = jnp.arange(t)[None, :] < lengths["key_value_seq_lengths"][:, None]

    plan = _plan(t, n, g, variant)
    rep = n // k
    if plan.split % rep:
        # the head split cuts a key/value group (e.g. N=9, K=3): give every query head its own kv head
        # (the reference repeats kv heads before rolling, too)
        key, value = (x[:, :, np.arange(n) // rep] for x in (key, value))
        rep = 1
    q = _roll_heads(query, plan.split, -plan.shift)
    kr = _roll_heads(key, plan.split // rep, -plan.shift)
    vr = _roll_heads(value, plan.split // rep, -plan.shift)
    segments = []
    for offset, length, parts in plan.segments:
        outs = []
        for group, lo, hi in parts:
            def cut(x, first, last):  # [B, length, heads, H] -> [B * m, group, heads, H]
                return x[:, offset:offset + length, first:last].reshape(b * (length // group), group, last - first, h)

            block_mask = _block_mask(mask, kv_valid, plan, t, b, n, offset, length, group, lo, hi)
            out = _dot_product_attention(cut(q, lo, hi), cut(kr, lo // rep, hi // rep), cut(vr, lo // rep, hi // rep),
                                         block_mask, is_causal, scale, implementation)
            outs.append(out.reshape(b, length, hi - lo, h))
        segments.append(outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2))
    out = segments[0] if len(segments) == 1 else jnp.concatenate(segments, axis=1)
    out = _roll_heads(out, plan.split, plan.shift)
    if "query_seq_lengths" in lengths:
        valid = jnp.arange(t)[None, :] < lengths["query_seq_lengths"][:, None]
        out = out * valid[:, :, None, None].astype(out.dtype)
    return out[0] if unbatched else out


@dataclasses.dataclass(frozen=True)
class S2Attention:
    """:func:`s2_attention` with bound options, as a hashable ``attention_fn``.

    Equal options give equal (and equally hashed) objects, so a frozen model
    config holding one (``LlamaConfig(attention_fn=S2Attention())``) stays a
    reusable static ``jit`` argument; a ``functools.partial`` would not.
    Called as ``fn(query, key, value, *, mask=None, is_causal=True, ...)``.

    Example:
      >>> from lowrank_jax.attention import S2Attention
      >>> S2Attention(group_size_ratio=0.25) == S2Attention()
      True
    """

    group_size: int | None = None
    group_size_ratio: float = 0.25
    variant: str = "no_wrap"
    implementation: str | None = None

    def __post_init__(self):
        _check_variant(self.variant)
        if self.group_size is not None:
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2 \
                    or self.group_size % 2:
                raise ValueError(f"`group_size` must be an even integer >= 2, got {self.group_size!r}")
        elif (isinstance(self.group_size_ratio, bool) or not isinstance(self.group_size_ratio, (int, float))
              or not 0 < self.group_size_ratio <= 1):
            raise ValueError(f"`group_size_ratio` must be in (0, 1], got {self.group_size_ratio!r}")
        if self.implementation not in (None, "xla", "cudnn"):
            raise ValueError(f"`implementation` must be None, 'xla' or 'cudnn', got {self.implementation!r}")

    def __call__(self, query, key, value, *, mask=None, is_causal: bool = True, scale: float | None = None,
                 query_seq_lengths=None, key_value_seq_lengths=None) -> jax.Array:
        return s2_attention(query, key, value, group_size=self.group_size, group_size_ratio=self.group_size_ratio,
                            variant=self.variant, is_causal=is_causal, mask=mask, scale=scale,
                            query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
                            implementation=self.implementation)
