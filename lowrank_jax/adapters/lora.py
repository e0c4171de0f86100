"""LoRA and rsLoRA as a pure parameter transform.

References:
  Hu et al, `LoRA: Low-Rank Adaptation of Large Language Models
  <https://arxiv.org/abs/2106.09685>`_, 2021.
  Kalajdzievski, `A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA
  <https://arxiv.org/abs/2312.03732>`_, 2023.
Reference implementation matched: Hugging Face peft ``tuners/lora`` (``Linear``,
``Embedding``); tests compare outputs, merged weights and scalings with values
recorded from peft (``tests/fixtures/make_peft_lora.py``).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lowrank_jax import linalg
from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import base

__all__ = ["LoraGA", "init_with_residual", "lora", "lora_scale", "offset_to_plain_lora"]

_INITS = ("kaiming", "gaussian", "pissa", "pissa_niter_<n>", "olora", "lora_ga")
_OFFSET_INITS = ("pissa", "olora", "lora_ga")
_GA_DIRECTIONS = ("ArB2r", "A2rBr", "ArBr")
_GA_SCALES = {"official": ("stable", "gd", "unit", "weightS"), "peft": ("stable", "gd_scale", "unit", "weight_svd")}


class LoraGA(NamedTuple):
    r"""Options of the LoRA-GA init (``lrj.lora(init="lora_ga", lora_ga=LoraGA(...))``).

    direction: which singular vectors of ``G`` (``a`` from ``u``, ``b`` from ``vh``, 0-based):
      ``"ArB2r"`` (default) ``a = u[:, :r]``, ``b = vh[r:2r]``; ``"A2rBr"``
      ``a = u[:, r:2r]``, ``b = vh[:r]``; ``"ArBr"`` ``a = u[:, 1:2r:2]``, ``b = vh[0:2r:2]``.
    scale: ``"stable"`` (default) multiplies by ``out^{1/4} / sqrt(stable_gamma)``; official
      convention also ``"gd"`` (divide by ``s``), ``"unit"`` (none), ``"weightS"`` (the mean of
      ``sqrt(sigma_i(W) / s)`` over the top ``r``, exact singular values of ``W`` where the official code
      takes them from ``torch.svd_lowrank(W, q=4r, niter=4)``); peft convention ``"stable"`` (``b`` only),
      ``"gd_scale"``, ``"unit"``, ``"weight_svd"`` (``b`` times ``sigma_1(W) / sigma_{b,1}``, with an
      exact ``sigma_1(W)`` where peft takes it from ``torch.svd_lowrank(W, q=r)``).
    stable_gamma: ``gamma`` of the stable scale (16 in both references).
    niter: power iterations of the randomized SVD of ``G`` with ``min(4r, in, out)`` probes, as both
      references call ``torch.svd_lowrank(G, q=min(4r, ...), niter=4)``; ``None``: exact SVD.
    convention: ``"official"`` (the paper's repository, the default) or ``"peft"`` (as in peft 0.21.2).
    """

    direction: str = "ArB2r"
    scale: str = "stable"
    stable_gamma: float = 16.0
    niter: int | None = 4
    convention: str = "official"


def _parse_init(init: str) -> tuple[str, int | None]:
    """``"pissa_niter_4"`` -> ``("pissa", 4)``; others -> ``(init, None)``."""
    if isinstance(init, str) and init.startswith("pissa_niter_"):
        niter = init.removeprefix("pissa_niter_")
        if niter.isdigit():
            return "pissa", int(niter)
    return init, None


def _offset_factors(key, w2, r: int, scale: float, kind: str, niter: int | None):
    """Factors ``(a [in, r], b [r, out])`` of a 2-D fp32 kernel for the offset inits.

    PiSSA (Meng et al, `PiSSA <https://arxiv.org/abs/2404.02948>`_, 2024), as peft: with
    ``W = U S V^T``, ``a = U_r sqrt(S_r / s)``, ``b = sqrt(S_r / s) V_r^T``, so ``s a b`` is the best
    rank-r approximation of ``W``. OLoRA (Büyükakyüz, `OLoRA <https://arxiv.org/abs/2406.01775>`_,
    2024), as peft: ``W^T = Q R`` (torch orientation), ``lora_A = R[:r]``, ``lora_B = Q[:, :r]``.
    """
    if kind == "olora":
        # Householder QR's first r reflectors depend on W^T's first r columns only, so Q[:, :r] and the
        # triangle R[:r, :r] come from those columns' QR, and R[:r, r:] = Q[:, :r]^T W^T[:, r:]: the
        # rows of the full factorisation peft takes, at r/in of its cost.
        wt = w2.T
        q, head = linalg.qr(wt[:, :r])
        rr = jnp.concatenate([head, jnp.matmul(q.T, wt[:, r:], precision=linalg.HIGHEST)], axis=1)
        return rr.T, q.T
    if niter is None:
        u, sv, vh = linalg.svd(w2, r)
    else:  # torch.svd_lowrank(W, q=r, niter) as peft calls it: no oversampling
        u, sv, vh = linalg.randomized_svd(key, w2, r, oversample=0, niter=niter)
    root = jnp.sqrt(sv / scale)
    return u * root, root[:, None] * vh


def _lora_ga_factors(key, g2, w2, r: int, scale: float, ga: LoraGA):
    r"""Factors ``(a [in, r], b [r, out])`` of LoRA-GA from the averaged gradient ``g2 = E[dL/dW]: [in, out]``.

    ``G = u diag(sigma) vh`` (the top ``2r`` triplets, canonical signs: each ``u[:, i]``'s
    largest-magnitude entry positive, since ``a`` and ``b`` come from *different* pairs and
    ``s a b`` would otherwise depend on the LAPACK build); ``a`` and ``b`` are the
    direction's columns of ``u`` and rows of ``vh``, then scaled (see :class:`LoraGA`).
    """
    n_in, n_out = g2.shape
    g32 = g2.astype(jnp.float32)
    if ga.niter is None:
        u, sv, vh = linalg.svd(g32, 2 * r)
    else:
        probes = min(4 * r, n_in, n_out)
        u, sv, vh = linalg.randomized_svd(key, g32, 2 * r, oversample=probes - 2 * r, niter=ga.niter)
    idx_a, idx_b = {
        "ArB2r": (slice(0, r), slice(r, 2 * r)),
        "A2rBr": (slice(r, 2 * r), slice(0, r)),
        "ArBr": (slice(1, 2 * r, 2), slice(0, 2 * r, 2)),
    }[ga.direction]
    a, b, sigma_b = u[:, idx_a], vh[idx_b], sv[idx_b]
    stable = n_out**0.25 / math.sqrt(ga.stable_gamma)
    if ga.convention == "peft":
        b = sigma_b[:, None] * b
        if ga.scale == "stable":
            b = b * stable
        elif ga.scale == "gd_scale":
            a, b = a / scale, b / scale
        elif ga.scale == "weight_svd":
            top = jnp.linalg.svd(w2.astype(jnp.float32), compute_uv=False)[0]
            b = b * jnp.where(sigma_b[0] > 0, top / jnp.where(sigma_b[0] > 0, sigma_b[0], 1.0), 1.0)
        return a, b
    if ga.scale == "stable":
        a, b = a * stable, b * stable
    elif ga.scale == "gd":
        a, b = a / scale, b / scale
    elif ga.scale == "weightS":
        sw = jnp.linalg.svd(w2.astype(jnp.float32), compute_uv=False)[:r] / scale
        avg = jnp.mean(jnp.sqrt(sw))
        a, b = a * avg, b * avg
    return a, b


# One jitted program per (shape, rank, scale, options), mapping over the stacked layers with lax.map,
# not vmap, so that each SVD/QR runs on one matrix (see lrj.linalg.qr).
@functools.partial(jax.jit, static_argnames=("r", "scale", "kind", "niter"))
def _offset_stack(keys, w, *, r, scale, kind, niter):
    return jax.lax.map(lambda x: _offset_factors(x[0], x[1], r, scale, kind, niter), (keys, w))


@functools.partial(jax.jit, static_argnames=("r", "scale", "ga"))
def _lora_ga_stack(keys, g, w, *, r, scale, ga):
    return jax.lax.map(lambda x: _lora_ga_factors(x[0], x[1], x[2], r, scale, ga), (keys, g, w))


def _check_lora_ga(ga) -> LoraGA:
    ga = LoraGA() if ga is None else ga
    if not isinstance(ga, LoraGA):
        raise TypeError(f"`lora_ga` must be an lrj.LoraGA, got {type(ga).__name__}")
    if ga.convention not in _GA_SCALES:
        raise ValueError(f"`lora_ga.convention` must be one of {tuple(_GA_SCALES)}, got {ga.convention!r}")
    if ga.direction not in _GA_DIRECTIONS:
        raise ValueError(f"`lora_ga.direction` must be one of {_GA_DIRECTIONS}, got {ga.direction!r}")
    if ga.scale not in _GA_SCALES[ga.convention]:
        raise ValueError(
            f"`lora_ga.scale` must be one of {_GA_SCALES[ga.convention]} under the {ga.convention!r} convention, got {ga.scale!r}"
        )
    _check_positive("lora_ga.stable_gamma", ga.stable_gamma)
    if ga.niter is not None and (isinstance(ga.niter, bool) or not isinstance(ga.niter, int) or ga.niter < 0):
        raise ValueError(f"`lora_ga.niter` must be None (exact SVD) or an integer >= 0, got {ga.niter!r}")
    return ga


from lowrank_jax.adapters.scale import lora_scale, target_scale  # noqa: E402,F401  (lora_scale: re-exported)


def _check_positive(name: str, value, kind=(int, float)):
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        raise ValueError(f"`{name}` must be a positive number, got {value!r}")


def lora(
    rank: int = 8,
    alpha: float = 8.0,
    targets: tree_lib.Targets = r".*/kernel",
    *,
    rslora: bool = False,
    dropout: float = 0.0,
    init: str = "kaiming",
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    layouts: Mapping[str, Any] | Callable | None = None,
    param_dtype: Any = None,
    lora_ga: LoraGA | None = None,
    bias: str = "none",
) -> base.Adapter:
    r"""Low-rank adaptation of the targeted kernels.

    .. math::
        y = x W + s \, (\mathrm{dropout}(x) A) B, \qquad s = \alpha / r
        \;(\text{rsLoRA: } s = \alpha / \sqrt{r})

    in Flax orientation: ``W: [in, out]``, ``A = a: [in, r]``, ``B = b: [r, out]``
    (peft stores the transposes, ``lora_A.weight = a.T``, ``lora_B.weight = b.T``).
    N-D kernels are ``[*stack, *inputs, *outputs]`` (see :class:`lrj.Layout`) with
    ``a: [*stack, *inputs, r]`` and ``b: [*stack, r, *outputs]``.

    Init (peft's default, ``"kaiming"``): ``a ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))``
    (torch's ``kaiming_uniform_(a=sqrt(5))``), ``b = 0``; ``"gaussian"``:
    ``a ~ N(0, (1/r)^2)``, ``b = 0``. Either way the adapted model equals the
    base model at step 0. Embeddings (leaves named ``embedding``) are reversed,
    as in peft: ``a = 0: [vocab, r]``, ``b ~ N(0, 1): [r, dim]``, no dropout; the
    tied output head (``Embed.attend``) sees the same adapted table, so factored
    execution always equals running the merged weights.

    Args:
      rank: ``r``; peft's default is 8.
      alpha: ``alpha``; peft's default is 8.
      targets: regex fullmatched against "/"-joined param paths, a list of them,
        or a callable ``(path, leaf) -> bool``.
      rslora: use ``alpha / sqrt(r)``.
      dropout: probability of zeroing entries of ``x`` on the LoRA branch only;
        active only when the bridge is given a ``dropout_rng``.
      init: ``"kaiming"``, ``"gaussian"``, or an offset init computed from ``W`` as in peft:
        ``"pissa"`` (exact SVD), ``"pissa_niter_<n>"`` (randomized SVD with ``n``
        power iterations), ``"olora"`` (QR). With an offset init ``s A B != 0`` at step 0:
        train on the residual base ``adapter.unmerge(params, lora_params)`` (``W - s A B``),
        which with the adapter reproduces ``W`` exactly. ``"lora_ga"`` (Wang et al,
        `LoRA-GA <https://arxiv.org/abs/2407.05000>`_, 2024) is an offset init from the
        gradient: ``adapter.init(key, params, grads=G)`` with ``G`` the full gradient averaged
        over a few batches (:func:`lrj.average_gradient`); its SVD's leading singular vectors
        make the first LoRA step's ``s (dA B + A dB)`` the best approximation of a full
        fine-tuning step. Options in ``lora_ga`` (:class:`lrj.LoraGA`): the paper's official
        repository by default (``a = u[:, :r]``, ``b = vh[r:2r]``, both times
        ``out^{1/4}/sqrt(16)``). peft's ``init_lora_weights="lora_ga"`` differs (select it with
        ``LoraGA(convention="peft")``): it multiplies ``b`` by the singular values
        ``diag(sigma[r:2r])`` and applies the stable scale to ``b`` only, so its ``s a b`` is
        ``sigma``-weighted and ``out^{1/4}/4`` rather than ``sqrt(out)/16`` times the directions.
      rank_pattern, alpha_pattern: ``{regex: value}`` overriding ``rank``/``alpha``
        for the paths a regex fullmatches (the first matching regex wins); unlike
        peft's key matching, they are full regexes on the same paths as ``targets``.
      layouts: ``{path: Layout}`` or ``(path, leaf) -> Layout`` for kernels that
        are not 2-D (scanned stacks, DenseGeneral, Einsum); see
        ``lrj.linen.kernel_layouts``.
      param_dtype: dtype of ``a``/``b``; default: the kernel's dtype.
      lora_ga: options of ``init="lora_ga"`` (:class:`lrj.LoraGA`); default ``LoraGA()``.
      bias: peft's ``bias=``: ``"none"``; ``"all"``: every leaf named ``bias`` trains too (norms'
        included, as in peft); ``"lora_only"``: the biases of the LoRA-targeted layers train. The
        biases are :func:`lrj.full_finetune` leaves ``w`` (``lrj.combine``), so ``unmerge`` raises;
        ``lowrank_jax.io.peft`` saves them under peft's names (peft <= 0.20 dropped ``lora_only`` ones).

    Returns:
      An :class:`lrj.Adapter`.

    Example:
      >>> import jax, jax.numpy as jnp, lowrank_jax as lrj
      >>> params = {"params": {"Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}}
      >>> adapter = lrj.lora(rank=2, alpha=4.0, targets=r".*/kernel")
      >>> lp = adapter.init(jax.random.key(0), params)
      >>> jax.tree.map(jnp.shape, lp)
      {'params': {'Dense_0': {'kernel': {'a': (4, 2), 'b': (2, 3)}}}}
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"`rank` must be a positive integer, got {rank!r}")
    _check_positive("alpha", alpha)
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}")
    init_kind, niter = _parse_init(init)
    if init_kind not in ("kaiming", "gaussian", *_OFFSET_INITS):
        raise ValueError(f"`init` must be one of {_INITS}, got {init!r}")
    if lora_ga is not None and init_kind != "lora_ga":
        raise ValueError(f"`lora_ga` options are for init='lora_ga', not init={init!r}")
    ga = _check_lora_ga(lora_ga) if init_kind == "lora_ga" else None
    for pattern, r in (rank_pattern or {}).items():
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"`rank_pattern[{pattern!r}]` must be a positive integer, got {r!r}")
    for pattern, a in (alpha_pattern or {}).items():
        _check_positive(f"alpha_pattern[{pattern!r}]", a)
    if bias not in _BIASES:
        raise ValueError(f"`bias` must be one of {_BIASES}, got {bias!r}")
    dropout = float(dropout)

    def rank_of(path: str) -> int:
        return tree_lib.first_match(rank_pattern, path, rank)

    def scale_of(path: str, r: int | None = None) -> float:
        return target_scale({"alpha": alpha, "alpha_pattern": alpha_pattern, "rslora": rslora}, path, r or rank_of(path))

    def init_fn(key, params, *, grads=None):
        """``grads``: for ``init="lora_ga"`` only, the averaged full gradient, a tree like ``params``
        (or holding at least every target's kernel path)."""
        if init_kind == "lora_ga" and grads is None:
            raise ValueError("init='lora_ga' needs the averaged gradient: adapter.init(key, params, grads=lrj.average_gradient(...))")
        if init_kind != "lora_ga" and grads is not None:
            raise ValueError(f"`grads` is only used by init='lora_ga', not init={init!r}")
        grad_leaves = {keys: g for keys, _, g in tree_lib.flatten_with_paths(grads)} if grads is not None else {}
        found = tree_lib.select_targets(params, targets, layouts)
        keys = jax.random.split(key, len(found))
        out = {}
        for k, t in zip(keys, found):
            r = rank_of(t.path)
            stack, ins, outs = t.layout.split(tree_lib.shape_of(t.leaf))
            n_in, n_out = tree_lib.prod(ins), tree_lib.prod(outs)
            if r > min(n_in, n_out):
                raise ValueError(
                    f"rank {r} for {t.path!r} exceeds min(in, out) = min({n_in}, {n_out}) of its shape {tuple(tree_lib.shape_of(t.leaf))}"
                )
            dtype = param_dtype or t.leaf.dtype
            a_shape, b_shape = (*stack, *ins, r), (*stack, r, *outs)
            if init_kind in _OFFSET_INITS:
                if t.is_embedding:
                    raise ValueError(f"init {init!r} is for linear kernels; {t.path!r} is an embedding")
                w = linalg.check_finite(base.dense(t.leaf), t.path).reshape(-1, n_in, n_out)
                subkeys = jax.random.split(k, w.shape[0])
                if init_kind == "lora_ga":
                    if 2 * r > min(n_in, n_out):
                        raise ValueError(f"init 'lora_ga' takes 2r = {2 * r} singular vectors of {t.path!r}'s gradient; min(in, out) = {min(n_in, n_out)}")
                    g = grad_leaves.get(t.keys)
                    if g is None or tuple(jnp.shape(g)) != tuple(tree_lib.shape_of(t.leaf)):
                        found_shape = None if g is None else tuple(jnp.shape(g))
                        raise ValueError(f"`grads` has no gradient of shape {tuple(tree_lib.shape_of(t.leaf))} at {t.path!r} (found {found_shape})")
                    linalg.check_finite(g, f"gradient at {t.path}")
                    a, b = _lora_ga_stack(subkeys, jnp.reshape(g, (-1, n_in, n_out)), w, r=r, scale=scale_of(t.path, r), ga=ga)
                else:
                    a, b = _offset_stack(subkeys, w, r=r, scale=scale_of(t.path, r), kind=init_kind, niter=niter)
                out[t.keys] = {"a": a.reshape(a_shape).astype(dtype), "b": b.reshape(b_shape).astype(dtype)}
                continue
            if t.is_embedding:
                a = jnp.zeros(a_shape, dtype)
                b = jax.random.normal(k, b_shape, jnp.float32).astype(dtype)
            else:
                if init == "kaiming":
                    bound = 1.0 / math.sqrt(n_in)
                    a = jax.random.uniform(k, a_shape, jnp.float32, -bound, bound)
                else:
                    a = jax.random.normal(k, a_shape, jnp.float32) / r
                a, b = a.astype(dtype), jnp.zeros(b_shape, dtype)
            out[t.keys] = {"a": a, "b": b}
        return tree_lib.nest(out)

    def apply_fn(leaves, site: base.Site, x, y, *, path: str, dropout_key=None):
        a, b = leaves["a"], leaves["b"]
        if site.kind != "lookup":
            x = base.dropout(dropout_key, x, dropout)
        delta = base.low_rank(site, x, a, b, scale_of(path, a.shape[-1]))
        return y + base.match_sharding(delta.astype(y.dtype), y)

    def _deltas(params, adapter_params):
        out = {}
        for keys, path, kernel, leaves in base.resolve_targets(adapter_params, params, frozenset("ab")):
            layout = base.derive_layout(path, tree_lib.shape_of(kernel), leaves["a"].shape, leaves["b"].shape)
            scale = scale_of(path, leaves["a"].shape[-1])
            out[keys] = (kernel, base.dense_delta(leaves["a"], leaves["b"], layout, tree_lib.shape_of(kernel), scale))
        return out

    def merge_fn(params, adapter_params):
        new = {k: (base.dense(w) + d).astype(w.dtype) for k, (w, d) in _deltas(params, adapter_params).items()}
        return base.replace_leaves(params, new)

    def unmerge_fn(params, adapter_params):
        new = {k: (base.dense(w) - d).astype(w.dtype) for k, (w, d) in _deltas(params, adapter_params).items()}
        return base.replace_leaves(params, new)

    def penalty_fn(params, adapter_params):
        r"""``sum over targets of ||s A B||_F^2``, as ``s^2 tr((A^T A)(B B^T))``: r x r products, never in x out."""
        total = jnp.zeros((), jnp.float32)
        for _, path, kernel, leaves in base.resolve_targets(adapter_params, params, frozenset("ab")):
            a = base.replicated(leaves["a"].astype(jnp.float32))
            b = base.replicated(leaves["b"].astype(jnp.float32))
            layout = base.derive_layout(path, tree_lib.shape_of(kernel), a.shape, b.shape)
            stack = tree_lib.shape_of(kernel)[: layout.stack]
            r = a.shape[-1]
            a2, b2 = a.reshape(*stack, -1, r), b.reshape(*stack, r, -1)
            ata = jnp.einsum("...ir,...is->...rs", a2, a2)
            bbt = jnp.einsum("...ro,...so->...rs", b2, b2)
            total = total + scale_of(path, r) ** 2 * jnp.sum(ata * bbt)
        return total

    config = dict(
        method="lora", rank=rank, alpha=alpha, **tree_lib.targets_config(targets),
        rslora=rslora, dropout=dropout, init=init, rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
    )
    if ga is not None:
        config["lora_ga"] = ga._asdict()
    adapter = base.Adapter(init_fn, apply_fn, merge_fn, unmerge_fn, penalty_fn, frozenset("ab"), config,
                           dict(base.LORA_ROLES), layouts)
    return adapter if bias == "none" else _with_biases(adapter, bias)


