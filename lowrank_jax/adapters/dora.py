"""DoRA: weight-decomposed low-rank adaptation, as a pure parameter transform.

References:
  Liu et al, `DoRA: Weight-Decomposed Low-Rank Adaptation
  <https://arxiv.org/abs/2402.09353>`_, 2024.
Reference implementation matched: Hugging Face peft ``tuners/lora/dora.py``
(``DoraLinearLayer``); tests compare outputs and merged weights with values
recorded from peft (``tests/fixtures/make_peft_dora.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
from jax import lax

from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import base
from lowrank_jax.adapters.lora import lora
from lowrank_jax.adapters.scale import target_scale

__all__ = ["dora", "column_norms", "weight_norms"]


def column_norms(kernel, a, b, scale: float, inputs: int):
    r"""``||W + s A B||`` per output unit (norm over the input axes), without forming ``A B``.

    .. math::
        n_j^2 = \|w_j\|^2 + 2 s\, (W^T A)_j \cdot b_j + s^2\, b_j^T (A^T A)\, b_j

    for a per-call kernel ``[*inputs, *outputs]``, ``a: [*inputs, r]``, ``b: [r, *outputs]``.
    Costs ``O(in * out * r)`` like the dense form but keeps no ``in x out`` temporary.
    """
    dtype = jnp.float32
    w = kernel.astype(dtype)
    a, b = a.astype(dtype), b.astype(dtype)
    in_axes = tuple(range(inputs))
    w_sq = jnp.sum(w * w, axis=in_axes)  # [*outputs]
    at = jnp.moveaxis(a, -1, 0)  # [r, *inputs]; contract() compiles over sharded inputs under an Explicit mesh
    wta = base.contract(at, w, inputs)  # [r, *outputs]
    ata = base.contract(at, a, inputs)  # [r, r]
    cross = jnp.sum(wta * b, axis=0)
    quad = jnp.sum(b * base.contract(ata, b, 1), axis=0)
    return jnp.sqrt(jnp.maximum(w_sq + 2.0 * scale * cross + scale * scale * quad, 0.0))


def dora(
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
    detach_norm: bool = True,
) -> base.Adapter:
    r"""DoRA on the targeted kernels: a learned magnitude per output unit times a LoRA-updated direction.

    In Flax orientation (``W: [in, out]``, norms over the input axis, one per output unit ``j``):

    .. math::
        W' = m \odot \frac{W + s A B}{\|W + s A B\|_c}, \qquad
        y = x W + (g - 1) \odot (x W) + g \odot s\,(x A) B + \text{bias},\quad g = m / \|W + s A B\|_c

    with ``m`` initialised to ``||W||_c`` (B = 0 at init, so the model starts as the base).
    As in peft and the paper's section 4.3, the norm is computed with ``A B`` detached
    and the norm itself detached (``detach_norm=True``, default): it rescales the output
    but passes no gradient, which saves memory; ``detach_norm=False`` keeps the paper's
    full gradient. With active dropout, peft's convention: the ``(g - 1)`` term uses the
    dropped input, ``(g - 1) (dropout(x) W)``. The norm is computed in factored form
    (:func:`column_norms`). Leaves: ``a``, ``b`` as in :func:`lrj.lora` and ``m: [*stack, *outputs]``.

    ``unmerge`` needs the norms the merge used, because ``W`` cannot be recovered from
    ``W'`` alone (every column's scale is lost); pass ``norms=`` computed by
    ``lrj.dora_weight_norms(adapter, params, adapter_params)`` before merging (peft caches the
    same norm in its layer); :func:`weight_norms` computes them.

    Linear layers only (Dense, DenseGeneral, Einsum; not embeddings).

    Example:
      >>> import jax, jax.numpy as jnp, lowrank_jax as lrj
      >>> params = {"params": {"Dense_0": {"kernel": jnp.ones((4, 3))}}}
      >>> lp = lrj.dora(rank=2, targets=r".*/kernel").init(jax.random.key(0), params)
      >>> lp["params"]["Dense_0"]["kernel"]["m"]  # ||W||_c = sqrt(4)
      Array([2., 2., 2.], dtype=float32)
    """
    if isinstance(init, str) and init.startswith(("pissa", "olora", "lora_ga")):
        raise ValueError(f"DoRA takes init 'kaiming' or 'gaussian'; offset inits ({init!r}) are for lrj.lora only")
    inner = lora(rank, alpha, targets, rslora=rslora, dropout=dropout, init=init, rank_pattern=rank_pattern,
                 alpha_pattern=alpha_pattern, layouts=layouts, param_dtype=param_dtype)
    names = frozenset("abm")

    def init_fn(key, params):
        lp = inner.init(key, params)
        flat = {keys: leaf for keys, _, leaf in tree_lib.flatten_with_paths(params)}
        out = {}
        for keys, leaves in tree_lib.adapter_paths(lp, frozenset("ab")):
            path = tree_lib.path_str(keys)
            if keys[-1] in tree_lib.EMBEDDING_NAMES:
                raise ValueError(f"DoRA supports linear layers only; {path!r} is an embedding")
            kernel = base.dense(flat[keys])
            layout = base.derive_layout(path, tree_lib.shape_of(kernel), leaves["a"].shape, leaves["b"].shape)
            axes = tuple(range(layout.stack, layout.stack + layout.inputs))
            m = jnp.sqrt(jnp.sum(jnp.square(kernel), axis=axes))  # B = 0: ||W||_c
            out[keys] = {**leaves, "m": m.astype(param_dtype or flat[keys].dtype)}
        return tree_lib.nest(out)

    def apply_fn(leaves, site: base.Site, x, y, *, path: str, dropout_key=None):
        if site.kind != "linear":
            raise NotImplementedError(f"DoRA supports linear layers only; {path!r} is called as {site.kind!r}")
        a, b, m = leaves["a"], leaves["b"], leaves["m"]
        scale = target_scale(inner.config, path, a.shape[-1])
        kernel = site.kernel
        na, nb = (lax.stop_gradient(a), lax.stop_gradient(b)) if detach_norm else (a, b)
        norm = column_norms(kernel, na, nb, scale, site.inputs)
        if detach_norm:
            norm = lax.stop_gradient(norm)
        g = (m.astype(jnp.float32) / norm).astype(y.dtype)
        xd = base.dropout(dropout_key, x, dropout)
        delta = base.match_sharding(base.low_rank(site, xd, a, b, scale).astype(y.dtype), y)
        # y + (g - 1) base + g delta, written as rest + g (base + delta) so that the backward pass
        # keeps one [tokens, out] tensor per layer (base + delta) for dL/dm instead of two.
        if xd is x:
            if site.bias is None:
                return g * (y + delta)
            bias = site.bias.astype(y.dtype)
            return bias + g * ((y - bias) + delta)
        # peft: with active dropout the magnitude rescales the dropped input's base output
        dtype = site.dtype or jnp.result_type(x, kernel)
        base_out = base.match_sharding(base.contract(xd.astype(dtype), kernel.astype(dtype), site.inputs).astype(y.dtype), y)
        return (y - base_out) + g * (base_out + delta)

    def merge_fn(params, adapter_params):
        new = {}
        for keys, _, kernel, leaves, axes, delta in _deltas(inner.config, params, adapter_params, names):
            v = base.dense(kernel) + delta
            n = jnp.sqrt(jnp.sum(v * v, axis=axes, keepdims=True))
            new[keys] = (_expand(leaves["m"].astype(jnp.float32), axes) / n * v).astype(kernel.dtype)
        return base.replace_leaves(params, new)

    def unmerge_fn(params, adapter_params, norms=None):
        if norms is None:
            raise ValueError(
                "DoRA's merge is not invertible from merged weights alone (each column's scale ||W + sAB|| is lost); "
                "pass norms=lrj.dora_weight_norms(adapter, base_params, adapter_params), computed before merging"
            )
        new = {}
        for keys, path, kernel, leaves, axes, delta in _deltas(inner.config, params, adapter_params, names):
            n = _expand(jnp.asarray(norms[path], jnp.float32), axes)
            v = base.dense(kernel) * n / _expand(leaves["m"].astype(jnp.float32), axes)
            new[keys] = (v - delta).astype(kernel.dtype)
        return base.replace_leaves(params, new)

    def penalty_fn(params, adapter_params):
        factors = {keys: {"a": lv["a"], "b": lv["b"]} for keys, lv in tree_lib.adapter_paths(adapter_params, names)}
        return inner.penalty(params, tree_lib.nest(factors))

    config = {**inner.config, "method": "dora", "detach_norm": detach_norm}
    return base.Adapter(init_fn, apply_fn, merge_fn, unmerge_fn, penalty_fn, names, config,
                        {**base.LORA_ROLES, "m": base.Leaf(("stack", "out"))}, layouts)


def _expand(m, axes):
    for ax in axes:
        m = jnp.expand_dims(m, ax)
    return m


def _deltas(config, params, adapter_params, names):
    """``(keys, path, kernel, leaves, input axes, s A B as a dense fp32 kernel)`` for every target."""
    for keys, path, kernel, leaves in base.resolve_targets(adapter_params, params, names):
        shape = tree_lib.shape_of(kernel)
        layout = base.derive_layout(path, shape, leaves["a"].shape, leaves["b"].shape)
        scale = target_scale(config, path, leaves["a"].shape[-1])
        delta = base.dense_delta(leaves["a"], leaves["b"], layout, shape, scale)
        yield keys, path, kernel, leaves, tuple(range(layout.stack, layout.stack + layout.inputs)), delta


def weight_norms(adapter: base.Adapter, params, adapter_params) -> dict:
    """``{target path: ||W + s A B||_c}`` as DoRA's ``merge`` uses them; keep them to ``unmerge`` later."""
    out = {}
    for _, path, kernel, _, axes, delta in _deltas(adapter.config, params, adapter_params, adapter.leaf_names):
        v = base.dense(kernel) + delta
        out[path] = jnp.sqrt(jnp.sum(v * v, axis=axes))
    return out
