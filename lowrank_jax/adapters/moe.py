r"""Mixtures of LoRA experts: MoLoRA, MixLoRA, MALoRA, each a router and ``E`` experts per targeted layer.

For a targeted kernel ``W: [in, out]`` (Flax orientation) and a token ``x``:

.. math::
    p = \mathrm{softmax}(x R) \in \mathbb{R}^E \;(\text{fp32}), \qquad
    y = x W + s \sum_e w_e(p) \, (\mathrm{dropout}(x) A_e) B_e, \qquad s = \alpha / r

with the router ``R: [in, E]``, ``A_e: [in, r]``, ``B_e: [r, out]`` and the routing weights
``w(p)``: ``p`` itself (soft merge); ``p * topk_mask(p)`` (MoLoRA's top-k, *not* renormalised);
``p * topk_mask(p) / sum(p * topk_mask(p))`` (MixLoRA's, renormalised over the selected experts).

Leaves per target, Flax orientation: ``router: [*stack, *in, E]`` (fp32), ``expert_a: [*stack, E, *in, r]``,
``expert_b: [*stack, E, r, *out]`` (for-ai's ``lora_A``/``lora_B`` layouts; MoE-PEFT's torch
``gate_.weight`` is ``router.T``, expert ``e``'s ``lora_a.weight`` is ``expert_a[e].T``). Their roles
(:attr:`lrj.Adapter.roles`) name the ``"expert"`` axis, so
``lrj.adapter_shardings(..., adapter_axes={"expert": "expert"})`` shards the experts over a mesh axis
(expert parallelism); by default it is replicated.

- **MoLoRA** (Zadouri et al, `Pushing Mixture of Experts to the Limit
  <https://arxiv.org/abs/2309.05444>`_, 2023; code matched: for-ai/parameter-efficient-moe,
  ``src/molora.py``, ``src/routing.py``, https://github.com/for-ai/parameter-efficient-moe):
  ``A_e ~ N(0, 0.02^2)``, ``B_e = 0``, ``R ~ N(0, 0.02^2)``, no router bias, soft merge; ``top_k`` as
  the code's ``Router._compute_router_probabilities``. The code has no LoRA dropout and its
  load-balancing loss is never called (``load_balancing_loss=False``): no aux output by default.
- **MixLoRA** (Li et al, `MixLoRA <https://arxiv.org/abs/2404.15159>`_, 2024; code matched:
  TUDB-Labs/MoE-PEFT ``moe_peft/adapters/mixlora/model.py``, https://github.com/TUDB-Labs/MoE-PEFT):
  top-2 renormalised, ``A_e`` kaiming-uniform (peft's LoRA init, MoE-PEFT's ``"original"``), and the
  load-balancing loss ``coef * E * sum_e f_e P_e`` with ``f_e`` the fraction of tokens whose top-k
  holds ``e`` and ``P_e`` the mean router probability, over the tokens of *all* routers concatenated
  (MoE-PEFT's ``unpack_router_logits``), coef 0.001. MoE-PEFT's MixLoRA mixes whole FFN experts
  (one router per FFN, each expert the base FFN plus its own LoRAs); this version mixes per targeted
  linear layer (one router per target), with exactly MoE-PEFT's per-router math.
- **MALoRA** (Wang et al, `MALoRA <https://arxiv.org/abs/2410.22782>`_, 2024; no public code): the
  experts' down-projections share a subspace, ``A_e = S C_e`` (see :func:`malora`).

The aux loss leaves ``apply`` through the bridges (``base.WithAux``): each router returns its
:class:`RouterStats` (sums over its tokens), the bridges deliver them in the collection
``"adapter_aux"`` (linen ``mutable=["adapter_aux"]``, NNX ``with_aux=True``) and :func:`aux_loss`
combines them. Experts are computed densely (every token through every expert, weights zero off the
top-k), as the for-ai code does: ``O(tokens * E * r * (in + out))``, a LoRA of rank ``E r``.

Merge: a routed mixture has no input-independent dense update (``w(p(x))`` depends on ``x``, even
for the soft merge), so ``merge``/``unmerge`` raise ``ValueError``; run it factored.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import base
from lowrank_jax.adapters.scale import lora_scale

__all__ = ["RouterStats", "aux_loss", "malora", "mixlora", "molora", "route"]

EXPERT_ROLES = {
    "router": base.Leaf(("stack", "in", "expert")),
    "expert_a": base.Leaf(("stack", "expert", "in", "rank")),
    "expert_b": base.Leaf(("stack", "expert", "rank", "out")),
}
MALORA_ROLES = {
    "router": base.Leaf(("stack", "in", "expert")),
    "shared_a": base.Leaf(("stack", "in", "shared_rank")),
    "expert_c": base.Leaf(("stack", "expert", "shared_rank", "rank")),
    "expert_b": base.Leaf(("stack", "expert", "rank", "out")),
}
_INITS = ("normal", "kaiming")


class RouterStats(NamedTuple):
    """One router's statistics over the tokens of one call (arrays; stacked by ``nn.scan``).

    assigned: ``[E]``, the number of tokens whose top-k holds each expert (all tokens: soft routing).
    probs: ``[E]``, the sum over tokens of the router probabilities.
    tokens: ``[]``, the number of tokens.
    coef: ``[]``, the adapter's aux loss coefficient.
    """

    assigned: Any
    probs: Any
    tokens: Any
    coef: Any


def route(logits, top_k: int | None, renormalize: bool):
    """``(weights, probs, mask)``: the fp32 routing weights ``w`` of the module docstring, the softmax
    ``p`` and the top-k multi-hot mask (ones for soft routing), all ``[..., E]``.

    ``top_k``: for-ai's ``_top_k_mask`` (``lax.top_k`` of ``p``, summed one-hots); ``renormalize``:
    MoE-PEFT's ``routing_weights /= routing_weights.sum(-1)`` over the selected experts.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    if top_k is None:
        return probs, probs, jnp.ones_like(probs)
    _, idx = lax.top_k(probs, top_k)
    mask = jnp.sum(jax.nn.one_hot(idx, probs.shape[-1], dtype=jnp.float32), axis=-2)
    weights = probs * mask
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, probs, mask


