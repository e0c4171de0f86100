r"""LaMDA and LaMDA++: a frozen first projection, a trainable ``r x r`` core, a gradually frozen second projection.

Reference: Azizi, Kundu and Pedram, `LaMDA: Large Model Fine-Tuning via Spectrally Decomposed
Low-Dimensional Adaptation <https://arxiv.org/abs/2406.12832>`_, EMNLP Findings 2024. Official
code matched: https://github.com/ArminAzizi98/LaMDA (``lamda.py``: the adapter;
``custom_trainer.py``: ``gradual_freeze_B``), recorded in ``tests/fixtures/make_lamda.py``.

In Flax orientation (``W: [in, out]``; the official ``lora_A.weight = a.T``,
``sigma.weight = s.T``, ``lora_B.weight = b.T``):

.. math::
    y = x W + s_\alpha \, ((\mathrm{dropout}(x) A) S) B, \qquad s_\alpha = \alpha / r,
    \qquad \Delta W = s_\alpha A S B

``a: [in, r]`` is frozen adapter state (``Leaf(trainable=False)``: no gradient of it is ever
computed), ``s: [r, r]`` and ``b: [r, out]`` train. The official code is a peft LoRA
(``a`` kaiming-uniform, ``b = 0``) with ``sigma = nn.Linear(r, r, bias=False)`` (torch's default
init, ``U(-1/sqrt(r), 1/sqrt(r))``) inserted; our default init is the same. Because ``a`` is
frozen, the backward needs only ``r``-dimensional activations (``x A``), never ``x``: no
``[in, r]`` gradient and none of its ``O(tokens * in * r)`` FLOPs (``benchmarks/bench_lamda.py``).

The gradual freezing of ``b``'s rank components is an optax wrapper,
:func:`lrj.optim.lamda_freeze`. LaMDA++'s per-layer ranks: :func:`lamda_plus_ranks`.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import linalg
from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import base
from lowrank_jax.adapters.scale import target_scale

__all__ = ["lamda", "lamda_plus", "lamda_plus_ranks"]

ROLES = {
    "a": base.Leaf(("stack", "in", "rank"), trainable=False),
    "s": base.Leaf(("stack", "rank", "rank")),
    "b": base.Leaf(("stack", "rank", "out")),
}
_INITS = ("kaiming", "svd")


def _check_int(name: str, value, low: int = 1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}")
    return int(value)


@functools.partial(jax.jit, static_argnames=("r", "scale"))
def _svd_stack(w, *, r: int, scale: float):
    """Per matrix of ``w: [L, in, out]``: ``(U_r, diag(sigma_r) / scale, V_r^T)``, so ``scale * a s b`` is
    ``W``'s best rank-``r`` approximation (one SVD per matrix, with ``lax.map``)."""

    def one(w2):
        u, sv, vh = linalg.svd(w2, r)
        return u, jnp.diag(sv / scale), vh

    return jax.lax.map(one, w)


