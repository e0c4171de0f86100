r"""GaLore: gradient low-rank projection, equal to galore-torch's ``GaLoreAdamW`` step for step.

For a weight matrix with gradient ``G: [m, n]`` GaLore keeps the optimizer state
in a rank-``r`` subspace refreshed every ``T`` steps from the gradient's SVD:

.. math::
    \text{at } t \equiv 0 \ (\mathrm{mod}\ T):\ U \Sigma V^\top = \mathrm{svd}(G_t)
    \ \text{(float32)}, \qquad
    R_t = \begin{cases} G_t V_r & \text{right: } P = V_r^\top \\
                        U_r^\top G_t & \text{left: } P = U_r \\
                        U_r^\top G_t V_r & \text{full} \end{cases}

then ``N_t = inner(R_t)`` (Adam by default, moments of ``R``'s shape, *not*
reset when ``P`` changes) and the update is ``alpha * back(N_t)`` with ``back``
the transpose map (``N P``, ``P N`` or ``U_r N V_r^T``) and ``alpha = scale``.
``proj_type`` picks the side: ``"std"`` projects the larger dimension away
(``right`` when ``m >= n``, else ``left``), ``"reverse_std"`` the opposite,
``"left"``/``"right"``/``"full"`` as named. The step counter is read *before*
it is incremented, so the projector is computed at steps 0, T, 2T, ...

Reference: Zhao et al, `GaLore: Memory-Efficient LLM Training by Gradient
Low-Rank Projection <https://arxiv.org/abs/2403.03507>`_, 2024. Reference
implementation matched: galore-torch 1.0 (``galore_projector.py``,
``GaLoreAdamW`` in ``adamw.py``); ``tests/fixtures/make_optim_references.py``
records its trajectories for every ``proj_type``, and the tests replay them.

Differences from :func:`optax.contrib.galore` (optax 0.2.8), which does *not*
reproduce galore-torch: optax projects the other side (``U`` when ``m >= n``),
uses :func:`optax.scale_by_adam` (``eps = 1e-8`` added to the bias-corrected
``sqrt(v_hat)``) and decays weights before the step; here the side, the
reference's Adam (:func:`lrj.optim.scale_by_adam_hf`, ``eps = 1e-6``) and its
decay after the step (:func:`lrj.optim.add_decayed_weights_after_step`) follow
galore-torch. optax's interface (dimension numbers, an inner transform, the
refresh under ``lax.cond``) is kept.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from optax.contrib import GaLoreDimensionNumbers

from lowrank_jax import linalg
from lowrank_jax import tree as tree_lib
from lowrank_jax.optim import _common, _linalg
from lowrank_jax.optim.adam import add_decayed_weights_after_step, scale_by_adam_hf

__all__ = [
    "GaLoreDimensionNumbers",
    "GaLoreProjector",
    "ScaleByGaLoreState",
    "scale_by_galore",
    "galore",
]

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SVD_METHODS = ("exact", "randomized")

DimSpec = GaLoreDimensionNumbers | tree_lib.Layout | None


class GaLoreProjector(NamedTuple):
    """The projector of one parameter, for its matrix ``G: [*batch, m, n]`` (see :func:`scale_by_galore`).

    u: ``[*batch, m, k]`` left singular vectors (``left`` and ``full`` projections),
      else :class:`optax.MaskedNode`.
    vh: ``[*batch, k, n]`` right singular vectors (``right`` and ``full``), else ``MaskedNode``.
    Both have the parameter's dtype (the SVD itself runs in float32).
    """

    u: Any
    vh: Any


class ScaleByGaLoreState(NamedTuple):
    """State of :func:`scale_by_galore`.

    count: ``[]`` int32, updates applied so far; projectors refresh when ``count % update_proj_gap == 0``.
    projectors: a tree like the params: a :class:`GaLoreProjector` for each projected
      parameter, :class:`optax.MaskedNode` for the others.
    inner_state: the inner transform's state over the projected tree (the projected
      shapes ``[*batch, m, k]``, ``[*batch, k, n]`` or ``[*batch, k, k]`` for projected
      parameters, the full shape for the others).
    """

    count: jax.Array
    projectors: Any
    inner_state: Any


class _Plan(NamedTuple):
    """How one leaf is projected (static)."""

    path: str
    shape: tuple[int, ...]
    batch: tuple[int, ...]  # axes of independent matrices (e.g. scanned layers)
    rows: tuple[int, ...]  # axes forming m (output axes)
    cols: tuple[int, ...]  # axes forming n (reduction / input axes)
    m: int
    n: int
    k: int
    side: str  # "left" | "right" | "full"

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.batch)

    @property
    def perm(self) -> tuple[int, ...]:
        return self.batch + self.rows + self.cols

    def projected_shape(self) -> tuple[int, ...]:
        inner = {"right": (self.m, self.k), "left": (self.k, self.n), "full": (self.k, self.k)}[self.side]
        return self.batch_shape + inner


def _axes(value, ndim: int) -> tuple[int, ...]:
    axes = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
    return tuple(int(a) % ndim for a in axes)


def _split_dims(spec: DimSpec, path: str, shape: tuple[int, ...]):
    """``(batch, rows, cols)`` axes of ``shape`` described by ``spec``.

    A :class:`lowrank_jax.tree.Layout` (the one description of how a kernel's axes
    split into ``[*stack, *inputs, *outputs]``) is split by :meth:`~lowrank_jax.tree.Layout.split`:
    its stack axes are the batch, its output axes the rows (``m``) and its input axes
    the columns (``n``). A ``GaLoreDimensionNumbers`` may name any axes (not only a
    contiguous ``[*stack, *inputs, *outputs]`` split); the axes in neither group are the batch.
    """
    ndim = len(shape)
    if isinstance(spec, tree_lib.Layout):
        if spec.stack < 0 or spec.inputs < 1 or spec.stack + spec.inputs >= ndim:
            raise ValueError(f"layout {spec} does not fit {path!r} of shape {shape}")
        batch, cols, rows = spec.split(tuple(range(ndim)))  # split the axis indices: (stack, inputs, outputs)
        return batch, rows, cols
    if isinstance(spec, GaLoreDimensionNumbers):
        cols, rows = _axes(spec.reduction_axis, ndim), _axes(spec.output_axis, ndim)
        if not cols or not rows or set(cols) & set(rows) or len(set(cols + rows)) != len(cols + rows):
            raise ValueError(f"dimension numbers {spec} for {path!r} of shape {shape}: reduction and output axes "
                             f"must be non-empty and disjoint")
        batch = tuple(a for a in range(ndim) if a not in cols + rows)
        return batch, rows, cols
    raise TypeError(f"dimension numbers for {path!r} must be a GaLoreDimensionNumbers or an lrj.Layout, got {spec!r}")


def _default_dims(keys, shape) -> DimSpec:
    if len(shape) == 2 and keys and keys[-1] in tree_lib.EMBEDDING_NAMES:
        # an nn.Embed table [vocab, dim] has the layout of torch's nn.Embedding.weight: use it as is
        return GaLoreDimensionNumbers(reduction_axis=1, output_axis=0)
    # a Flax kernel [in, out] is tree_lib's Layout(0, 1): the matrix is its transpose, torch's
    # nn.Linear.weight [out, in]; N-D leaves have no default (None)
    return tree_lib.default_layout(keys, shape)


def _side(proj_type: str, m: int, n: int) -> str:
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def _spec_of_group(spec: tuple | None, axes: tuple[int, ...]):
    if spec is None:
        return None
    entries = [spec[a] for a in axes]
    if len(axes) == 1:
        return entries[0]
    return None  # merged axes: keep the matrix side replicated


def scale_by_galore(
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    *,
    inner: optax.GradientTransformation | None = None,
    targets: tree_lib.Targets | None = None,
    dimension_numbers: DimSpec | Mapping[str, DimSpec] | Callable[[str, Any], DimSpec] = None,
    rank_pattern: Mapping[str, int] | None = None,
    svd: str = "exact",
    oversample: int = 8,
    power_iters: int = 2,
    seed: int = 0,
) -> optax.GradientTransformation:
    r"""GaLore's projected update direction (no learning rate, no weight decay).

    For every projected parameter, the gradient is viewed as a matrix
    ``G: [*batch, m, n]``, projected to ``R`` by the current projector (refreshed
    by a float32 SVD of ``G`` under :func:`jax.lax.cond` when
    ``count % update_proj_gap == 0``), passed with the other (unprojected) leaves
    through ``inner``, and projected back and multiplied by ``scale``:

    .. math::
        u = \text{scale} \cdot \mathrm{back}\big(\mathrm{inner}(\mathrm{project}(G))\big)

    (see the module docstring for ``project``/``back`` per ``proj_type``).

    **Which leaves, in which orientation.** The matrix of a leaf is
    ``[prod(output axes), prod(reduction axes)]``, torch's orientation, so
    ``proj_type`` means what it means in galore-torch for the same layer:

    * a 2-D leaf is a Flax kernel ``[in, out]`` (``lrj.Layout(0, 1)``: ``reduction_axis=0``,
      ``output_axis=1``) and its matrix is ``kernel.T``, torch's
      ``nn.Linear.weight`` ``[out, in]``; a 2-D leaf named ``embedding`` is used as is
      (torch's ``nn.Embedding.weight`` has the same ``[vocab, dim]`` layout);
    * N-D leaves are projected only through ``dimension_numbers``: an
      :class:`lrj.Layout` ``(stack, inputs)`` (:class:`lowrank_jax.tree.Layout`, the
      layout the adapters use: ``kernel.shape == (*stack, *inputs, *outputs)``; its
      stack axes are batch axes, its inputs the reduction axes, its outputs the
      output axes) or an :class:`optax.contrib.GaLoreDimensionNumbers`
      ``(reduction_axis, output_axis)`` for axes a Layout cannot describe; axes in
      neither group are *batch* axes with one projector per slice (scanned layers
      ``[L, in, out]``: ``lrj.Layout(1, 1)``, the same as
      ``GaLoreDimensionNumbers(reduction_axis=1, output_axis=2)``; attention
      ``[D, N, H]``: ``lrj.Layout(0, 1)``);
    * 1-D and 0-D leaves (biases, norms) are never projected: ``inner`` updates
      them in full, as galore-torch's ``GaLoreAdamW`` updates parameters outside
      its GaLore group with plain AdamW. Naming one in ``targets`` is a ``ValueError``.

    The effective rank is ``k = min(rank, m, n)`` (galore-torch slices the SVD
    the same way). Projectors have the parameter's dtype (galore-torch casts them
    back from float32 too).

    **Signs.** Moments persist across refreshes, so the trajectory after a refresh
    depends on the signs the SVD gives each singular pair, which differ between
    LAPACK builds. Each pair is made canonical: flipped so that the largest-magnitude
    entry of the vector kept as the projector (``u``'s column for ``left`` and
    ``full``, ``vh``'s row for ``right``) is positive. The reference trajectories in
    the tests were recorded with the same rule patched into galore-torch; before the
    first refresh the two agree without it.

    **Sharding.** Under an Explicit mesh the moments of a projected leaf inherit the
    sharding of the matrix side that is kept (``[m, k]`` keeps the output axis's
    spec, ``[k, n]`` the input axis's), projectors are replicated, and a refresh
    gathers the gradient matrix to run the SVD (:func:`lrj.linalg.reduced_svd` needs unsharded
    matrix axes). Under Auto meshes XLA propagates shardings; pin the state's with
    ``jax.jit(..., out_shardings=...)``. Call ``update`` under :func:`jax.jit`: in
    eager mode the refresh conditional is recompiled at every step.

    **Non-finite gradients** propagate (a NaN at a refresh poisons the projector
    until the next refresh, and the moments for good). Wrap the optimizer in
    :func:`optax.apply_if_finite` to skip such steps: the state, including the
    count and the projectors, is then left unchanged.

    Args:
      rank: ``r``, the projection rank (galore-torch's examples: 128).
      update_proj_gap: ``T``, steps between projector refreshes (reference: 200).
      scale: ``alpha``, multiplies the back-projected update (reference: 0.25).
      proj_type: ``"std"``, ``"reverse_std"``, ``"left"``, ``"right"`` or ``"full"``.
      inner: the transform run in the projected space on the projected tree (a
        gradient-only transform: it receives ``params=None``); default
        :func:`lrj.optim.scale_by_adam_hf` (galore-torch's Adam). Its state covers
        the projected shapes.
      targets: which leaves to project: a regex fullmatched against "/"-joined
        paths, a list of them, or ``(path, leaf) -> bool``; default: every leaf
        whose dimension numbers resolve (2-D leaves, plus N-D leaves named in
        ``dimension_numbers``).
      dimension_numbers: one spec for every leaf with ``ndim >= 2``, a mapping
        ``{regex: spec or None}`` (first fullmatch wins; ``None`` = do not project;
        unmatched leaves use the default), or ``(path, leaf) -> spec or None``.
      rank_pattern: ``{regex: rank}`` overriding ``rank`` per leaf (first fullmatch wins).
      svd: ``"exact"`` (``jnp.linalg.svd``) or ``"randomized"`` (Halko et al.
        range finder with ``oversample`` extra probes and ``power_iters`` subspace
        iterations, seeded by ``seed``, the step and the leaf's position).
      oversample, power_iters, seed: randomized-SVD settings.

    Returns:
      An :class:`optax.GradientTransformation` with state :class:`ScaleByGaLoreState`.

    Example:
      >>> import jax, jax.numpy as jnp, lowrank_jax as lrj
      >>> params = {"kernel": jnp.ones((6, 4)), "bias": jnp.zeros(4)}
      >>> tx = lrj.optim.scale_by_galore(rank=2, update_proj_gap=10)
      >>> state = tx.init(params)
      >>> jax.tree.map(jnp.shape, state.inner_state.mu)  # kernel.T is [4, 6], m < n: left, U^T G is [2, 6]
      {'bias': (4,), 'kernel': (2, 6)}
    """
    rank = _common.check_positive_int("rank", rank)
    update_proj_gap = _common.check_positive_int("update_proj_gap", update_proj_gap)
    scale = _common.check_positive("scale", scale)
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"`proj_type` must be one of {PROJ_TYPES}, got {proj_type!r}")
    if svd not in SVD_METHODS:
        raise ValueError(f"`svd` must be one of {SVD_METHODS}, got {svd!r}")
    for name, value in (("oversample", oversample), ("power_iters", power_iters), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}")
    for pattern, r in (rank_pattern or {}).items():
        _common.check_positive_int(f"rank_pattern[{pattern!r}]", r)
    if inner is None:
        inner = scale_by_adam_hf()
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(f"`inner` must be an optax.GradientTransformation, got {type(inner).__name__}")
    match = tree_lib._matcher(targets) if targets is not None else None

    def dims_for(keys, path: str, leaf) -> DimSpec:
        shape = tuple(leaf.shape)
        spec = dimension_numbers
        if callable(spec) and not isinstance(spec, (GaLoreDimensionNumbers, tree_lib.Layout)):
            return spec(path, leaf)
        if isinstance(spec, Mapping):
            for pattern, value in spec.items():
                if re.fullmatch(pattern, path):
                    return value
            return _default_dims(keys, shape)
        if spec is not None:
            return spec if len(shape) >= 2 else None
        return _default_dims(keys, shape)

    def plan_for(keypath, leaf) -> _Plan | None:
        keys = tuple(tree_lib._key_name(k) for k in keypath)
        path = tree_lib.path_str(keys)
        shape = tuple(leaf.shape)
        targeted = match(path, leaf) if match is not None else None
        if targeted is False:
            return None
        if len(shape) < 2:
            if targeted:
                raise ValueError(
                    f"GaLore projects matrices; target {path!r} has shape {shape}. 1-D and 0-D parameters are "
                    f"updated by the inner transform in full (as galore-torch does outside its GaLore group): "
                    f"leave them out of `targets`"
                )
            return None
        spec = dims_for(keys, path, leaf)
        if spec is None:
            if targeted:
                raise ValueError(
                    f"target {path!r} has shape {shape}: say which axes form the matrix with "
                    f"`dimension_numbers={{{path!r}: lrj.Layout(stack, inputs)}}` or "
                    f"`optax.contrib.GaLoreDimensionNumbers(reduction_axis, output_axis)`"
                )
            return None
        batch, rows, cols = _split_dims(spec, path, shape)
        m = math.prod(shape[a] for a in rows)
        n = math.prod(shape[a] for a in cols)
        r = tree_lib.first_match(rank_pattern, path, rank)
        return _Plan(path, shape, batch, rows, cols, m, n, min(r, m, n), _side(proj_type, m, n))

    def plans_of(tree) -> list[_Plan | None]:
        return [plan_for(kp, leaf) for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]

    def matrix_specs(plan: _Plan, leaf):
        """Explicit-mesh specs: (of the matrix, of the projected tensor, of the projector) or Nones."""
        spec = _common.explicit_spec(leaf)
        if spec is None:
            return None, None, None
        bspec = tuple(spec[a] for a in plan.batch)
        rows, cols = _spec_of_group(spec, plan.rows), _spec_of_group(spec, plan.cols)
        projected = {"right": (rows, None), "left": (None, cols), "full": (None, None)}[plan.side]
        return bspec + (rows, cols), bspec + projected, bspec + (None, None)

    def to_matrix(x, plan: _Plan):
        spec = _common.explicit_spec(x)
        if spec is not None and any(len(g) > 1 and any(spec[a] is not None for a in g) for g in (plan.rows, plan.cols)):
            x = _common.replicated(x)  # merging a sharded axis with others: gather first
        y = jnp.transpose(x, plan.perm)
        return y.reshape(plan.batch_shape + (plan.m, plan.n))

    def from_matrix(y, plan: _Plan):
        shape = plan.shape
        y = y.reshape(plan.batch_shape + tuple(shape[a] for a in plan.rows) + tuple(shape[a] for a in plan.cols))
        return jnp.transpose(y, tuple(np.argsort(plan.perm)))

    def empty_projector(plan: _Plan, leaf) -> GaLoreProjector:
        _, _, pspec = matrix_specs(plan, leaf)
        b = plan.batch_shape
        u = _common.zeros(b + (plan.m, plan.k), leaf.dtype, pspec) if plan.side in ("left", "full") else optax.MaskedNode()
        vh = _common.zeros(b + (plan.k, plan.n), leaf.dtype, pspec) if plan.side in ("right", "full") else optax.MaskedNode()
        return GaLoreProjector(u, vh)

    def compute_projector(g_mat, plan: _Plan, like: GaLoreProjector, key) -> GaLoreProjector:
        g32 = g_mat.astype(jnp.float32)
        spec = _common.explicit_spec(g32)
        if spec is not None:  # the SVD needs the matrix axes unsharded
            g32 = _common.reshard_to(g32, spec[:-2] + (None, None))
        if svd == "randomized":
            u, _, vh = _linalg.randomized_svd(g32, plan.k, key, oversample=oversample, power_iters=power_iters)
        else:
            u, _, vh = linalg.reduced_svd(g32)  # one matrix at a time on CPU
            u, vh = u[..., :, : plan.k], vh[..., : plan.k, :]
        u, vh = _linalg.canonical_signs(u, vh, by="vh" if plan.side == "right" else "u")
        new_u = _common.reshard_like(u.astype(like.u.dtype), like.u) if plan.side in ("left", "full") else like.u
        new_vh = _common.reshard_like(vh.astype(like.vh.dtype), like.vh) if plan.side in ("right", "full") else like.vh
        return GaLoreProjector(new_u, new_vh)

    def project(g_mat, proj: GaLoreProjector, plan: _Plan):
        if plan.side == "right":
            return jnp.matmul(g_mat, jnp.swapaxes(proj.vh, -1, -2).astype(g_mat.dtype))
        if plan.side == "left":
            return jnp.matmul(jnp.swapaxes(proj.u, -1, -2).astype(g_mat.dtype), g_mat)
        r = jnp.matmul(jnp.swapaxes(proj.u, -1, -2).astype(g_mat.dtype), g_mat)
        return jnp.matmul(r, jnp.swapaxes(proj.vh, -1, -2).astype(g_mat.dtype))

    def back(n_mat, proj: GaLoreProjector, plan: _Plan):
        if plan.side == "right":
            return jnp.matmul(n_mat, proj.vh.astype(n_mat.dtype))
        if plan.side == "left":
            return jnp.matmul(proj.u.astype(n_mat.dtype), n_mat)
        return jnp.matmul(jnp.matmul(proj.u.astype(n_mat.dtype), n_mat), proj.vh.astype(n_mat.dtype))

    def init_fn(params):
        leaves, treedef = jax.tree_util.tree_flatten(params)
        plans = plans_of(params)
        projectors, proxies = [], []
        for plan, leaf in zip(plans, leaves):
            if plan is None:
                projectors.append(optax.MaskedNode())
                proxies.append(leaf)
            else:
                projectors.append(empty_projector(plan, leaf))
                _, rspec, _ = matrix_specs(plan, leaf)
                proxies.append(_common.zeros(plan.projected_shape(), leaf.dtype, rspec))
        return ScaleByGaLoreState(
            count=jnp.zeros([], jnp.int32),
            projectors=treedef.unflatten(projectors),
            inner_state=inner.init(treedef.unflatten(proxies)),
        )

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        plans = plans_of(updates)
        old_projectors = treedef.flatten_up_to(state.projectors)
        refresh = (state.count % update_proj_gap) == 0
        base_key = jax.random.fold_in(jax.random.key(seed), state.count) if svd == "randomized" else None
        low, new_projectors, mats = [], [], []
        for i, (plan, g, old) in enumerate(zip(plans, leaves, old_projectors)):
            if plan is None:
                low.append(g)
                new_projectors.append(old)
                mats.append(None)
                continue
            g_mat = to_matrix(g, plan)
            key = jax.random.fold_in(base_key, i) if base_key is not None else None
            proj = lax.cond(refresh, lambda g_mat=g_mat, plan=plan, old=old, key=key: compute_projector(
                g_mat, plan, old, key), lambda old=old: old)
            _, rspec, _ = matrix_specs(plan, g)
            low.append(_common.reshard_to(project(g_mat, proj, plan), rspec))
            new_projectors.append(proj)
            mats.append(g_mat)
        inner_updates, inner_state = inner.update(treedef.unflatten(low), state.inner_state, None)
        out = []
        for plan, g, proj, n in zip(plans, leaves, new_projectors, treedef.flatten_up_to(inner_updates)):
            if plan is None:
                out.append(n)
                continue
            full = back(n, proj, plan) * jnp.asarray(scale, n.dtype)
            out.append(_common.reshard_like(from_matrix(full, plan).astype(g.dtype), g))
        new_state = ScaleByGaLoreState(
            count=optax.safe_increment(state.count),
            projectors=treedef.unflatten(new_projectors),
            inner_state=inner_state,
        )
        return treedef.unflatten(out), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def galore(
    learning_rate: _common.ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    mask: Any = None,
    inner: optax.GradientTransformation | None = None,
    eight_bit: bool = False,
    mu_dtype: Any = None,
    targets: tree_lib.Targets | None = None,
    dimension_numbers: DimSpec | Mapping[str, DimSpec] | Callable[[str, Any], DimSpec] = None,
    rank_pattern: Mapping[str, int] | None = None,
    svd: str = "exact",
    oversample: int = 8,
    power_iters: int = 2,
    seed: int = 0,
) -> optax.GradientTransformation:
    r"""GaLore with galore-torch's AdamW: ``GaLoreAdamW`` (``eight_bit=True``: 8-bit GaLore's moments).

    .. math::
        p_{t+1} = \big(p_t - \eta_t \, \alpha \, \mathrm{back}(d_t)\big)(1 - \eta_t \lambda), \qquad
        d_t = \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t} \frac{m_t}{\sqrt{v_t} + \epsilon}

    with ``m_t, v_t`` the Adam moments of the *projected* gradient ``R_t`` (see
    :func:`scale_by_galore`), ``alpha = scale``, ``lambda = weight_decay``. Leaves
    that are not projected (biases, norms) get ``(p_t - eta_t d_t)(1 - eta_t lambda)``
    with full moments: exactly ``GaLoreAdamW`` with those in a plain parameter group.
    It is ``chain(scale_by_galore(..., inner=scale_by_adam_hf(b1, b2, eps)),
    scale_by_learning_rate(learning_rate), add_decayed_weights_after_step(weight_decay,
    learning_rate, mask))``; the decay acts on the full parameter, never in the subspace.

    Equality with galore-torch (``tests/test_optim.py``): for the same gradients and
    hyper-parameters, the parameters after each of 8 steps with a refresh every 3
    steps match ``GaLoreAdamW``'s to about ``1e-4`` of a step for every ``proj_type``
    (the reference recorded with the canonical SVD signs described in
    :func:`scale_by_galore`).

    ``eight_bit=True`` stores every moment tensor with at least 4096 entries
    blockwise-quantised in 8 bits (bitsandbytes' dynamic code book, 256 values per
    block), as 8-bit GaLore (``GaLoreAdamW8bit``) does with bitsandbytes' 8-bit
    Adam; the update rule stays ``GaLoreAdamW``'s, so it is not bit-equal to
    bitsandbytes' kernels.

    Args:
      learning_rate: ``eta_t``, a number or an optax schedule.
      rank, update_proj_gap, scale, proj_type: see :func:`scale_by_galore`.
      b1, b2, eps: the inner Adam (galore-torch's defaults).
      weight_decay: ``lambda``, decoupled, applied after the step as galore-torch does.
      mask: where to decay (a tree or callable of params, as in :func:`optax.adamw`).
      inner: replaces the Adam (then ``b1``, ``b2``, ``eps``, ``eight_bit`` and ``mu_dtype`` must stay default).
      eight_bit: 8-bit moments.
      mu_dtype: dtype of the first moment (default: the parameter's).
      targets, dimension_numbers, rank_pattern, svd, oversample, power_iters, seed:
        see :func:`scale_by_galore`.

    Returns:
      An :class:`optax.GradientTransformation`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lowrank_jax as lrj
      >>> params = {"w": jnp.ones((32, 16)), "b": jnp.zeros(16)}
      >>> tx = lrj.optim.galore(1e-2, rank=4, update_proj_gap=50, weight_decay=0.01)
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
      >>> updates, state = jax.jit(tx.update)(grads, state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> state[0].inner_state.mu["w"].shape  # w.T is [16, 32], m < n: left projection, [4, 32]
      (4, 32)

    References:
      Zhao et al, `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
      Projection <https://arxiv.org/abs/2403.03507>`_, 2024.
      Dettmers et al, `8-bit Optimizers via Block-wise Quantization
      <https://arxiv.org/abs/2110.02861>`_, 2021.
    """
    _common.check_learning_rate(learning_rate)
    if inner is None:
        inner = scale_by_adam_hf(b1, b2, eps, mu_dtype=mu_dtype, eight_bit=eight_bit)
    elif eight_bit or mu_dtype is not None or (b1, b2, eps) != (0.9, 0.999, 1e-6):
        raise ValueError("`inner` replaces the Adam: leave `b1`, `b2`, `eps`, `eight_bit` and `mu_dtype` at their defaults")
    return optax.chain(
        scale_by_galore(
            rank, update_proj_gap, scale, proj_type, inner=inner, targets=targets,
            dimension_numbers=dimension_numbers, rank_pattern=rank_pattern, svd=svd,
            oversample=oversample, power_iters=power_iters, seed=seed,
        ),
        optax.scale_by_learning_rate(learning_rate),
        add_decayed_weights_after_step(weight_decay, learning_rate, mask),
    )