def aux_loss(aux) -> jax.Array:
    r"""The load-balancing loss ``coef * E * sum_e f_e P_e`` from the routers' :class:`RouterStats` in ``aux``.

    ``aux``: what the bridges return (``lrj.linen.apply(..., mutable=["adapter_aux"])[1]``, or
    ``lrj.nnx.apply(..., with_aux=True)[1]``), any tree holding the stats. As MoE-PEFT
    (``_mixtral_load_balancing_loss_func`` on ``torch.cat`` of every layer's router logits), the
    fractions are over the tokens of all routers together:
    ``f_e = sum(assigned_e) / sum(tokens)``, ``P_e = sum(probs_e) / sum(tokens)``. Raises
    ``ValueError`` when ``aux`` holds no router statistics (the collection was not mutable, or the
    adapter has ``aux_loss_coef=0``).
    """
    stats = [s for s in jax.tree.leaves(aux, is_leaf=lambda v: isinstance(v, RouterStats)) if isinstance(s, RouterStats)]
    if not stats:
        raise ValueError(f"no router statistics (RouterStats) in the aux tree {jax.tree.structure(aux)}: pass "
                         f"mutable=['adapter_aux'] (linen) / with_aux=True (NNX) and an adapter with aux_loss_coef > 0")
    experts = {s.assigned.shape[-1] for s in stats}
    if len(experts) != 1:
        raise ValueError(f"router statistics of different expert counts {sorted(experts)}: one adapter's aux at a time")
    (num_experts,) = experts
    flat = lambda v: jnp.reshape(v.astype(jnp.float32), (-1, num_experts))  # noqa: E731
    assigned = sum(jnp.sum(flat(s.assigned), 0) for s in stats)
    probs = sum(jnp.sum(flat(s.probs), 0) for s in stats)
    tokens = sum(jnp.sum(s.tokens.astype(jnp.float32)) for s in stats)
    coef = jnp.max(jnp.stack([jnp.max(s.coef) for s in stats]))
    return coef * num_experts * jnp.sum((assigned / tokens) * (probs / tokens))