def lamda(rank: int = 8, alpha: float = 16.0, targets: tree_lib.Targets = r".*/kernel", max_steps: int | None = None, *,
          freeze_fraction: float = 0.3, dropout: float = 0.0, init: str = "kaiming",
          rank_pattern: Mapping[str, int] | None = None, layouts: Mapping[str, Any] | Callable | None = None,
          param_dtype: Any = None) -> base.Adapter:
    r"""LaMDA on the targeted kernels (see the module docstring for the math).

    Args:
      rank: ``r``, the size of the trainable core ``s: [r, r]``.
      alpha: the LoRA ``alpha``; the scale is peft LoRA's ``alpha / r`` (``adapters/scale.py``).
      targets: regex / list / callable on "/"-joined param paths, as in :func:`lrj.lora`.
      max_steps: the number of optimizer steps of the run (the official trainer's ``max_steps``);
        required: it sets the freezing schedule of :func:`lrj.optim.lamda_freeze`.
      freeze_fraction: the official ``eta`` (0.3): one more rank component of ``b`` freezes every
        ``freeze_fraction * max_steps`` steps; in ``(0, 1]``.
      dropout: on the adapter branch's input only, as the official ``lora_dropout(x)``.
      init: ``"kaiming"`` (the official code: ``a ~ U(-1/sqrt(in), 1/sqrt(in))`` as peft's
        ``lora_A``, ``s ~ U(-1/sqrt(r), 1/sqrt(r))`` as torch's ``nn.Linear``, ``b = 0``; the adapted
        model equals the base at step 0) or ``"svd"`` (the paper's, absent from its code: with
        ``W = U diag(sigma) V^T``, ``a = U_r``, ``s = diag(sigma_r) / (alpha / r)``, ``b = V_r^T``,
        so ``b``'s first rank components, the ones frozen first, are the largest singular
        directions). ``"svd"`` is an offset init like :func:`lrj.lora`'s ``"pissa"``: ``s A S B``
        is ``W``'s top-``r`` part at step 0, so train on the residual
        ``lrj.init_with_residual(adapter, key, params)`` (``W - s_alpha A S B``).
      rank_pattern: ``{regex: rank}`` overriding ``rank`` per path (first full match wins), as
        :func:`lrj.lora`'s; LaMDA++ (:func:`lamda_plus`) fills it from :func:`lamda_plus_ranks`.
      layouts: for N-D kernels, as in :func:`lrj.lora`.
      param_dtype: dtype of the leaves; default: the kernel's. (The official code casts ``s`` to
        bfloat16 because it trains in bfloat16; we follow the kernel.)

    Returns:
      An :class:`lrj.Adapter` with leaves ``a`` (frozen), ``s``, ``b`` per target.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lowrank_jax.adapters.lamda import lamda
      >>> params = {"params": {"proj": {"kernel": jnp.ones((6, 5))}}}
      >>> adapter = lamda(rank=2, alpha=4.0, targets=".*/kernel", max_steps=100)
      >>> jax.tree.map(jnp.shape, adapter.init(jax.random.key(0), params))
      {'params': {'proj': {'kernel': {'a': (6, 2), 'b': (2, 5), 's': (2, 2)}}}}
      >>> [name for name, leaf in adapter.roles.items() if not leaf.trainable]
      ['a']
    """
    rank = _check_int("rank", rank)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"`alpha` must be a positive number, got {alpha!r}")
    if max_steps is None:
        raise ValueError("`max_steps` is required: LaMDA freezes b's rank components on a schedule of "
                         "freeze_fraction * max_steps optimizer steps (the official trainer's max_steps)")
    max_steps = _check_int("max_steps", max_steps)
    if isinstance(freeze_fraction, bool) or not isinstance(freeze_fraction, (int, float)) or not 0.0 < freeze_fraction <= 1.0:
        raise ValueError(f"`freeze_fraction` must be in (0, 1], got {freeze_fraction!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}")
    if init not in _INITS:
        raise ValueError(f"`init` must be one of {_INITS}, got {init!r}")
    for pattern, r in (rank_pattern or {}).items():
        _check_int(f"rank_pattern[{pattern!r}]", r)
    dropout = float(dropout)
    names = frozenset(ROLES)
    config = dict(method="lamda", rank=rank, alpha=float(alpha), **tree_lib.targets_config(targets), rslora=False,
                  dropout=dropout, init=init, max_steps=max_steps, freeze_fraction=float(freeze_fraction),
                  rank_pattern=dict(rank_pattern or {}), alpha_pattern={})

    def rank_of(path: str) -> int:
        return tree_lib.first_match(rank_pattern, path, rank)

    def init_fn(key, params):
        found = tree_lib.select_targets(params, targets, layouts)
        keys = jax.random.split(key, len(found))
        out = {}
        for k, t in zip(keys, found):
            if t.is_embedding:
                raise ValueError(f"LaMDA adapts linear kernels (the official code wraps peft LoRA Linear layers); "
                                 f"{t.path!r} is an embedding")
            r = rank_of(t.path)
            shape = tree_lib.shape_of(t.leaf)
            stack, ins, outs = t.layout.split(shape)
            n_in, n_out = tree_lib.prod(ins), tree_lib.prod(outs)
            if r > min(n_in, n_out):
                raise ValueError(f"rank {r} for {t.path!r} exceeds min(in, out) = min({n_in}, {n_out}) of its shape {tuple(shape)}")
            dtype = param_dtype or t.leaf.dtype
            if init == "svd":
                w = linalg.check_finite(base.dense(t.leaf), t.path).reshape(-1, n_in, n_out)
                a, s, b = _svd_stack(w, r=r, scale=target_scale(config, t.path, r))
            else:
                key_a, key_s = jax.random.split(k)
                a = jax.random.uniform(key_a, (*stack, n_in, r), jnp.float32, -1.0 / math.sqrt(n_in), 1.0 / math.sqrt(n_in))
                s = jax.random.uniform(key_s, (*stack, r, r), jnp.float32, -1.0 / math.sqrt(r), 1.0 / math.sqrt(r))
                b = jnp.zeros((*stack, r, n_out), jnp.float32)
            out[t.keys] = {"a": a.reshape(*stack, *ins, r).astype(dtype), "s": s.reshape(*stack, r, r).astype(dtype),
                           "b": b.reshape(*stack, r, *outs).astype(dtype)}
        return tree_lib.nest(out)

    def apply_fn(leaves, site: base.Site, x, y, *, path: str, dropout_key=None):
        if site.kind != "linear":
            raise NotImplementedError(f"LaMDA supports linear layers; {path!r} is called as {site.kind!r}")
        a, s, b = leaves["a"], leaves["s"], leaves["b"]
        # x A first (A is frozen, so the backward keeps only this r-dim activation), then through S B
        # ([r, out], formed per call at r*r*out FLOPs): base.low_rank contracts x with a, then with s b.
        sb = jnp.tensordot(s, b, axes=1)
        delta = base.low_rank(site, base.dropout(dropout_key, x, dropout), a, sb, target_scale(config, path, s.shape[-1]))
        return y + base.match_sharding(delta.astype(y.dtype), y)

    def _deltas(params, adapter_params):
        out = {}
        for keys, path, kernel, leaves in base.resolve_targets(adapter_params, params, names):
            shape = tree_lib.shape_of(kernel)
            layout = base.layout_of(path, shape, leaves, ROLES)
            stack, ins, _ = layout.split(shape)
            a, s = leaves["a"].astype(jnp.float32), leaves["s"].astype(jnp.float32)
            r = s.shape[-1]
            a_s = jnp.matmul(a.reshape(*stack, tree_lib.prod(ins), r), s, precision=jax.lax.Precision.HIGHEST)
            out[keys] = (kernel, base.dense_delta(a_s, leaves["b"], layout, shape, target_scale(config, path, r)))
        return out

    merge_fn, unmerge_fn = base.additive_merge(_deltas)

    def penalty_fn(params, adapter_params):
        return jnp.zeros((), jnp.float32)

    return base.Adapter(init_fn, apply_fn, merge_fn, unmerge_fn, penalty_fn, names, config, dict(ROLES), layouts)


