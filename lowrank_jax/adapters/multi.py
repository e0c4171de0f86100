r"""Many LoRA adapters on one base model: a bank, and mixed batches where each example names its adapter.

For example ``i`` of a batch with adapter index ``k_i`` (``-1``: the base model alone):

.. math:: y_i = x_i W + [k_i \ge 0] \, ((x_i A_{k_i}) \odot s_{k_i}) B_{k_i}

with ``A_k: [in, R]``, ``B_k: [R, out]`` padded to the bank's rank ``R`` and ``s_k: [R]`` the
per-column scale: ``alpha_k / r_k`` (rsLoRA ``alpha_k / sqrt(r_k)``) on the adapter's ``r_k`` columns
and exactly ``0`` on the padded ones (and on all of a target the adapter does not have), so padding
never contributes, whatever the padded entries hold, and receives exactly zero gradient.

Two execution paths give the same numbers:

* ``"gather"`` (punica's BGMV): gather each example's ``A``, ``B`` and ``s``, two batched einsums;
* ``"ragged"`` (punica's SGMV): sort the examples by adapter and run ``jax.lax.ragged_dot`` over
  the contiguous segments (group sizes), as SkyRL-tx does; base rows fall outside every group.

``path="auto"`` picks by the measurement in ``benchmarks/bench_multi_lora.py`` (one SmolLM2
projection, 576 -> 576, rank 8, 8 adapters): on CPU XLA expands ``ragged_dot`` into a dense product
per group, 5.4-8.8x the gather's FLOPs and 1.2-8.4x its time for batch 1-64 at 1 (decode) and 128
(prefill) tokens per example: no crossover, so the gather is chosen on CPU. On GPU/TPU, where
``ragged_dot`` is a grouped-matmul kernel, segments are chosen from :data:`RAGGED_MIN_TOKENS` tokens
per example (prefill, training) and the gather below (decode): punica's split, not measured here.

References: Sheng et al., `S-LoRA <https://arxiv.org/abs/2311.03285>`_, 2023; Chen et al.,
`Punica <https://arxiv.org/abs/2310.18547>`_ (https://github.com/punica-ai/punica), 2023; Ye et al.,
`mLoRA <https://arxiv.org/abs/2312.02515>`_ (https://github.com/TUDB-Labs/mLoRA), 2023; peft's mixed
batch (``model(x, adapter_names=[...])``, ``"__base__"``; ``peft/tuners/lora/layer.py``
``_mixed_batch_forward``), which ``tests/fixtures/make_peft_mixed_batch.py`` records.

Bank tree, per target (``*stack``: scanned layer axes, ``N``: capacity)::

    bank_a      [*stack, N, *in, R]     trainable   Leaf(("stack", "adapter", "in", "rank"))
    bank_b      [*stack, N, R, *out]    trainable   Leaf(("stack", "adapter", "rank", "out"))
    bank_scale  [*stack, N, R]          frozen      Leaf(("stack", "adapter", "rank"), trainable=False)

An empty slot has zero factors and a ``NaN`` scale: a batch row that names it (or an index out of
range) raises a ``ValueError`` when the index is concrete and gives ``NaN`` rows under ``jit``,
never a silent base-model answer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import base
from lowrank_jax.adapters.scale import lora_factor_names, target_scale
from lowrank_jax.mesh_ops import explicit_spec, reshard_to

__all__ = ["Bank", "RAGGED_MIN_TOKENS", "bank_shardings", "check_index", "multi_lora", "mixed_delta"]

#: Leaf names of a bank target.
A, B, S = "bank_a", "bank_b", "bank_scale"
ROLES = {
    A: base.Leaf(("stack", "adapter", "in", "rank")),
    B: base.Leaf(("stack", "adapter", "rank", "out")),
    S: base.Leaf(("stack", "adapter", "rank"), trainable=False),
}
PATHS = ("auto", "gather", "ragged")
#: On accelerators, ``path="auto"`` runs segments (``ragged_dot``) from this many tokens per example
#: (punica's prefill/decode split; there is no accelerator on this machine to measure it).
RAGGED_MIN_TOKENS = 16
_OFFSET_INITS = ("pissa", "olora", "lora_ga")


def _choose(path: str, tokens_per_example: int) -> str:
    if path != "auto":
        return path
    if jax.default_backend() == "cpu":
        return "gather"  # measured: CPU ragged_dot costs one dense product per group
    return "ragged" if tokens_per_example >= RAGGED_MIN_TOKENS else "gather"


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_index(adapter_index, bank_params_or_scale=None, capacity: int | None = None) -> np.ndarray:
    """``adapter_index`` as an int32 numpy vector, after checking every entry is ``-1`` or an occupied slot.

    ``bank_params_or_scale``: a bank tree, or one target's ``bank_scale`` (``[*stack, N, R]``); with it
    empty slots (``NaN`` scale) are refused too. Raises ``ValueError`` naming the bad entries.
    """
    ids = np.asarray(adapter_index)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"`adapter_index` must be a 1-D integer vector (one adapter per example), got {ids.dtype} {ids.shape}")
    scale = bank_params_or_scale
    if scale is not None and not hasattr(scale, "shape"):
        scale = next(leaves[S] for _, leaves in tree_lib.adapter_paths(scale, frozenset(ROLES)))
    if scale is not None:
        capacity = scale.shape[-2]
    if capacity is not None:
        bad = sorted({int(i) for i in ids if i < -1 or i >= capacity})
        if bad:
            raise ValueError(f"adapter index {bad} out of range for a bank of capacity {capacity} (use -1 for the base model)")
    if scale is not None and _is_concrete(scale):
        empty = np.isnan(np.asarray(scale).reshape(-1, *scale.shape[-2:])[0, :, 0])
        named = sorted({int(i) for i in ids if i >= 0 and empty[i]})
        if named:
            raise ValueError(f"adapter index {named} names an empty slot of the bank (occupied: {np.flatnonzero(~empty).tolist()})")
    return ids.astype(np.int32)


def mixed_delta(x, a, b, scale, ids, *, path: str = "gather"):
    r"""``delta_i = ((x_i A_{k_i}) * s_{k_i}) B_{k_i}`` for a batch, ``0`` where ``k_i = -1``.

    x: ``[batch, tokens, in]``; a: ``[N, in, R]``; b: ``[N, R, out]``; scale: ``[N, R]``; ids: ``[batch]``.
    ``path``: ``"gather"`` (BGMV) or ``"ragged"`` (SGMV through ``lax.ragged_dot``). Indices outside
    ``[-1, N)`` give ``NaN`` rows. Returns ``[batch, tokens, out]``.
    """
    n = a.shape[0]
    ids = base.replicated(ids.astype(jnp.int32))
    x_spec = explicit_spec(x)
    if x_spec is not None:
        # Explicit mesh: the bank is gathered (replicated) for the call; the gather keeps the batch sharding
        # of x, the segments run replicated (sorting examples across batch shards needs all of them).
        a, b, scale = base.replicated(a), base.replicated(b), base.replicated(scale)
        x = reshard_to(x, (x_spec[0], x_spec[1], None)) if path == "gather" else base.replicated(x)
    rows_spec = None if x_spec is None or path != "gather" else x_spec[0]
    adapted = (ids >= 0) & (ids < n)
    safe = jnp.where(adapted, ids, 0)
    s_rows = jnp.where(adapted[:, None], _rows(scale, safe, rows_spec), 0).astype(x.dtype)  # [batch, R]
    if path == "gather":
        t = jnp.einsum("bti,bir->btr", x, _rows(a, safe, rows_spec)) * s_rows[:, None, :]
        delta = jnp.einsum("btr,bro->bto", t, _rows(b, safe, rows_spec))
    elif path == "ragged":
        batch, tokens, _ = x.shape
        group = jnp.where(adapted, ids, n)  # base rows sort last, outside every group
        order = jnp.argsort(group, stable=True)
        sizes = jnp.zeros((n,), jnp.int32).at[safe].add(adapted.astype(jnp.int32)) * tokens
        xs = jnp.take(x, order, axis=0).reshape(batch * tokens, -1)
        out = None if x_spec is None else PartitionSpec()  # replicated operands (above)
        t = lax.ragged_dot(xs, a, sizes, out_sharding=out).reshape(batch, tokens, -1) * jnp.take(s_rows, order, axis=0)[:, None, :]
        ds = lax.ragged_dot(t.reshape(batch * tokens, -1), b, sizes, out_sharding=out).reshape(batch, tokens, -1)
        delta = jnp.take(ds, jnp.argsort(order), axis=0)
    else:
        raise ValueError(f"`path` must be one of {PATHS[1:]}, got {path!r}")
    bad = (ids < -1) | (ids >= n)
    return jnp.where(bad[:, None, None], jnp.asarray(jnp.nan, delta.dtype), delta)


def _rows(v, idx, batch_spec):
    """``v[idx]``: the adapter of each example; under an Explicit mesh sharded like the batch (``batch_spec``)."""
    if batch_spec is None:
        return jnp.take(v, idx, axis=0)
    return v.at[idx].get(out_sharding=PartitionSpec(batch_spec, *([None] * (v.ndim - 1))))


def _member_ranks(config: Mapping) -> list[int]:
    return [int(config["rank"]), *map(int, (config.get("rank_pattern") or {}).values())]


def _check_member(adapter, index: int) -> None:
    cfg = adapter.config
    if cfg.get("method") != "lora" or set(adapter.leaf_names) != {"a", "b"}:
        raise ValueError(f"multi_lora banks plain LoRA adapters (lrj.lora); adapter {index} is "
                         f"{cfg.get('method')!r} with leaves {sorted(adapter.leaf_names)}")
    if base.frozen_names(adapter):
        raise ValueError(f"adapter {index} freezes {sorted(base.frozen_names(adapter))}: a bank trains both factors")
    if str(cfg.get("init", "")).split("_niter_")[0] in _OFFSET_INITS:
        raise ValueError(f"adapter {index} has the offset init {cfg['init']!r}, which needs its own residual base; "
                         f"convert it with lrj.offset_to_plain_lora first")
    lora_factor_names(adapter)  # its roles are LoRA's


def _stack_axes(path: str, a_shape, b_shape, layouts) -> int:
    """The number of stacked (scan) axes of LoRA factors ``a: [*stack, *in, r]``, ``b: [*stack, r, *out]``."""
    r = a_shape[-1]
    fits = [s for s in range(min(len(a_shape), len(b_shape)) - 1)
            if tuple(a_shape[:s]) == tuple(b_shape[:s]) and b_shape[s] == r and len(a_shape) - 1 - s >= 1]
    if len(fits) == 1:
        return fits[0]
    given = tree_lib.given_layout(layouts, path)
    if given is not None and given.stack in fits:
        return given.stack
    raise ValueError(f"cannot tell the stacked axes of the LoRA factors at {path!r} (a {tuple(a_shape)}, b {tuple(b_shape)}, "
                     f"candidates {fits}); make the bank with `layouts=` (lrj.linen.kernel_layouts)")


class Bank(base.Adapter):
    """A fixed-capacity bank of LoRA adapters (:func:`multi_lora`): an :class:`lrj.Adapter` with
    ``call_args = {"adapter_index"}``, plus the functions that fill and read its slots."""

    __slots__ = ()

    @property
    def capacity(self) -> int:
        return int(self.config["capacity"])

    @property
    def rank(self) -> int:
        return int(self.config["rank"])

    def stack(self, params_list: Sequence[Any], adapters: Sequence[base.Adapter] | None = None):
        """The bank tree holding ``params_list[k]`` (trees of ``adapters[k]``, default the bank's members)
        in slot ``k``; later slots are empty. Raises ``ValueError`` when they do not fit (full bank, rank
        larger than the bank's, different base models)."""
        adapters = self._members(adapters, len(params_list))
        entries: dict[tuple, list] = {}
        for k, (adapter, params) in enumerate(zip(adapters, params_list)):
            for keys, leaves in tree_lib.adapter_paths(params, adapter.leaf_names):
                entries.setdefault(keys, [None] * len(params_list))[k] = (adapter, leaves)
        if not entries:
            raise ValueError("bank.stack got no LoRA targets (empty adapter trees)")
        out = {}
        for keys, slots in entries.items():
            out[keys] = self._target(tree_lib.path_str(keys), slots)
        return tree_lib.nest(out)

    def _members(self, adapters, count: int) -> list:
        if count > self.capacity:
            raise ValueError(f"the bank is full: {count} adapters for a capacity of {self.capacity}")
        if adapters is None:
            members = self.config["members"]
            if count > len(members):
                raise ValueError(f"{count} adapter trees for a bank of {len(members)} members: pass `adapters=` for the others")
            return [_ConfigOnly(c) for c in members[:count]]
        adapters = list(adapters)
        if len(adapters) != count:
            raise ValueError(f"{len(adapters)} adapters for {count} adapter trees")
        for i, adapter in enumerate(adapters):
            _check_member(adapter, i)
        return adapters

    def _target(self, path: str, slots: list):
        """One target's ``{bank_a, bank_b, bank_scale}`` from ``[(adapter, {"a", "b"}) or None]`` per slot."""
        present = [(k, s) for k, s in enumerate(slots) if s is not None]
        k0, (_, first) = present[0]
        stack = _stack_axes(path, first["a"].shape, first["b"].shape, self.layouts)
        a0, b0 = first["a"], first["b"]
        lead, ins, outs = tuple(a0.shape[:stack]), tuple(a0.shape[stack:-1]), tuple(b0.shape[stack + 1:])
        dtype = jnp.result_type(*(s[1][n] for _, s in present for n in "ab"))
        a_bank = jnp.zeros((*lead, self.capacity, *ins, self.rank), dtype)
        b_bank = jnp.zeros((*lead, self.capacity, self.rank, *outs), dtype)
        scale = np.full((*lead, self.capacity, self.rank), np.nan, np.float32)  # Python numbers: numpy is fine under jit
        scale[..., : len(slots), :] = 0.0  # occupied slots without this target: a zero delta
        for k, (adapter, leaves) in present:
            a, b = leaves["a"], leaves["b"]
            r = a.shape[-1]
            want_a, want_b = (*lead, *ins, r), (*lead, r, *outs)
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise ValueError(f"adapter {k} at {path!r} has factors a {tuple(a.shape)}, b {tuple(b.shape)}, but adapter {k0} "
                                 f"has a {tuple(a0.shape)}, b {tuple(b0.shape)}: are they for different base models?")
            if r > self.rank:
                raise ValueError(f"adapter {k} has rank {r} at {path!r}, more than the bank's rank {self.rank}; "
                                 f"make the bank with multi_lora(..., rank={r})")
            a_bank = a_bank.at[(Ellipsis, k) + (slice(None),) * len(ins) + (slice(0, r),)].set(jnp.asarray(a, dtype))
            b_bank = b_bank.at[(Ellipsis, k, slice(0, r)) + (slice(None),) * len(outs)].set(jnp.asarray(b, dtype))
            scale[..., k, :r] = target_scale(adapter.config, path, r)
        return {A: a_bank, B: b_bank, S: jnp.asarray(scale)}

    def put(self, bank_params, slot: int, params, adapter: base.Adapter | Mapping | None = None):
        """``bank_params`` with ``params`` (a tree of ``adapter``, or of a LoRA adapter with this config dict;
        default member ``slot``) in ``slot``: hot swap.

        Shapes do not change, so a jitted function of the bank does not recompile. The adapter's targets
        must be among the bank's (a target the bank lacks would be silently dropped: it raises).
        """
        self._check_slot(slot)
        if isinstance(adapter, Mapping):
            adapter = _ConfigOnly(dict(adapter))
        if adapter is None:
            if slot >= len(self.config["members"]):
                raise ValueError(f"slot {slot} has no member adapter in the bank's config: pass `adapter=`")
            adapter = _ConfigOnly(self.config["members"][slot])
        else:
            _check_member(adapter, slot)
        theirs = dict(tree_lib.adapter_paths(params, frozenset("ab")))
        ours = dict(tree_lib.adapter_paths(bank_params, frozenset(ROLES)))
        extra = sorted(tree_lib.path_str(k) for k in set(theirs) - set(ours))
        if extra:
            raise ValueError(f"the bank has no targets {extra[:4]}; its targets are fixed when it is made "
                             f"({sorted(tree_lib.path_str(k) for k in ours)[:4]} ...)")
        new = {}
        for keys, leaves in ours.items():
            stack = leaves[S].ndim - 2
            if keys in theirs:
                path = tree_lib.path_str(keys)
                one = self._target(path, [None] * slot + [(adapter, theirs[keys])])
                for n in (A, B):
                    if one[n].shape != leaves[n].shape:
                        raise ValueError(f"the adapter for slot {slot} gives {n} {one[n].shape} at {path!r}, the bank has "
                                         f"{leaves[n].shape}: is it for a different base model?")
                row = {n: _get(one[n], stack, slot) for n in ROLES}
            else:  # a target this adapter does not have: a zero delta
                row = {n: jnp.zeros_like(_get(v, stack, slot)) for n, v in leaves.items()}
            new[keys] = {n: _set(v, stack, slot, row[n]) for n, v in leaves.items()}
        return tree_lib.nest(new)

    def remove(self, bank_params, slot: int):
        """``bank_params`` with ``slot`` emptied (zero factors, ``NaN`` scale): naming it afterwards raises."""
        self._check_slot(slot)
        new = {}
        for keys, leaves in tree_lib.adapter_paths(bank_params, frozenset(ROLES)):
            stack = leaves[S].ndim - 2
            new[keys] = {n: _set(v, stack, slot, jnp.full_like(_get(v, stack, slot), jnp.nan if n == S else 0))
                         for n, v in leaves.items()}
        return tree_lib.nest(new)

    def unstack(self, bank_params, slot: int):
        """The LoRA tree (``{"a", "b"}`` per target, the adapter's own ranks) of ``slot``: its targets are
        those where its scale is nonzero, its rank there the number of nonzero scale columns."""
        self._check_slot(slot)
        out = {}
        for keys, leaves in tree_lib.adapter_paths(bank_params, frozenset(ROLES)):
            stack = leaves[S].ndim - 2
            s = np.asarray(_get(leaves[S], stack, slot)).reshape(-1, self.rank)[0]
            if np.isnan(s).any():
                raise ValueError(f"slot {slot} of the bank is empty")
            r = int(np.count_nonzero(s))
            if r:
                a, b = _get(leaves[A], stack, slot), _get(leaves[B], stack, slot)
                out[keys] = {"a": a[..., :r], "b": lax.slice_in_dim(b, 0, r, axis=stack)}
        return tree_lib.nest(out)

    def _check_slot(self, slot) -> None:
        if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)) or not 0 <= slot < self.capacity:
            raise ValueError(f"slot {slot!r} out of range for a bank of capacity {self.capacity}")