def _check_int(name: str, value, minimum: int = 1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")


def _check_common(num_experts, rank, alpha, top_k, dropout, jitter, aux_loss_coef, init):
    _check_int("num_experts", num_experts)
    _check_int("rank", rank)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"`alpha` must be a positive number, got {alpha!r}")
    if top_k is not None:
        _check_int("top_k", top_k)
        if top_k > num_experts:
            raise ValueError(f"`top_k` ({top_k}) must be at most `num_experts` ({num_experts})")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}")
    if not isinstance(jitter, (int, float)) or not 0.0 <= jitter < 1.0:
        raise ValueError(f"`jitter` must be in [0, 1), got {jitter!r}")
    if jitter > 0.0 and dropout == 0.0:
        raise ValueError(f"`jitter` {jitter} needs `dropout` > 0: the bridges hand adapters their random keys only "
                         f"when the adapter has dropout (set e.g. dropout=1e-9 for jitter alone)")
    if not isinstance(aux_loss_coef, (int, float)) or aux_loss_coef < 0:
        raise ValueError(f"`aux_loss_coef` must be a number >= 0, got {aux_loss_coef!r}")
    if init not in _INITS:
        raise ValueError(f"`init` must be one of {_INITS}, got {init!r}")


def _lora_uniform(key, shape, fan_in: int):
    """U(-1/sqrt(in), 1/sqrt(in)) in fp32: torch's ``kaiming_uniform_(a=sqrt(5))``, as peft and MoE-PEFT draw ``lora_A``."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _draw_a(key, init: str, shape, fan_in: int, dtype):
    """``A`` (``[..., in, r]``): ``"normal"`` N(0, 0.02^2) as for-ai's ``lora_init_A``; ``"kaiming"`` :func:`_lora_uniform`."""
    if init == "normal":
        return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return _lora_uniform(key, shape, fan_in).astype(dtype)