def lamda_plus_ranks(params, targets: tree_lib.Targets, total_rank: int, *, energy_rank: int | None = None,
                     min_rank: int = 1, layouts=None) -> dict[str, int]:
    r"""LaMDA++'s per-layer ranks: ``{path: r_l}`` summing to ``total_rank``, from each kernel's spectrum.

    With ``W_l = U diag(sigma_l) V^T`` (exact singular values, fp32) and ``k = energy_rank``
    (default: the mean rank ``total_rank // L`` over the ``L`` targets), the normalised energy
    score of layer ``l`` is the fraction of its squared spectrum in its top ``k`` directions,

    .. math::
        E_l = \frac{\sum_{i \le k} \sigma_{l,i}^2}{\sum_i \sigma_{l,i}^2} \in (0, 1], \qquad
        r_l \approx R \, \frac{E_l}{\sum_m E_m}, \quad \sum_l r_l = R,
        \quad \text{min\_rank} \le r_l \le \min(\text{in}_l, \text{out}_l)

    (largest-remainder rounding; ranks clipped at a bound are fixed there and the rest of the
    budget is shared again in proportion to ``E``). More rank goes where the top directions hold
    more of the energy, the layers that a rank-``r`` adapter can represent best. This is our reading
    of the paper's LaMDA++ (Azizi et al 2024, section "LaMDA++": a "lite-weight" static rank
    allocation from the normalised energy of the pre-trained weights' spectra, more rank for the
    layers less affected by rank reduction); the official repository has no LaMDA++ code.

    A stacked (scanned) kernel ``[L, in, out]`` holds ``L`` layers that share one adapter rank:
    it is refused (``ValueError`` naming it); unroll the layers (``scan_layers=False``) to give
    each its own rank.

    Raises ``ValueError`` when the budget cannot be met (``total_rank < min_rank * L`` or
    ``> sum_l min(in_l, out_l)``) or a target is stacked.
    """
    total_rank = _check_int("total_rank", total_rank)
    min_rank = _check_int("min_rank", min_rank)
    found = tree_lib.select_targets(params, targets, layouts)
    caps, energies = [], []
    for t in found:
        shape = tree_lib.shape_of(t.leaf)
        stack, ins, outs = t.layout.split(shape)
        if stack:
            raise ValueError(f"LaMDA++ gives each layer its own rank, but {t.path!r} of shape {tuple(shape)} stacks "
                             f"{tree_lib.prod(stack)} layers (a scanned kernel) that share one rank; unroll them "
                             f"(scan_layers=False) or use lrj.lamda with one rank")
        caps.append(min(tree_lib.prod(ins), tree_lib.prod(outs)))
    n = len(found)
    if total_rank < min_rank * n or total_rank > sum(caps):
        raise ValueError(f"rank budget total_rank={total_rank} cannot be met by {n} targets with min_rank={min_rank} "
                         f"and at most min(in, out) each: it must be in [{min_rank * n}, {sum(caps)}]")
    k = total_rank // n if energy_rank is None else _check_int("energy_rank", energy_rank)
    for t, cap in zip(found, caps):
        sv = np.asarray(jnp.linalg.svd(_matrix(t), compute_uv=False), np.float64)
        sq = sv**2
        energies.append(float(sq[: min(k, cap)].sum() / sq.sum()) if sq.sum() > 0 else 0.0)
    ranks = _allocate(np.asarray(energies), total_rank, min_rank, np.asarray(caps))
    return {t.path: int(r) for t, r in zip(found, ranks)}


