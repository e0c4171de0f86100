r"""AdaLoRA: SVD-form low-rank updates whose ranks are reallocated by importance during training.

Reference:
  Zhang et al, `Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning
  <https://arxiv.org/abs/2303.10512>`_, ICLR 2023.
Reference implementation matched: Hugging Face peft 0.21.2 ``tuners/adalora`` (``SVDLinear``,
``RankAllocator``, ``AdaLoraModel.update_and_allocate`` and its orthogonal regulariser); tests
compare outputs, merged weights, the regulariser, a 20-step budget/mask run and saved adapter
directories with values recorded from peft (``tests/fixtures/make_peft_adalora.py``).

Per target (Flax orientation, kernel ``[*stack, *in, *out]``): ``a: [*stack, *in, r]`` (peft's
``lora_A [r, in]`` transposed), ``e: [*stack, r]`` (``lora_E [r, 1]``), ``b: [*stack, r, *out]``
(``lora_B [out, r]`` transposed), ``r = init_r``:

.. math:: y = x W + \frac{\alpha}{\mathrm{ranknum} + 10^{-5}} \, (\mathrm{dropout}(x) (a \odot e)) b

with ``ranknum = init_r`` always (peft keeps it when ranks are pruned, and when it loads a pruned
adapter). Pruning masks ``e`` in place (entries set to 0), as peft does; :func:`adalora_allocator`
computes the masks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import base

__all__ = ["adalora", "adalora_allocator", "AdaLoraAllocator", "AdaLoraState", "ADALORA_ROLES", "RANKNUM_EPS"]

#: ``a`` and ``b`` are LoRA's factors; ``e`` holds the singular values, one per rank.
ADALORA_ROLES = {"a": base.Leaf(("stack", "in", "rank")), "e": base.Leaf(("stack", "rank")),
                 "b": base.Leaf(("stack", "rank", "out"))}
LEAVES = frozenset(ADALORA_ROLES)
#: peft divides the scaling by ``ranknum + 1e-5``.
RANKNUM_EPS = 1e-5


def _gated_a(a, e):
    """``a * e`` over the rank axis: ``a: [*stack, *in, r]``, ``e: [*stack, r]`` (peft's ``lora_A * lora_E``)."""
    n_in = a.ndim - e.ndim
    return a * jnp.reshape(e, (*e.shape[:-1], *(1,) * n_in, e.shape[-1])).astype(a.dtype)


def _matrices(leaves, layout, kernel_shape):
    """``(a, e, b)`` as float32 ``[M, in, r]``, ``[M, r]``, ``[M, r, out]``: one matrix per stacked layer."""
    stack, ins, outs = layout.split(kernel_shape)
    r = leaves["e"].shape[-1]
    m = tree_lib.prod(stack)
    return (leaves["a"].astype(jnp.float32).reshape(m, tree_lib.prod(ins), r),
            leaves["e"].astype(jnp.float32).reshape(m, r),
            leaves["b"].astype(jnp.float32).reshape(m, r, tree_lib.prod(outs)))


def adalora(
    init_r: int = 12,
    target_r: int = 8,
    total_step: int | None = None,
    tinit: int = 0,
    tfinal: int = 0,
    delta_t: int = 1,
    beta1: float = 0.85,
    beta2: float = 0.85,
    alpha: float = 8.0,
    orth_reg_weight: float = 0.5,
    targets: tree_lib.Targets = r".*/kernel",
    *,
    dropout: float = 0.0,
    layouts: Mapping[str, Any] | Callable | None = None,
    param_dtype: Any = None,
) -> base.Adapter:
    r"""AdaLoRA on the targeted kernels (peft's ``AdaLoraConfig``; ``delta_t`` is its ``deltaT``).

    Init as peft: ``e = 0`` (the adapted model equals the base at step 0), ``a, b ~ N(0, 0.02^2)``.
    The scale is ``alpha / (init_r + 1e-5)`` (``init_r`` when ``alpha <= 0``, as peft), for every
    target whatever its current rank.

    Training (peft's loop): the loss is ``task + orth_reg_weight * adapter.penalty(...)``, which
    ``lrj.make_train_step(..., adapter=adapter, penalty=orth_reg_weight)`` does (it multiplies
    ``penalty`` by its ``penalty=`` weight; ``adapter.config["orth_reg_weight"]`` records it); after
    each optimizer step call ``adalora_allocator(adapter).update(adapter_params, grads, state,
    step)`` with that step's gradients (peft's ``update_and_allocate``).

    Args:
      init_r: rank of every target at the start.
      target_r: the average rank after pruning: the total budget goes from ``init_r * M`` to
        ``target_r * M`` over the ``M`` matrices (targets, times stacked layers).
      total_step: the number of training steps (required).
      tinit, tfinal: steps before pruning starts, and at the end with the final ranks.
      delta_t: prune every ``delta_t`` steps during the budget phase.
      beta1, beta2: EMA factors of the sensitivity and of its uncertainty, in ``(0, 1)``.
      alpha: peft's ``lora_alpha``.
      orth_reg_weight: the weight of :attr:`Adapter.penalty` (recorded in the config; pass it as
        ``make_train_step(penalty=...)``).
      targets, layouts: as :func:`lrj.lora`. Embeddings are not supported (peft neither).
      dropout: on the adapter's input.
      param_dtype: dtype of the leaves; default: the kernel's.

    Example (``lrj.make_train_step`` does not return the gradients ``update`` needs, so the step is
    written out; with ``lrj.linen.apply`` in the loss as usual):

      >>> import jax, jax.numpy as jnp, optax
      >>> from lowrank_jax.adapters.adalora import adalora, adalora_allocator
      >>> params = {"proj": {"kernel": jax.random.normal(jax.random.key(0), (8, 6))}}
      >>> adapter = adalora(init_r=4, target_r=2, total_step=6, tfinal=2, targets="proj/kernel")
      >>> lp = adapter.init(jax.random.key(1), params)
      >>> allocator, opt = adalora_allocator(adapter, lp), optax.sgd(0.1)
      >>> x = jax.random.normal(jax.random.key(2), (16, 8))
      >>> def objective(lp):
      ...     y = x @ adapter.merge(params, lp)["proj"]["kernel"]
      ...     return jnp.mean((y - 1.0) ** 2) + adapter.config["orth_reg_weight"] * adapter.penalty(params, lp)
      >>> @jax.jit
      ... def step(lp, opt_state, state, t):
      ...     grads = jax.grad(objective)(lp)
      ...     updates, opt_state = opt.update(grads, opt_state, lp)
      ...     lp = optax.apply_updates(lp, updates)
      ...     lp, state = allocator.update(lp, grads, state, t)  # peft's update_and_allocate(t)
      ...     return lp, opt_state, state
      >>> opt_state, state = opt.init(lp), allocator.init(lp)
      >>> for t in range(6):
      ...     lp, opt_state, state = step(lp, opt_state, state, t)
      >>> allocator.budget(5), int(jnp.sum(lp["proj"]["kernel"]["e"] != 0))
      ((2, True), 2)

    Raises:
      ValueError: ``total_step`` missing or ``<= 0``; ``tinit >= total_step - tfinal`` (no budget
        phase); ``target_r > init_r``; a rank ``< 1``; ``beta1``/``beta2`` outside ``(0, 1)``;
        ``orth_reg_weight < 0``; ``delta_t < 1``.
    """
    _validate(init_r=init_r, target_r=target_r, total_step=total_step, tinit=tinit, tfinal=tfinal,
              delta_t=delta_t, beta1=beta1, beta2=beta2, orth_reg_weight=orth_reg_weight)
    dropout = float(dropout)
    scale = float(alpha if alpha > 0 else init_r) / (init_r + RANKNUM_EPS)

    def init_fn(key, params):
        found = tree_lib.select_targets(params, targets, layouts)
        out = {}
        for k, t in zip(jax.random.split(key, len(found)), found):
            if t.is_embedding:
                raise ValueError(f"AdaLoRA adapts linear kernels (peft: Linear, Conv1D, Conv2d); {t.path!r} is an embedding")
            stack, ins, outs = t.layout.split(tree_lib.shape_of(t.leaf))
            dtype = param_dtype or t.leaf.dtype
            ka, kb = jax.random.split(k)
            out[t.keys] = {
                "a": (0.02 * jax.random.normal(ka, (*stack, *ins, init_r), jnp.float32)).astype(dtype),
                "e": jnp.zeros((*stack, init_r), dtype),
                "b": (0.02 * jax.random.normal(kb, (*stack, init_r, *outs), jnp.float32)).astype(dtype),
            }
        return tree_lib.nest(out)

    def apply_fn(leaves, site: base.Site, x, y, *, path: str, dropout_key=None):
        if site.kind != "lookup":
            x = base.dropout(dropout_key, x, dropout)
        delta = base.low_rank(site, x, _gated_a(leaves["a"], leaves["e"]), leaves["b"], scale)
        return y + base.match_sharding(delta.astype(y.dtype), y)

    def shifted(params, adapter_params, sign):
        new = {}
        for keys, path, w, leaves in base.resolve_targets(adapter_params, params, LEAVES):
            shape = tree_lib.shape_of(w)
            layout = base.layout_of(path, shape, leaves, ADALORA_ROLES)
            delta = base.dense_delta(_gated_a(leaves["a"], leaves["e"]), leaves["b"], layout, shape, scale)
            new[keys] = (base.dense(w) + sign * delta).astype(w.dtype)
        return base.replace_leaves(params, new)

    def penalty_fn(params, adapter_params):
        r"""peft's orthogonal regulariser: the mean over all A and B matrices (each stacked layer
        its own) of ``||P - I||_F``, ``P = A A^T`` for ``lora_A [r, in]`` and ``B^T B`` for
        ``lora_B [out, r]`` (here ``a^T a`` and ``b b^T``), before its weight ``orth_reg_weight``."""
        norms = []
        for _, path, w, leaves in base.resolve_targets(adapter_params, params, LEAVES):
            shape = tree_lib.shape_of(w)
            a, _, b = _matrices({n: base.replicated(v) for n, v in leaves.items()},
                                base.layout_of(path, shape, leaves, ADALORA_ROLES), shape)
            eye = jnp.eye(a.shape[-1], dtype=jnp.float32)
            for cov in (jnp.einsum("mir,mis->mrs", a, a), jnp.einsum("mro,mso->mrs", b, b)):
                norms.append(_frobenius(cov - eye))
        if not norms:
            return jnp.zeros((), jnp.float32)
        return jnp.sum(jnp.concatenate(norms)) / sum(n.shape[0] for n in norms)

    config = dict(method="adalora", init_r=init_r, target_r=target_r, total_step=total_step, tinit=tinit,
                  tfinal=tfinal, delta_t=delta_t, beta1=beta1, beta2=beta2, alpha=alpha,
                  orth_reg_weight=orth_reg_weight, **tree_lib.targets_config(targets), dropout=dropout)
    return base.Adapter(init_fn, apply_fn, lambda p, ap: shifted(p, ap, 1.0), lambda p, ap: shifted(p, ap, -1.0),
                        penalty_fn, LEAVES, config, dict(ADALORA_ROLES), layouts)


def _frobenius(x):
    """``||x||_F`` over the last two axes, with a zero (not NaN) gradient at ``x = 0``."""
    sq = jnp.sum(jnp.square(x), axis=(-2, -1))
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _validate(*, init_r, target_r, total_step, tinit, tfinal, delta_t, beta1, beta2, orth_reg_weight):
    if total_step is None or total_step <= 0:
        raise ValueError(f"AdaLoRA needs `total_step` > 0 (the number of training steps), got total_step={total_step!r}")
    if tinit >= total_step - tfinal:
        raise ValueError(f"no budget phase: tinit={tinit} >= total_step - tfinal = {total_step} - {tfinal} = "
                         f"{total_step - tfinal}; decrease tinit/tfinal or increase total_step")
    if init_r < 1 or target_r < 1:
        raise ValueError(f"ranks must be >= 1, got init_r={init_r}, target_r={target_r}")
    if target_r > init_r:
        raise ValueError(f"target_r={target_r} > init_r={init_r}: AdaLoRA only prunes ranks")
    if tinit < 0 or tfinal < 0 or delta_t < 1:
        raise ValueError(f"need tinit >= 0, tfinal >= 0, delta_t >= 1; got tinit={tinit}, tfinal={tfinal}, delta_t={delta_t}")
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not 0 < beta < 1:
            raise ValueError(f"`{name}` must be in (0, 1), got {name}={beta}")
    if orth_reg_weight < 0:
        raise ValueError(f"`orth_reg_weight` must be >= 0, got orth_reg_weight={orth_reg_weight}")


# ----------------------------------------------------------------------------- rank allocation


class AdaLoraState(NamedTuple):
    """The allocator's state (a pytree; checkpoint it with the optimizer state).

    ipt: the sensitivity EMA ``Ibar`` of every ``a``/``e``/``b`` leaf (float32, the adapter tree's shape).
    unc: its uncertainty EMA ``Ubar``.
    pattern: ``{target: {"e": bool [*stack, r]}}``: the ranks kept by the latest mask (peft's
      ``rank_pattern``); all ``True`` before the first one.
    masked: a mask has been computed (peft's ``rank_pattern`` is not ``None``): :func:`save_peft_adalora
      <lowrank_jax.io.peft_adalora.save_peft_adalora>` prunes by ``pattern`` only then.
    """

    ipt: Any
    unc: Any
    pattern: Any
    masked: Any


class AdaLoraAllocator(NamedTuple):
    """Pure functions of peft's ``RankAllocator`` (see :func:`adalora_allocator`)."""

    init: Callable
    update: Callable
    budget: Callable


def adalora_allocator(adapter: base.Adapter, adapter_params=None) -> AdaLoraAllocator:
    r"""peft's ``RankAllocator`` + ``update_and_allocate`` as pure, jit-able functions.

    ``init(adapter_params) -> state``; ``update(adapter_params, grads, state, step) ->
    (adapter_params, state)``, called after the optimizer step with that step's gradients (a tree
    like ``adapter_params``); ``step`` may be traced. At step ``t``, with ``T' = total_step - tfinal``:

    * ``t < T'``: importance ``I = |p * g|`` of every entry (the updated ``p``), then
      ``Ibar <- b1 Ibar + (1 - b1) I`` and ``Ubar <- b2 Ubar + (1 - b2) |I - Ibar|`` (with the NEW
      ``Ibar``, as peft's ``update_ipt``); when ``budget(t)`` says so, mask: the triplet score of
      rank ``i`` is ``s(e)_i + (mean_in s(a)_i + mean_out s(b)_i)``, ``s = Ibar * Ubar``, and every
      triplet (over all targets) scoring ``<=`` the ``k``-th smallest, ``k = init budget - budget(t)``,
      gets ``e_i = 0`` (``k = 0``: none; peft's ``kthvalue`` raises there);
    * ``t == T'``: the forced final mask to ``target_r * M`` with the current scores (no
      importance update), then the EMAs reset;
    * ``t > T'``: ``e`` masked with the final pattern every step.

    ``budget(step, adapter_params=None) -> (budget, mask_now)`` is peft's ``budget_schedule``:
    a Python ``(int, bool)`` for a Python step, int32/bool arrays for a traced one (a table
    computed in float64 as peft does). The total budget needs the number of ranks: pass the tree
    here or to ``budget``.
    """
    cfg = adapter.config
    if cfg.get("method") != "adalora":
        raise ValueError(f"adalora_allocator needs an lrj.adalora adapter, got method {cfg.get('method')!r}")
    total, tinit, tfinal, delta_t = cfg["total_step"], cfg["tinit"], cfg["tfinal"], cfg["delta_t"]
    beta1, beta2, target_r = cfg["beta1"], cfg["beta2"], cfg["target_r"]
    final = total - tfinal

    def targets(tree):
        found = tree_lib.adapter_paths(tree, LEAVES)
        for keys, leaves in found:
            missing = sorted(LEAVES - set(leaves))
            if missing:
                raise ValueError(f"{tree_lib.path_str(keys)!r} lacks AdaLoRA leaves {missing}")
        return found

    def budgets(tree) -> tuple[int, int]:
        """peft's ``init_bgt`` (the ranks there are) and ``target_bgt`` (``target_r`` per matrix)."""
        es = [np.shape(leaves["e"]) for _, leaves in targets(tree)]
        return sum(tree_lib.prod(s) for s in es), target_r * sum(tree_lib.prod(s[:-1]) for s in es)

    def schedule(step: int, init_bgt: int, target_bgt: int) -> tuple[int, bool]:  # RankAllocator.budget_schedule
        if step <= tinit:
            return init_bgt, False
        if step > total - tfinal:
            return target_bgt, True
        mul_coeff = 1 - (step - tinit) / (total - tfinal - tinit)
        return int((init_bgt - target_bgt) * (mul_coeff**3) + target_bgt), step % delta_t == 0

    def budget_fn(step, tree=None):
        tree = adapter_params if tree is None else tree
        if tree is None:
            raise ValueError("the budget counts the adapter's ranks: adalora_allocator(adapter, adapter_params) "
                             "or budget(step, adapter_params)")
        init_bgt, target_bgt = budgets(tree)
        if isinstance(step, (int, np.integer)):
            return schedule(int(step), init_bgt, target_bgt)
        table = [schedule(t, init_bgt, target_bgt) for t in range(total + 2)]  # steps past total: as total + 1
        index = jnp.clip(jnp.asarray(step, jnp.int32), 0, total + 1)
        return (jnp.asarray([b for b, _ in table], jnp.int32)[index],
                jnp.asarray([m for _, m in table], bool)[index])

    def init_fn(tree):
        found = targets(tree)
        zeros = tree_lib.nest({keys: {n: jnp.zeros(np.shape(v), jnp.float32) for n, v in leaves.items() if n in LEAVES}
                               for keys, leaves in found})
        pattern = tree_lib.nest({keys: {"e": jnp.ones(np.shape(leaves["e"]), bool)} for keys, leaves in found})
        return AdaLoraState(zeros, jax.tree.map(jnp.zeros_like, zeros), pattern, jnp.zeros((), bool))

    def update_fn(tree, grads, state: AdaLoraState, step):
        step = jnp.asarray(step, jnp.int32)
        found = targets(tree)
        grad_of = dict(tree_lib.adapter_paths(grads, LEAVES))
        ipt_of, unc_of = dict(tree_lib.adapter_paths(state.ipt, LEAVES)), dict(tree_lib.adapter_paths(state.unc, LEAVES))
        pattern_of = dict(tree_lib.adapter_paths(state.pattern, frozenset("e")))
        budgeting = step < final
        new_ipt, new_unc, scores = {}, {}, []
        for keys, leaves in found:
            g = grad_of.get(keys, {})
            missing = sorted(LEAVES - set(g))
            if missing:
                raise ValueError(f"`grads` has no gradient of {missing} at {tree_lib.path_str(keys)!r}")
            new_ipt[keys], new_unc[keys], s = {}, {}, {}
            for n in sorted(LEAVES):
                p, grad = leaves[n].astype(jnp.float32), g[n].astype(jnp.float32)
                ipt = jnp.abs(p * grad)
                bar = beta1 * ipt_of[keys][n] + (1 - beta1) * ipt
                unc = beta2 * unc_of[keys][n] + (1 - beta2) * jnp.abs(ipt - bar)
                bar = jnp.where(budgeting, bar, ipt_of[keys][n])
                unc = jnp.where(budgeting, unc, unc_of[keys][n])
                new_ipt[keys][n], new_unc[keys][n], s[n] = bar, unc, bar * unc
            n_in = s["a"].ndim - s["e"].ndim
            s_a = jnp.mean(s["a"], axis=tuple(range(s["e"].ndim - 1, s["e"].ndim - 1 + n_in)))
            s_b = jnp.mean(s["b"], axis=tuple(range(s["e"].ndim, s["b"].ndim)))
            scores.append(s["e"] + (s_a + s_b))
        init_bgt, _ = budgets(tree)
        bgt, mask_ind = budget_fn(step, tree)
        k = init_bgt - bgt
        ranked = jnp.sort(jnp.concatenate([jnp.ravel(s) for s in scores]))
        threshold = jnp.where(k > 0, ranked[jnp.clip(k - 1, 0, ranked.shape[0] - 1)], -jnp.inf)
        do_mask = (budgeting & mask_ind) | (step == final)
        apply_mask = do_mask | (step > final)
        out, pattern = {}, {}
        for (keys, leaves), score in zip(found, scores):
            keep = jnp.where(do_mask, score > threshold, pattern_of[keys]["e"])
            pattern[keys] = {"e": keep}
            e = leaves["e"]
            out[keys + ("e",)] = jnp.where(apply_mask & ~keep, jnp.zeros_like(e), e)
        reset = step == final
        new_state = AdaLoraState(
            jax.tree.map(lambda v: jnp.where(reset, 0.0, v), tree_lib.nest(new_ipt)),
            jax.tree.map(lambda v: jnp.where(reset, 0.0, v), tree_lib.nest(new_unc)),
            tree_lib.nest(pattern), state.masked | do_mask)
        return base.replace_leaves(tree, out), new_state

    return AdaLoraAllocator(init_fn, update_fn, budget_fn)