def _mixture(method: str, roles: dict, num_experts: int, rank: int, alpha: float, targets, top_k, *, renormalize: bool,
             dropout: float, jitter: float, aux_loss_coef: float, layouts, init_target, down, extra_config: dict):
    """The :class:`base.Adapter` of a mixture: ``init_target(key, stack, ins, outs, dtype) -> leaves`` and
    ``down(site, x, leaves) -> [..., E, r]`` (the experts' ``x A_e``) are what MoLoRA and MALoRA differ in."""
    names = frozenset(roles)
    scale = lora_scale(rank, alpha)

    def init_fn(key, params):
        out = {}
        for i, t in enumerate(tree_lib.select_targets(params, targets, layouts)):
            stack, ins, outs = t.layout.split(tree_lib.shape_of(t.leaf))
            if rank > min(tree_lib.prod(ins), tree_lib.prod(outs)):
                raise ValueError(f"`rank` {rank} is larger than target {t.path!r} ({tree_lib.prod(ins)} in, "
                                 f"{tree_lib.prod(outs)} out)")
            dtype = t.leaf.dtype if jnp.issubdtype(t.leaf.dtype, jnp.floating) else jnp.float32
            k_router, k_experts = jax.random.split(jax.random.fold_in(key, i))
            leaves = init_target(k_experts, stack, ins, outs, dtype, t.path)
            # for-ai RouterWeights / MoE-PEFT gate: N(0, 0.02^2), no bias, kept in fp32
            leaves["router"] = 0.02 * jax.random.normal(k_router, (*stack, *ins, num_experts), jnp.float32)
            leaves["expert_b"] = jnp.zeros((*stack, num_experts, rank, *outs), dtype)
            out[t.keys] = leaves
        return tree_lib.nest(out)

    def apply_fn(leaves, site: base.Site, x, y, *, path: str, dropout_key=None):
        if site.kind != "linear":
            raise NotImplementedError(f"{method} supports linear layers; {path!r} is called as {site.kind!r}")
        k_drop, k_jitter = jax.random.split(dropout_key) if dropout_key is not None else (None, None)
        x_router = x.astype(jnp.float32)
        if k_jitter is not None and jitter > 0.0:  # for-ai Router: multiplicative noise on the router input only
            x_router = x_router * jax.random.uniform(k_jitter, x.shape, jnp.float32, 1.0 - jitter, 1.0 + jitter)
        logits = base.contract(x_router, base.replicated(leaves["router"].astype(jnp.float32)), site.inputs)
        weights, probs, mask = route(logits, top_k, renormalize)
        dtype = site.dtype or jnp.result_type(x, leaves["expert_b"])
        t = down(site, base.dropout(k_drop, x, dropout).astype(dtype), leaves, dtype)  # [..., E, r]
        t = t * base.match_sharding((weights * scale).astype(dtype)[..., None], t)
        delta = base.contract(t, leaves["expert_b"].astype(dtype), 2)
        out = y + base.match_sharding(delta.astype(y.dtype), y)
        if aux_loss_coef == 0.0:
            return out
        lead = tuple(range(mask.ndim - 1))
        stats = RouterStats(jnp.sum(mask, lead), jnp.sum(probs, lead), jnp.asarray(math.prod(mask.shape[:-1]), jnp.float32),
                            jnp.asarray(aux_loss_coef, jnp.float32))
        return base.WithAux(out, stats)

    def no_merge(params, adapter_params):
        raise ValueError(f"{method} has no dense merge: its update sum_e w_e(x) A_e B_e depends on the input through "
                         f"the router (top_k={top_k}), so no input-independent weight W + delta exists; run it "
                         f"factored (lrj.linen.apply / lrj.nnx.apply)")

    def penalty_fn(params, adapter_params):
        return jnp.zeros((), jnp.float32)

    config = dict(method=method, num_experts=num_experts, rank=rank, alpha=float(alpha), top_k=top_k,
                  renormalize=renormalize, dropout=float(dropout), jitter=float(jitter),
                  aux_loss_coef=float(aux_loss_coef), **extra_config, **tree_lib.targets_config(targets))
    return base.Adapter(init_fn, apply_fn, no_merge, no_merge, penalty_fn, names, config, dict(roles), layouts)


def _expert_down(site: base.Site, x, leaves, dtype):
    """``x A_e`` for every expert: ``[..., E, r]`` (``expert_a: [E, *in, r]`` moved to ``[*in, E, r]``)."""
    a = leaves["expert_a"]
    return base.contract(x, jnp.moveaxis(a, 0, -2).astype(dtype), site.inputs)