_BIASES = ("none", "all", "lora_only")
#: Every leaf named ``bias`` (peft's ``bias="all"``: parameters named ``bias`` or ``*.bias``).
ALL_BIASES = r"(.*/)?bias"


def _with_biases(adapter: base.Adapter, bias: str) -> base.Adapter:
    """``adapter`` (LoRA) with trained biases: ``lrj.combine(adapter, lrj.full_finetune(biases))``, its
    config LoRA's plus ``bias``; for ``"lora_only"`` the biases are found at init, beside the targeted kernels."""
    from lowrank_jax.adapters import combinators  # combinators imports base only; lazily, to keep lora's imports flat

    def init_fn(key, params, **init_kwargs):
        lora_params = adapter.init(key, params, **init_kwargs)
        if bias == "all":
            return tree_lib.merge_trees(lora_params, combinators.full_finetune(ALL_BIASES).init(key, params))
        present = {keys for keys, _, _ in tree_lib.flatten_with_paths(params)}
        paths = [tree_lib.path_str(keys[:-1] + ("bias",)) for keys, _ in tree_lib.adapter_paths(lora_params, adapter.leaf_names)
                 if keys[:-1] + ("bias",) in present]
        if not paths:
            return lora_params
        biases = combinators.full_finetune([re.escape(p) for p in paths]).init(key, params)
        return tree_lib.merge_trees(lora_params, biases)

    combined = combinators.combine(adapter, combinators.full_finetune(ALL_BIASES))
    return combined._replace(init=init_fn, config={**adapter.config, "bias": bias})


