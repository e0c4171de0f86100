r"""VeRA: one shared frozen pair of random projections, per-layer trained scaling vectors.

Reference: Kopiczko et al, `VeRA: Vector-based Random Matrix Adaptation
<https://arxiv.org/abs/2310.11454>`_, 2024. Reference implementation matched: peft
``tuners/vera`` (0.21.2), recorded in ``tests/fixtures/make_peft_vera.py``.

In Flax orientation, with the shared projections ``A: [max_in, r]`` and ``B: [r, max_out]``
(peft's ``vera_A = A.T: [r, max_in]``, ``vera_B = B.T: [max_out, r]``; the maxima over the
targeted layers) and a layer's slices ``A_s = A[:in]``, ``B_s = B[:, :out]``:

.. math::
    y = x W + \big(((\mathrm{dropout}(x) A_s) \odot \lambda_d) B_s\big) \odot \lambda_b,
    \qquad \Delta W = (A_s \operatorname{diag}\lambda_d)(B_s \operatorname{diag}\lambda_b)

``lambda_d: [r] = d_initial`` and ``lambda_b: [out] = 0`` are trained; ``A`` and ``B`` are
frozen and stored once (:attr:`lrj.Leaf.shared`), not per layer.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import base

__all__ = ["vera"]

ROLES = {
    "lambda_d": base.Leaf(("stack", "rank")),
    "lambda_b": base.Leaf(("stack", "out")),
    "vera_a": base.Leaf(("max_in", "rank"), trainable=False, shared=True),
    "vera_b": base.Leaf(("rank", "max_out"), trainable=False, shared=True),
}
_OWN = ("lambda_d", "lambda_b")


def _kaiming_uniform(key, shape, fan_in: int):
    """U(-sqrt(6 / fan_in), +sqrt(6 / fan_in)): torch's ``kaiming_uniform_`` with ``a = 0``, as peft draws both."""
    bound = math.sqrt(6.0 / fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def vera(rank: int = 256, targets: tree_lib.Targets = r".*/kernel", *, d_initial: float = 0.1,
         projection_key: int = 0, dropout: float = 0.0, layouts: Any = None, param_dtype: Any = None) -> base.Adapter:
    r"""VeRA on the targeted kernels (see the module docstring for the math).

    Args:
      rank: ``r`` of the shared projections (peft's default 256).
      targets: regex / list / callable on "/"-joined param paths, as in :func:`lrj.lora`.
      d_initial: the initial value of every ``lambda_d`` (peft: 0.1).
      projection_key: seed of the shared projections. peft draws them with torch's generator,
        which JAX cannot reproduce: to match a peft model exactly, load its saved projections
        (``lrj.io.peft``); the distribution is peft's (:func:`_kaiming_uniform`, ``A`` then ``B``).
      dropout: on the VeRA branch's input only, as peft's ``vera_dropout``.
      layouts: for N-D kernels, as in :func:`lrj.lora`.
      param_dtype: dtype of the leaves; default float32.

    Returns:
      An :class:`lrj.Adapter` whose tree holds ``lambda_d``/``lambda_b`` per target and the
      shared ``vera_a: [max_in, r]``, ``vera_b: [r, max_out]`` under ``lrj.tree.SHARED``.

    Example:
      >>> import jax, jax.numpy as jnp, lowrank_jax as lrj
      >>> params = {"params": {"up": {"kernel": jnp.ones((6, 10))}, "down": {"kernel": jnp.ones((10, 4))}}}
      >>> lp = lrj.vera(rank=4).init(jax.random.key(0), params)
      >>> jax.tree.map(jnp.shape, lp)["@shared"]
      {'vera_a': (10, 4), 'vera_b': (4, 10)}
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"`rank` must be a positive integer, got {rank!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}")
    names = frozenset(ROLES)

    def init_fn(key, params):
        del key  # the shared projections come from `projection_key`, the scalings are constants
        found = tree_lib.select_targets(params, targets, layouts)
        dtype = param_dtype or jnp.float32
        sizes = []
        out = {}
        for t in found:
            stack, ins, outs = t.layout.split(tree_lib.shape_of(t.leaf))
            sizes.append((tree_lib.prod(ins), tree_lib.prod(outs)))
            out[t.keys] = {"lambda_d": jnp.full((*stack, rank), d_initial, dtype), "lambda_b": jnp.zeros((*stack, *outs), dtype)}
        max_in, max_out = max(i for i, _ in sizes), max(o for _, o in sizes)
        key_a, key_b = jax.random.split(jax.random.key(projection_key))  # peft: one generator, A then B
        tree = tree_lib.nest(out)
        tree[tree_lib.SHARED] = {
            "vera_a": _kaiming_uniform(key_a, (rank, max_in), max_in).T.astype(dtype),  # peft vera_A [r, max_in]
            "vera_b": _kaiming_uniform(key_b, (max_out, rank), rank).T.astype(dtype),  # peft vera_B [max_out, r]
        }
        return tree

    def sliced(path: str, leaves, ins: tuple, outs: tuple, stack: int = 0):
        """``(A_s diag(lambda_d), B_s diag(lambda_b))`` as ``[*stack, *ins, r]`` and ``[*stack, r, *outs]``."""
        a_shared, b_shared = leaves["vera_a"], leaves["vera_b"]
        n_in, n_out = tree_lib.prod(ins), tree_lib.prod(outs)
        if n_in > a_shared.shape[0] or n_out > b_shared.shape[1]:
            raise ValueError(
                f"VeRA target {path!r} ({n_in} in, {n_out} out) is larger than the shared projections "
                f"(vera_a {tuple(a_shared.shape)}, vera_b {tuple(b_shared.shape)}): they were made for other layers"
            )
        lam_d, lam_b = leaves["lambda_d"], leaves["lambda_b"]
        a = jnp.expand_dims(lam_d, tuple(range(stack, stack + len(ins)))) * a_shared[:n_in].reshape(*ins, -1)
        b = jnp.expand_dims(lam_b, stack) * b_shared[:, :n_out].reshape(-1, *outs)
        return a, b

    def apply_fn(leaves, site: base.Site, x, y, *, path: str, dropout_key=None):
        if site.kind != "linear":
            raise NotImplementedError(f"VeRA supports linear layers; {path!r} is called as {site.kind!r}")
        kernel_shape = tree_lib.shape_of(site.kernel)
        a, b = sliced(path, leaves, kernel_shape[: site.inputs], kernel_shape[site.inputs:])
        delta = base.low_rank(site, base.dropout(dropout_key, x, dropout), a, b, 1.0)
        return y + base.match_sharding(delta.astype(y.dtype), y)

    def _deltas(params, adapter_params):
        shared = tree_lib.shared_of(adapter_params)
        out = {}
        for keys, path, kernel, leaves in base.resolve_targets(adapter_params, params, names):
            shape = tree_lib.shape_of(kernel)
            layout = base.layout_of(path, shape, leaves, ROLES)
            stack, ins, outs = layout.split(shape)
            a, b = sliced(path, {**leaves, **shared}, ins, outs, len(stack))
            out[keys] = (kernel, base.dense_delta(a, b, layout, shape, 1.0))
        return out

    merge_fn, unmerge_fn = base.additive_merge(_deltas)

    def penalty_fn(params, adapter_params):
        return jnp.zeros((), jnp.float32)

    config = dict(method="vera", rank=rank, d_initial=d_initial, projection_key=projection_key, dropout=float(dropout),
                  **tree_lib.targets_config(targets))
    return base.Adapter(init_fn, apply_fn, merge_fn, unmerge_fn, penalty_fn, names, config, dict(ROLES), layouts)