def molora(num_experts: int, rank: int, alpha: float, targets: tree_lib.Targets = r".*/kernel", top_k: int | None = None,
           *, renormalize: bool = False, dropout: float = 0.0, jitter: float = 0.0, aux_loss_coef: float = 0.0,
           init: str = "normal", layouts: Any = None, method: str = "molora") -> base.Adapter:
    r"""MoLoRA: ``E`` LoRA experts and a softmax router per target (the module docstring has the math).

    Defaults follow for-ai/parameter-efficient-moe: ``expert_a: [*stack, E, *in, r] ~ N(0, 0.02^2)``,
    ``expert_b: [*stack, E, r, *out] = 0``, ``router: [*stack, *in, E] ~ N(0, 0.02^2)`` (fp32, no bias), soft
    merge, scale ``alpha / r``; ``top_k``: the probabilities times the top-k one-hot, not renormalised.

    Args:
      num_experts: ``E``.
      rank, alpha: each expert's ``r`` and the scale ``alpha / r``.
      targets: regex / list / callable on "/"-joined param paths, as in :func:`lrj.lora`.
      top_k: ``None`` (soft merge over all experts) or ``k <= E``.
      renormalize: divide the top-k weights by their sum (MixLoRA, :func:`mixlora`).
      dropout: on the experts' input only (one mask for all experts; the router sees ``x``).
      jitter: multiply the router's input by ``U(1 - jitter, 1 + jitter)`` in training (for-ai's
        ``jitter_noise``; MoE-PEFT multiplies the whole FFN input in place). It uses the bridges'
        dropout key, so it needs ``dropout > 0``.
      aux_loss_coef: ``> 0``: ``apply`` returns ``base.WithAux(y, RouterStats)`` for :func:`aux_loss`.
      init: ``"normal"`` (``expert_a ~ N(0, 0.02^2)``, for-ai) or ``"kaiming"`` (peft/MoE-PEFT's LoRA init).
      layouts: for N-D kernels, as in :func:`lrj.lora`.
      method: the name in ``config``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"proj": {"kernel": jnp.ones((6, 4))}}
      >>> lp = molora(num_experts=3, rank=2, alpha=4.0).init(jax.random.key(0), params)
      >>> jax.tree.map(jnp.shape, lp)["proj"]["kernel"]
      {'expert_a': (3, 6, 2), 'expert_b': (3, 2, 4), 'router': (6, 3)}
    """
    _check_common(num_experts, rank, alpha, top_k, dropout, jitter, aux_loss_coef, init)

    def init_target(key, stack, ins, outs, dtype, path):
        return {"expert_a": _draw_a(key, init, (*stack, num_experts, *ins, rank), tree_lib.prod(ins), dtype)}

    return _mixture(method, EXPERT_ROLES, num_experts, rank, alpha, targets, top_k, renormalize=renormalize,
                    dropout=dropout, jitter=jitter, aux_loss_coef=aux_loss_coef, layouts=layouts,
                    init_target=init_target, down=_expert_down, extra_config={"init": init})


def mixlora(num_experts: int = 8, rank: int = 8, alpha: float = 16.0, targets: tree_lib.Targets = r".*/kernel",
            top_k: int = 2, *, dropout: float = 0.0, jitter: float = 0.0, aux_loss_coef: float = 0.001,
            layouts: Any = None) -> base.Adapter:
    r"""MixLoRA's routing (MoE-PEFT ``MixtralSparseMoe``) per targeted layer: top-``k`` (2) renormalised
    over the selected experts, kaiming-uniform ``a``, and the load-balancing aux loss (coef 0.001)
    returned through ``apply`` (``base.WithAux``; combine with :func:`aux_loss`).

    MoE-PEFT routes once per FFN and its experts are whole FFNs (base weights plus per-expert LoRAs);
    here each targeted linear layer has its own router, with MoE-PEFT's per-router math. Arguments as
    :func:`molora`.
    """
    if top_k is None:
        raise ValueError("mixlora routes to the top-k experts: `top_k` must be an integer, got None")
    return molora(num_experts, rank, alpha, targets, top_k, renormalize=True, dropout=dropout, jitter=jitter,
                  aux_loss_coef=aux_loss_coef, init="kaiming", layouts=layouts, method="mixlora")


def _malora_factors(key, num_experts: int, fan_in: int, rank: int, shared_rank: int, beta: float):
    """``(S [in, r_s], C [E, r_s, r])`` of one layer: the SVD of the ``E`` stacked kaiming-uniform draws."""
    draws = _lora_uniform(key, (num_experts, fan_in, rank), fan_in)
    stacked = jnp.moveaxis(draws, 0, 1).reshape(fan_in, num_experts * rank)  # [in, E r]: [M_1, ..., M_E]
    u, sv, vh = jnp.linalg.svd(stacked, full_matrices=False)
    u, sv, vh = u[:, :shared_rank], sv[:shared_rank], vh[:shared_rank]
    s = u * sv**beta
    c = (sv[:, None] ** (1.0 - beta) * vh).reshape(shared_rank, num_experts, rank)
    return s, jnp.moveaxis(c, 1, 0)