def init_with_residual(adapter: base.Adapter, key, params, **init_kwargs) -> tuple[Any, Any]:
    r"""``(adapter_params, residual_params)`` for an offset init (PiSSA, OLoRA, LoRA-GA).

    The residual base is ``W_res = W - s A_0 B_0`` on every target (``adapter.unmerge``,
    computed in float32 and cast back to each kernel's dtype), so that
    ``W_res + s A_0 B_0 = W``: training starts from the base model's function.
    ``init_kwargs`` go to ``adapter.init`` (``grads=`` for LoRA-GA). Keep ``params``
    (the original base) for :func:`offset_to_plain_lora`.

    Example:
      >>> import jax, jax.numpy as jnp, lowrank_jax as lrj
      >>> params = {"params": {"proj": {"kernel": jax.random.normal(jax.random.key(0), (6, 4))}}}
      >>> adapter = lrj.lora(rank=2, alpha=2.0, targets=".*", init="pissa")
      >>> lp, residual = lrj.init_with_residual(adapter, jax.random.key(1), params)
      >>> merged = adapter.merge(residual, lp)["params"]["proj"]["kernel"]
      >>> bool(jnp.allclose(merged, params["params"]["proj"]["kernel"], atol=1e-5))
      True
    """
    adapter_params = adapter.init(key, params, **init_kwargs)
    return adapter_params, adapter.unmerge(params, adapter_params)


