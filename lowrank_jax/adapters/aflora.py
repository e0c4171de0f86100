r"""AFLoRA: low-rank projections with feature-transform vectors, the projections frozen progressively.

Reference: Liu et al, `AFLoRA: Adaptive Freezing of Low Rank Adaptation in Parameter Efficient
Fine-Tuning of Large Models <https://arxiv.org/abs/2403.13269>`_, ACL 2024. Reference implementation
matched: the authors' code, https://github.com/zeyuliu1037/AFLoRA (``glue/peft/src/peft/tuners/lora.py``
``Linear.forward`` with ``mode="elora"``, ``glue/utils.py`` ``Pruner`` as ``CustomTrainerWFreeze``
calls it), transcribed to torch in ``tests/fixtures/make_aflora.py``.

Per target, in Flax orientation (the code's ``lora_A.weight = a.T: [r, in]``, ``lora_B.weight =
b.T: [out, r]``, ``lora_d = lambda_d: [r]``, ``lora_db = lambda_b: [out]``):

.. math::
    y = x W + \big(((\mathrm{dropout}(x)\, a) \odot \lambda_d)\, b\big) \odot \lambda_b,
    \qquad \Delta W = (a \operatorname{diag}\lambda_d)(b \operatorname{diag}\lambda_b)

no scaling (the code's ``custom_scaling=0``). Init as the GLUE scripts (``init_type=1``,
``d_init_type=94``): ``a, b`` by torch's ``kaiming_uniform_`` (``a = 0``: ``U(+-sqrt(6 / fan_in))``,
``fan_in = in`` for ``a``, ``r`` for ``b``), ``lambda_d = 0.1``, ``lambda_b = 0`` (a no-op at step 0).
VeRA is the same path with shared, never-trained projections (:func:`lrj.vera`).

All four leaves are trainable; :func:`aflora_freezing` zeroes the updates of each projection
(each stacked layer's ``a`` or ``b`` separately, as the code freezes each torch tensor) once its
freezing score says so. ``lrj.freeze(lrj.aflora(...), {"a", "b"})`` is the frozen-projection
variant (the code's ``trainable_uv=0``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import base

__all__ = ["aflora", "aflora_freezing", "AfloraFreezingState", "AFLORA_ROLES", "freezing_threshold"]

AFLORA_ROLES = {
    "a": base.Leaf(("stack", "in", "rank")),
    "b": base.Leaf(("stack", "rank", "out")),
    "lambda_d": base.Leaf(("stack", "rank")),
    "lambda_b": base.Leaf(("stack", "out")),
}
LEAVES = frozenset(AFLORA_ROLES)
#: The leaves the freezing score acts on (the code's ``whether_freeze_para``: ``lora_A``/``lora_B``).
PROJECTIONS = ("a", "b")
SCORES = ("official", "paper")


def _kaiming_uniform(key, shape, fan_in: int, dtype):
    """torch's ``kaiming_uniform_`` with its defaults (``a = 0``): ``U(-sqrt(6 / fan_in), +sqrt(6 / fan_in))``."""
    bound = math.sqrt(6.0 / fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def _scaled_factors(leaves, n_in: int):
    """``(a diag(lambda_d), b diag(lambda_b))`` as ``[*stack, *in, r]``, ``[*stack, r, *out]`` (``n_in`` input axes)."""
    lam_d, lam_b = leaves["lambda_d"], leaves["lambda_b"]
    stack = lam_d.ndim - 1
    a = leaves["a"] * jnp.expand_dims(lam_d, tuple(range(stack, stack + n_in))).astype(leaves["a"].dtype)
    b = leaves["b"] * jnp.expand_dims(lam_b, stack).astype(leaves["b"].dtype)
    return a, b


def aflora(rank: int = 4, targets: tree_lib.Targets = r".*/kernel", *, d_initial: float = 0.1, dropout: float = 0.0,
           layouts: Any = None, param_dtype: Any = None) -> base.Adapter:
    r"""AFLoRA on the targeted kernels (the math is in the module docstring).

    Args:
      rank: ``r`` of the projections (the GLUE scripts use 4); at most ``min(in, out)`` of each target.
      targets: regex / list / callable on "/"-joined param paths, as in :func:`lrj.lora`.
      d_initial: the initial value of every ``lambda_d`` (``d_init_type=94``: 0.1).
      dropout: on the adapter's input (the code's ``lora_dropout``).
      layouts: for N-D kernels, as in :func:`lrj.lora`.
      param_dtype: dtype of the leaves; default: the kernel's.

    Train with :func:`aflora_freezing` around the optimizer to freeze the projections by score.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lowrank_jax.adapters.aflora import aflora
      >>> params = {"proj": {"kernel": jnp.ones((6, 5))}}
      >>> lp = aflora(rank=2).init(jax.random.key(0), params)
      >>> jax.tree.map(jnp.shape, lp)["proj"]["kernel"]
      {'a': (6, 2), 'b': (2, 5), 'lambda_b': (5,), 'lambda_d': (2,)}

    Raises:
      ValueError: ``rank`` not a positive integer or larger than a target's ``min(in, out)``
        (naming the target); ``dropout`` outside ``[0, 1)``; an embedding target.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"`rank` must be a positive integer, got rank={rank!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1), got dropout={dropout!r}")

    def init_fn(key, params):
        found = tree_lib.select_targets(params, targets, layouts)
        out = {}
        for k, t in zip(jax.random.split(key, len(found)), found):
            if t.is_embedding:
                raise ValueError(f"AFLoRA adapts linear kernels (the code: nn.Linear); {t.path!r} is an embedding")
            stack, ins, outs = t.layout.split(tree_lib.shape_of(t.leaf))
            n_in, n_out = tree_lib.prod(ins), tree_lib.prod(outs)
            if rank > min(n_in, n_out):
                raise ValueError(f"rank={rank} is larger than target {t.path!r} allows: min(in, out) = min({n_in}, {n_out})")
            dtype = param_dtype or t.leaf.dtype
            ka, kb = jax.random.split(k)
            # torch draws lora_A.weight [r, in] and lora_B.weight [out, r]; we keep their transposes
            a = _kaiming_uniform(ka, (*stack, rank, n_in), n_in, dtype)
            b = _kaiming_uniform(kb, (*stack, n_out, rank), rank, dtype)
            out[t.keys] = {
                "a": jnp.swapaxes(a, -1, -2).reshape(*stack, *ins, rank),
                "b": jnp.swapaxes(b, -1, -2).reshape(*stack, rank, *outs),
                "lambda_d": jnp.full((*stack, rank), d_initial, dtype),
                "lambda_b": jnp.zeros((*stack, *outs), dtype),
            }
        return tree_lib.nest(out)

    def apply_fn(leaves, site: base.Site, x, y, *, path: str, dropout_key=None):
        if site.kind != "linear":
            raise NotImplementedError(f"AFLoRA supports linear layers; {path!r} is called as {site.kind!r}")
        a, b = _scaled_factors(leaves, site.inputs)
        delta = base.low_rank(site, base.dropout(dropout_key, x, dropout), a, b, 1.0)
        return y + base.match_sharding(delta.astype(y.dtype), y)

    def _deltas(params, adapter_params):
        out = {}
        for keys, path, kernel, leaves in base.resolve_targets(adapter_params, params, LEAVES):
            shape = tree_lib.shape_of(kernel)
            layout = base.layout_of(path, shape, leaves, AFLORA_ROLES)
            a, b = _scaled_factors(leaves, layout.inputs)
            out[keys] = (kernel, base.dense_delta(a, b, layout, shape, 1.0))
        return out

    merge_fn, unmerge_fn = base.additive_merge(_deltas)

    def penalty_fn(params, adapter_params):
        return jnp.zeros((), jnp.float32)  # the code's optional norm_penalty is off in its scripts

    config = dict(method="aflora", rank=rank, d_initial=d_initial, dropout=float(dropout), **tree_lib.targets_config(targets))
    return base.Adapter(init_fn, apply_fn, merge_fn, unmerge_fn, penalty_fn, LEAVES, config, dict(AFLORA_ROLES), layouts)


# ----------------------------------------------------------------------------- freezing by score


def freezing_threshold(step: int, total_step: int, warmup_steps: int, initial_warmup: int, final_warmup: int,
                       delta_t: int, initial_threshold: float = 1.0, final_threshold: float = 0.0) -> tuple[float, bool]:
    r"""The code's ``Pruner.schedule_threshold_comb``: ``(threshold, mask_now)`` at ``step``.

    ``threshold`` is the fraction of the still-trainable projection entries whose score may stay
    above the freezing cut; with ``t_i = initial_warmup * warmup_steps`` and
    ``t_f = final_warmup * warmup_steps``:

    .. math:: \theta(t) = \theta_f + (\theta_i - \theta_f)\Big(1 - \frac{t - t_i}{T - t_i - t_f}\Big)^3
        \quad (t_i < t \le T - t_f,\ \text{mask when } t \bmod \Delta_T = 0)

    ``theta_i`` (no mask) up to ``t_i``; ``theta_f`` (mask every step) after ``T - t_f``.
    """
    t_i, t_f = initial_warmup * warmup_steps, final_warmup * warmup_steps
    if step <= t_i:
        return initial_threshold, False
    if step > total_step - t_f:
        return final_threshold, True
    mul_coeff = 1 - (step - t_i) / (total_step - t_f - t_i)
    return final_threshold + (initial_threshold - final_threshold) * mul_coeff**3, step % delta_t == 0


class AfloraFreezingState(NamedTuple):
    """State of :func:`aflora_freezing` (a pytree; checkpoint it with the optimizer state).

    count: steps taken (the code's ``global_step`` when the step's score is computed).
    inner: the wrapped optimizer's state.
    ipt: the code's ``ipt`` (the current window's mean sensitivity), per projection leaf.
    exp_avg_ipt, exp_avg_unc: the smoothed sensitivity ``Ibar`` and uncertainty ``Ubar``.
    frozen: ``{target: {"a": bool [*stack], "b": bool [*stack]}}``; a frozen projection is never updated again.
    """

    count: Any
    inner: Any
    ipt: Any
    exp_avg_ipt: Any
    exp_avg_unc: Any
    frozen: Any


def aflora_freezing(inner: optax.GradientTransformation, total_step: int, warmup_steps: int, *,
                    initial_warmup: int = 1, final_warmup: int = 3, delta_t: int = 10, beta1: float = 0.85,
                    beta2: float = 0.95, initial_threshold: float = 1.0, final_threshold: float = 0.0,
                    score: str = "official") -> optax.GradientTransformation:
    r"""``inner`` with AFLoRA's progressive freezing of the projections ``a``, ``b`` (jit-able).

    ``update(grads, state, params)`` needs ``params`` (the AFLoRA tree being trained, before the step).
    At step ``t`` (``state.count``), as the code's ``Pruner.update_and_pruning`` after ``backward``:

    1. ``inner`` computes its updates; those of the projections frozen before ``t`` are set to
       exactly 0 (torch: ``requires_grad=False``, so no ``.grad`` and ``AdamW.step`` skips them).
    2. Score of every still-trainable projection entry (``score="official"``, the code's PLATON
       pruner with a local window of ``delta_t`` steps): with ``l = t mod delta_t``, at ``l = 0``
       ``Ibar <- b1 Ibar + (1 - b1) I``, ``Ubar <- b2 Ubar + (1 - b2) |I - Ibar|`` (with the new
       ``Ibar``), then ``I <- |sign(p) g|``; otherwise ``I <- (l I + |sign(p) g|) / (l + 1)``.
       ``score="paper"`` (the paper's sensitivity-based score as AdaLoRA/PLATON define it, without
       the code's window; written from the paper's description, no code of it exists): every step
       ``I = |p g|``, ``Ibar <- b1 Ibar + (1 - b1) I``, ``Ubar <- b2 Ubar + (1 - b2) |I - Ibar|``.
    3. When :func:`freezing_threshold` says ``mask_now``: with ``s = Ibar * Ubar`` over the ``N``
       still-trainable entries and ``k = int(N (1 - threshold))``, every trainable projection whose
       mean ``s`` is below the ``k``-th smallest ``s`` is frozen from step ``t + 1`` on (this step's
       update still applies, as in torch). ``k = 0`` freezes nothing (torch's ``kthvalue`` raises).
       ``k`` is computed in float32 (the code: float64), which may differ by one at exact integers.

    Args:
      inner: the optimizer (e.g. ``optax.adamw(1e-2, weight_decay=0.1)``, the GLUE scripts').
      total_step: number of training steps ``T``.
      warmup_steps: the schedule's time unit; the code uses the steps of one epoch (``T // epochs``).
      initial_warmup, final_warmup: ``t_i``, ``t_f`` in units of ``warmup_steps`` (code: 1, and 3 to 14 by task).
      delta_t: masking period and score window (10).
      beta1, beta2: EMA factors of the sensitivity and its uncertainty, in ``(0, 1)`` (0.85, 0.95).
      initial_threshold, final_threshold: the schedule's ends in ``[0, 1]`` (1 and 0).
      score: ``"official"`` (the code, default) or ``"paper"``.

    Note: the gradients of frozen projections are still computed (the trainable tree's shapes are
    static under ``jit``); what freezing saves here is their update, not their backward FLOPs.
    """
    for name, value in (("total_step", total_step), ("warmup_steps", warmup_steps), ("delta_t", delta_t)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"`{name}` must be a positive integer, got {name}={value!r}")
    for name, value in (("initial_warmup", initial_warmup), ("final_warmup", final_warmup)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"`{name}` must be an integer >= 0, got {name}={value!r}")
    if (initial_warmup + final_warmup) * warmup_steps >= total_step:
        raise ValueError(f"no freezing phase: (initial_warmup + final_warmup) * warmup_steps = "
                         f"({initial_warmup} + {final_warmup}) * {warmup_steps} >= total_step={total_step}")
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not 0 < beta < 1:
            raise ValueError(f"`{name}` must be in (0, 1), got {name}={beta!r}")
    for name, value in (("initial_threshold", initial_threshold), ("final_threshold", final_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"`{name}` must be in [0, 1], got {name}={value!r}")
    if score not in SCORES:
        raise ValueError(f"`score` must be one of {SCORES}, got score={score!r}")
    table = [freezing_threshold(t, total_step, warmup_steps, initial_warmup, final_warmup, delta_t,
                                initial_threshold, final_threshold) for t in range(total_step + 2)]
    keep_fraction = np.asarray([1.0 - th for th, _ in table], np.float32)  # steps past T: as T + 1
    mask_now = np.asarray([m for _, m in table], bool)

    def projections(tree, what: str):
        found = [(keys, leaves) for keys, leaves in tree_lib.adapter_paths(tree, LEAVES)]
        found = [(keys, leaves) for keys, leaves in found if all(n in leaves for n in PROJECTIONS)]
        if not found:
            raise ValueError(f"aflora_freezing: {what} has no AFLoRA projections `a`, `b` (an lrj.aflora tree, "
                             f"with a and b trainable, is needed)")
        return found

    def n_stack(leaves) -> int:
        if "lambda_d" not in leaves:
            raise ValueError("aflora_freezing needs `params` with the AFLoRA leaves (lambda_d tells the stacked axes)")
        return np.ndim(leaves["lambda_d"]) - 1

    def init_fn(params):
        found = projections(params, "`params`")
        zeros = tree_lib.nest({keys: {n: jnp.zeros(np.shape(leaves[n]), jnp.float32) for n in PROJECTIONS}
                               for keys, leaves in found})
        frozen = tree_lib.nest({keys: {n: jnp.zeros(np.shape(leaves[n])[: n_stack(leaves)], bool) for n in PROJECTIONS}
                                for keys, leaves in found})
        return AfloraFreezingState(jnp.zeros((), jnp.int32), inner.init(params), zeros,
                                   jax.tree.map(jnp.zeros_like, zeros), jax.tree.map(jnp.zeros_like, zeros), frozen)

    def update_fn(grads, state: AfloraFreezingState, params=None):
        if params is None:
            raise ValueError("aflora_freezing needs `params` in update(grads, state, params)")
        step = state.count
        updates, inner_state = inner.update(grads, state.inner, params)
        found = projections(params, "`params`")
        grad_of = dict(tree_lib.adapter_paths(grads, LEAVES))
        by_keys = {name: dict(tree_lib.adapter_paths(tree, frozenset(PROJECTIONS)))
                   for name, tree in (("ipt", state.ipt), ("avg", state.exp_avg_ipt), ("unc", state.exp_avg_unc))}
        frozen_of = dict(tree_lib.adapter_paths(state.frozen, frozenset(PROJECTIONS)))
        local = step % delta_t
        zeroed, ipt, avg, unc, scores = {}, {}, {}, {}, []
        for keys, leaves in found:
            g_leaves = grad_of.get(keys, {})
            missing = [n for n in PROJECTIONS if n not in g_leaves]
            if missing:
                raise ValueError(f"`grads` has no gradient of {missing} at {tree_lib.path_str(keys)!r}")
            stack = n_stack(leaves)
            for n in PROJECTIONS:
                frozen = frozen_of[keys][n]
                p, g = leaves[n].astype(jnp.float32), g_leaves[n].astype(jnp.float32)
                old_ipt, old_avg, old_unc = by_keys["ipt"][keys][n], by_keys["avg"][keys][n], by_keys["unc"][keys][n]
                if score == "official":
                    sens = jnp.abs(jnp.sign(p) * g)
                    new_avg = jnp.where(local == 0, beta1 * old_avg + (1 - beta1) * old_ipt, old_avg)
                    new_unc = jnp.where(local == 0, beta2 * old_unc + (1 - beta2) * jnp.abs(old_ipt - new_avg), old_unc)
                    new_ipt = jnp.where(local == 0, sens, (old_ipt * local + sens) / (local + 1))
                else:
                    new_ipt = jnp.abs(p * g)
                    new_avg = beta1 * old_avg + (1 - beta1) * new_ipt
                    new_unc = beta2 * old_unc + (1 - beta2) * jnp.abs(new_ipt - new_avg)
                live = ~_over_entries(frozen, p)  # frozen projections keep their scores (torch: no grad, no update)
                ipt[keys + (n,)] = jnp.where(live, new_ipt, old_ipt)
                avg[keys + (n,)] = jnp.where(live, new_avg, old_avg)
                unc[keys + (n,)] = jnp.where(live, new_unc, old_unc)
                u = tree_lib.get_path(updates, keys + (n,))
                zeroed[keys + (n,)] = jnp.where(_over_entries(frozen, u), jnp.zeros_like(u), u)
                s = avg[keys + (n,)] * unc[keys + (n,)]
                scores.append((keys, n, s, frozen, stack))
        # the cut: the k-th smallest score over the entries of still-trainable projections
        flat = jnp.concatenate([jnp.ravel(jnp.where(_over_entries(fr, s), jnp.inf, s)) for _, _, s, fr, _ in scores])
        n_live = sum(jnp.sum(~fr) * (tree_lib.prod(s.shape) // max(tree_lib.prod(fr.shape), 1)) for _, _, s, fr, _ in scores)
        index = jnp.clip(step, 0, total_step + 1)
        k = jnp.floor(n_live.astype(jnp.float32) * jnp.asarray(keep_fraction)[index]).astype(jnp.int32)
        ranked = jnp.sort(flat)
        cut = jnp.where(k > 0, ranked[jnp.clip(k - 1, 0, ranked.shape[0] - 1)], -jnp.inf)
        masking = jnp.asarray(mask_now)[index] & (n_live > 0)
        new_frozen = {}
        for keys, n, s, fr, stack in scores:
            mean = jnp.mean(s, axis=tuple(range(stack, s.ndim))) if s.ndim > stack else s
            new_frozen[keys + (n,)] = fr | (masking & ~fr & (mean < cut))
        updates = base.replace_leaves(updates, zeroed)
        new_state = AfloraFreezingState(step + 1, inner_state, tree_lib.nest(ipt), tree_lib.nest(avg), tree_lib.nest(unc),
                                        tree_lib.nest(new_frozen))
        return updates, new_state

    return optax.GradientTransformation(init_fn, update_fn)


def _over_entries(mask, ref):
    """``mask: [*stack]`` broadcast over the trailing axes of ``ref: [*stack, ...]``."""
    return jnp.broadcast_to(jnp.reshape(mask, mask.shape + (1,) * (ref.ndim - mask.ndim)), ref.shape)