def malora(num_experts: int, rank: int, shared_rank: int, alpha: float, targets: tree_lib.Targets = r".*/kernel",
           top_k: int | None = None, *, renormalize: bool = False, beta: float = 0.5, dropout: float = 0.0,
           jitter: float = 0.0, aux_loss_coef: float = 0.0, layouts: Any = None) -> base.Adapter:
    r"""MALoRA: experts whose down-projections share one subspace, ``A_e = S C_e``.

    .. math::
        y = x W + s \sum_e w_e(p) \, ((x S) C_e) B_e, \qquad s = \alpha / r

    ``shared_a = S: [*stack, *in, r_s]`` (the shared subspace, ``r_s = shared_rank``),
    ``expert_c = C: [*stack, E, r_s, r]`` (each expert's coefficients), ``expert_b: [*stack, E, r, *out] = 0``; the router and the routing options
    are :func:`molora`'s. Parameters per layer ``in r_s + E r_s r + E r out`` against MoLoRA's
    ``E r (in + out)``: the saving on the down-projections pays for a larger ``rank`` of the
    up-projections (the paper's "expanded" rank; pass the expanded value as ``rank``).

    Init (seed 000 describes it, its formulas lost; every choice here is ours): draw ``E`` matrices
    ``M_e: [in, r]`` kaiming-uniform (``U(-1/sqrt(in), 1/sqrt(in))``, LoRA's ``A`` init), take the SVD
    of ``[M_1, ..., M_E] = U diag(sigma) V^T`` (``[in, E r]``), keep the top ``r_s`` triplets and split
    the singular values by ``beta``: ``S = U_{r_s} diag(sigma)^beta``,
    ``[C_1, ..., C_E] = diag(sigma)^{1-beta} V_{r_s}^T``. So ``A_e = S C_e = U_{r_s} U_{r_s}^T M_e``, the
    best joint rank-``r_s`` approximation of the kaiming draws, equal to them when
    ``r_s = min(in, E r)``; ``beta`` (0.5) sets how much of the scale sits in the shared part versus
    the experts' own (the paper's balance of general and task-specific learning).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"proj": {"kernel": jnp.ones((8, 4))}}
      >>> lp = malora(num_experts=2, rank=3, shared_rank=4, alpha=3.0).init(jax.random.key(0), params)
      >>> jax.tree.map(jnp.shape, lp)["proj"]["kernel"]
      {'expert_b': (2, 3, 4), 'expert_c': (2, 4, 3), 'router': (8, 2), 'shared_a': (8, 4)}
    """
    _check_common(num_experts, rank, alpha, top_k, dropout, jitter, aux_loss_coef, "kaiming")
    _check_int("shared_rank", shared_rank)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"`beta` must be in [0, 1], got {beta!r}")

    def init_target(key, stack, ins, outs, dtype, path):
        fan_in = tree_lib.prod(ins)
        if shared_rank > min(fan_in, num_experts * rank):
            raise ValueError(f"`shared_rank` {shared_rank} exceeds min(in, num_experts * rank) = "
                             f"{min(fan_in, num_experts * rank)} at {path!r}: the SVD of [M_1..M_E] has no more directions")
        keys = jax.random.split(key, tree_lib.prod(stack)) if stack else key[None]
        s, c = jax.vmap(lambda k: _malora_factors(k, num_experts, fan_in, rank, shared_rank, beta))(keys)
        return {"shared_a": s.reshape(*stack, *ins, shared_rank).astype(dtype),
                "expert_c": c.reshape(*stack, num_experts, shared_rank, rank).astype(dtype)}

    def down(site, x, leaves, dtype):
        t = base.contract(x, leaves["shared_a"].astype(dtype), site.inputs)  # [..., r_s]: the shared subspace, once
        return base.contract(t, jnp.moveaxis(leaves["expert_c"], 0, 1).astype(dtype), 1)  # [..., E, r]

    return _mixture("malora", MALORA_ROLES, num_experts, rank, alpha, targets, top_k, renormalize=renormalize,
                    dropout=dropout, jitter=jitter, aux_loss_coef=aux_loss_coef, layouts=layouts,
                    init_target=init_target, down=down, extra_config={"shared_rank": shared_rank, "beta": float(beta)})