def _matrix(target):
    shape = tree_lib.shape_of(target.leaf)
    _, ins, _ = target.layout.split(shape)
    return base.dense(target.leaf).reshape(tree_lib.prod(ins), -1)


def _allocate(weights, total: int, low: int, caps) -> np.ndarray:
    """Integers ``low <= r_l <= caps_l`` summing to ``total``, proportional to ``weights`` (largest remainder)."""
    n = len(weights)
    ranks = np.zeros(n, np.int64)
    fixed = np.zeros(n, bool)
    while True:
        free = ~fixed
        budget = total - ranks[fixed].sum()
        w = weights[free]
        share = budget * (w / w.sum() if w.sum() > 0 else np.full(w.shape, 1.0 / w.size))
        clipped = np.clip(share, low, caps[free])
        hit = clipped != share
        if hit.any():  # fix the clipped ones at their bound, share the rest again
            idx = np.flatnonzero(free)[hit]
            ranks[idx] = np.where(share[hit] < low, low, caps[free][hit])
            fixed[idx] = True
            continue
        base_ranks = np.floor(share).astype(np.int64)
        left = budget - base_ranks.sum()
        order = np.argsort(-(share - base_ranks), kind="stable")
        base_ranks[order[:left]] += 1
        ranks[free] = base_ranks
        return ranks


def lamda_plus(total_rank: int, alpha: float, targets: tree_lib.Targets, max_steps: int, params, *,
               energy_rank: int | None = None, min_rank: int = 1, layouts=None, **lamda_kwargs) -> base.Adapter:
    """LaMDA++: :func:`lamda` with the per-layer ranks of :func:`lamda_plus_ranks` (as its ``rank_pattern``).

    ``rank`` (the default of paths not in the pattern, i.e. none) is the mean rank; the scale of
    each target is ``alpha / r_l``, as peft's LoRA with a ``rank_pattern``.
    """
    ranks = lamda_plus_ranks(params, targets, total_rank, energy_rank=energy_rank, min_rank=min_rank, layouts=layouts)
    pattern = {re.escape(path): r for path, r in ranks.items()}
    adapter = lamda(max(1, total_rank // len(ranks)), alpha, targets, max_steps, rank_pattern=pattern, layouts=layouts,
                    **lamda_kwargs)
    return adapter._replace(config={**adapter.config, "method": "lamda++", "total_rank": total_rank})