def offset_to_plain_lora(adapter: base.Adapter, params, initial, trained) -> tuple[base.Adapter, Any]:
    r"""Exports an adapter trained from an offset init (PiSSA, OLoRA) as plain LoRA on the original base.

    Training ran on the residual ``W_res = W - s A_0 B_0``; the trained model is
    ``W_res + s A B = W + s (A B - A_0 B_0)``, a rank-``2r`` update of ``W``:

    .. math:: A' = [A, A_0], \quad B' = [B; -B_0], \quad \alpha' = 2\alpha \;(\sqrt{2}\alpha \text{ under rsLoRA})

    (Flax orientation; ``alpha'`` keeps ``s' = alpha' / (2r) = s``). Returns
    ``(adapter', params')`` for use with the untouched base ``params`` (which also give
    the kernels' layouts), as peft's
    ``path_initial_model_for_weight_conversion`` export does.
    """
    cfg = adapter.config
    factor = math.sqrt(2.0) if cfg["rslora"] else 2.0
    out, rank_pattern, alpha_pattern = {}, {}, {}
    initial_targets = dict(tree_lib.adapter_paths(initial, frozenset("ab")))
    for keys, path_str, kernel, leaves in base.resolve_targets(trained, params, frozenset("ab")):
        if keys not in initial_targets:
            raise ValueError(f"{tree_lib.path_str(keys)!r} is in the trained adapter but not in the initial one")
        a0, b0 = initial_targets[keys]["a"], initial_targets[keys]["b"]
        a, b = leaves["a"], leaves["b"]
        if a.shape != a0.shape or b.shape != b0.shape:
            raise ValueError(f"{tree_lib.path_str(keys)!r}: trained and initial factors differ in shape")
        r = a.shape[-1]
        rank_axis = base.derive_layout(path_str, tree_lib.shape_of(kernel), a.shape, b.shape).stack  # b: [*stack, r, *out]
        out[keys] = {"a": jnp.concatenate([a, a0], axis=-1), "b": jnp.concatenate([b, -b0], axis=rank_axis)}
        path = re.escape(tree_lib.path_str(keys))
        rank_pattern[path] = 2 * r
        alpha_pattern[path] = factor * tree_lib.first_match(cfg["alpha_pattern"], tree_lib.path_str(keys), cfg["alpha"])
    exported = lora(rank=2 * cfg["rank"], alpha=factor * cfg["alpha"], targets=list(rank_pattern), rslora=cfg["rslora"],
                    dropout=cfg["dropout"], rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    return exported, tree_lib.nest(out)