class _ConfigOnly(NamedTuple):
    """A LoRA member known by its config alone (a saved checkpoint's): enough for :func:`target_scale`."""

    config: dict
    leaf_names: frozenset = frozenset("ab")
    roles: dict = base.LORA_ROLES


def _get(v, stack: int, slot: int):
    return v[(slice(None),) * stack + (slot,)]


def _set(v, stack: int, slot: int, value):
    return v.at[(slice(None),) * stack + (slot,)].set(value.astype(v.dtype))


def multi_lora(adapters: Sequence[base.Adapter], capacity: int | None = None, *, rank: int | None = None,
               path: str = "auto", layouts=None) -> Bank:
    r"""A bank of LoRA adapters sharing one base model; each example of a batch names its adapter.

    .. math:: y_i = x_i W + ((x_i A_{k_i}) \odot s_{k_i}) B_{k_i}, \qquad k_i = \texttt{adapter\_index}[i] \;(-1: \text{base})

    Args:
      adapters: ``lrj.lora`` adapters (any ranks, alphas, rsLoRA, targets; equal dropout rates).
      capacity: number of slots (default ``len(adapters)``); the extra slots start empty and take
        adapters later with ``bank.put`` without recompiling.
      rank: the bank's rank ``R`` (default the largest of the members' ranks and rank patterns).
      path: ``"auto"``, ``"gather"`` (BGMV) or ``"ragged"`` (SGMV, ``lax.ragged_dot``).
      layouts: kernel layouts (default the first member's), for stacked (scan) kernels.

    Usage::

        bank = lrj.multi_lora([lora_r8, lora_r4])
        bank_params = bank.stack([params_r8, params_r4])
        y = lrj.linen.apply(model, bank, params, bank_params, x, adapter_index=jnp.array([0, 1, -1]))

    Raises ``ValueError`` for an empty list, a capacity below the member count, a non-LoRA member,
    offset inits, or different dropout rates.
    """
    adapters = list(adapters)
    if not adapters:
        raise ValueError("multi_lora needs at least one adapter")
    for i, adapter in enumerate(adapters):
        if not isinstance(adapter, base.Adapter):
            raise ValueError(f"adapter {i} is a {type(adapter).__name__}, not an lrj.Adapter")
        _check_member(adapter, i)
    capacity = len(adapters) if capacity is None else capacity
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < len(adapters):
        raise ValueError(f"`capacity` must be an integer >= the {len(adapters)} adapters, got {capacity!r}")
    max_rank = max(r for adapter in adapters for r in _member_ranks(adapter.config))
    rank = max_rank if rank is None else rank
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < max_rank:
        raise ValueError(f"`rank` must be an integer >= the largest member rank {max_rank}, got {rank!r}")
    if path not in PATHS:
        raise ValueError(f"`path` must be one of {PATHS}, got {path!r}")
    rates = sorted({float(a.config.get("dropout", 0.0)) for a in adapters})
    if len(rates) > 1:
        raise ValueError(f"the adapters of a bank share one dropout rate; got {rates}")
    layouts = adapters[0].layouts if layouts is None else layouts

    def init_fn(key, params):
        trees = [adapter.init(jax.random.fold_in(key, k), params) for k, adapter in enumerate(adapters)]
        return bank.stack(trees, adapters)

    def apply_fn(leaves, site: base.Site, x, y, *, path: str, dropout_key=None, adapter_index=None):
        if adapter_index is None:
            raise ValueError(f"a multi_lora bank needs the batch's `adapter_index=` (one entry per example, -1 for "
                             f"the base model) in lrj.linen.apply / lrj.nnx.apply; target {path!r}")
        if site.kind != "linear":
            raise NotImplementedError(f"multi_lora runs on linear layers; {path!r} is a {site.kind!r} site")
        a, b, scale = leaves[A], leaves[B], leaves[S]
        ins, outs = site.kernel.shape[: site.inputs], site.kernel.shape[site.inputs:]
        n = scale.shape[-2]
        if a.shape != (n, *ins, a.shape[-1]) or b.shape != (n, a.shape[-1], *outs):
            raise ValueError(f"bank leaves at {path!r} (a {a.shape}, b {b.shape}) do not fit the kernel {site.kernel.shape}: "
                             f"is the bank for a different base model?")
        ids = jnp.asarray(adapter_index)
        if ids.ndim != 1 or ids.shape[0] != x.shape[0]:
            raise ValueError(f"`adapter_index` must have one entry per example: shape {ids.shape} for inputs {x.shape} at {path!r}")
        if _is_concrete(adapter_index):
            check_index(adapter_index, scale if _is_concrete(scale) else None, capacity=n)
        x = base.dropout(dropout_key, x, rates[0])
        dtype = site.dtype or jnp.result_type(x, a, b)
        r, n_in, n_out = a.shape[-1], tree_lib.prod(ins), tree_lib.prod(outs)
        x3 = x.astype(dtype).reshape(x.shape[0], -1, n_in)
        chosen = _choose(bank_path, x3.shape[1])
        delta = mixed_delta(x3, a.astype(dtype).reshape(n, n_in, r), b.astype(dtype).reshape(n, r, n_out),
                            scale.astype(dtype), ids, path=chosen)
        return y + base.match_sharding(delta.reshape(y.shape).astype(y.dtype), y)

    def deltas(params, bank_params, slot):
        if slot is None:
            raise ValueError(f"a bank holds {capacity} adapters: merge one with bank.merge(params, bank_params, slot=k)")
        bank._check_slot(slot)
        lora_tree = bank.unstack(bank_params, slot)
        out = {}
        for keys, p, kernel, leaves in base.resolve_targets(lora_tree, params, frozenset("ab")):
            layout = base.derive_layout(p, tree_lib.shape_of(kernel), leaves["a"].shape, leaves["b"].shape)
            full = dict(tree_lib.adapter_paths(bank_params, frozenset(ROLES)))[keys]
            s = _get(full[S], full[S].ndim - 2, slot)[..., : leaves["a"].shape[-1]]  # [*stack, r]
            a = leaves["a"] * s.reshape(s.shape[:-1] + (1,) * (leaves["a"].ndim - s.ndim) + s.shape[-1:])
            out[keys] = (kernel, base.dense_delta(a, leaves["b"], layout, tree_lib.shape_of(kernel), 1.0))
        return out

    def merge_fn(params, bank_params, slot=None):
        """``W + s_k A_k B_k`` of slot ``slot`` (required: a bank holds several adapters)."""
        return base.additive_merge(lambda p, bp: deltas(p, bp, slot))[0](params, bank_params)

    def unmerge_fn(params, bank_params, slot=None):
        return base.additive_merge(lambda p, bp: deltas(p, bp, slot))[1](params, bank_params)

    def penalty_fn(params, bank_params):
        return jnp.zeros((), jnp.float32)

    bank_path = path
    config = {"method": "multi_lora", "capacity": capacity, "rank": rank, "path": path, "dropout": rates[0],
              "members": [dict(a.config) for a in adapters]}
    bank = Bank(init_fn, apply_fn, merge_fn, unmerge_fn, penalty_fn, frozenset(ROLES), config, dict(ROLES), layouts,
                frozenset({"adapter_index"}))
    return bank


def bank_shardings(bank_params, mesh, axis: str | tuple | None):
    """``NamedSharding``s that split every bank leaf's adapter axis over the mesh axis ``axis``
    (``None``: replicated). The other way, shardings inherited from the kernels, is
    ``lrj.adapter_shardings(params, bank_params, adapter=bank)`` (the adapter axis replicated)."""
    out = {}
    for keys, leaves in tree_lib.adapter_paths(bank_params, frozenset(ROLES)):
        stack = leaves[S].ndim - 2
        entry = {}
        for name, v in leaves.items():
            if axis is not None:
                size = math.prod(mesh.shape[a] for a in (axis if isinstance(axis, tuple) else (axis,)))
                if v.shape[stack] % size:
                    raise ValueError(f"capacity {v.shape[stack]} does not divide over mesh axis {axis!r} of size {size}")
            entry[name] = NamedSharding(mesh, PartitionSpec(*([None] * stack), axis))
        out[keys] = entry
    return tree_lib.nest(out)
