"""What every adapter is (a NamedTuple of pure functions) and what a bridge hands it.

Bridges (``lrj.linen``, ``lrj.nnx``) find the calls of linear layers inside an
unchanged model and describe each as a :class:`Site`; the adapter's ``apply``
turns the layer's output ``y = f(x; W)`` into the adapted output, computing the
low-rank part in factored form with :func:`low_rank`, never the dense ``s B A``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, PartitionSpec

from lowrank_jax import tree as tree_lib

__all__ = ["Adapter", "Site", "low_rank", "dropout"]


class Site(NamedTuple):
    """A call of a linear layer, as an adapter sees it.

    kind:
      ``"linear"``: ``x``'s trailing ``inputs`` axes contract with the kernel's leading
        ``inputs`` axes (Dense, DenseGeneral, Einsum, after the bridge moved the
        contracting axes of ``x`` last, in kernel order);
      ``"lookup"``: ``x`` holds integer ids into the kernel's rows (Embed);
      ``"attend"``: ``x`` contracts with the kernel's output axis (``Embed.attend``,
        the tied output head: ``y = x E^T``).
    kernel: the per-call kernel, ``[*inputs, *outputs]`` (scan axes already sliced off).
    inputs: number of input axes of ``kernel``.
    dtype: the layer's compute dtype, or ``None`` to promote the operands.
    bias: the layer's bias with its axes in kernel output order, or ``None``
      (DoRA rescales the output without it).
    """

    kind: str
    kernel: Any
    inputs: int
    dtype: Any = None
    bias: Any = None


class Adapter(NamedTuple):
    """A parameter-efficient method as pure functions (see ``lrj.lora``).

    init(key, params) -> adapter_params: only the new trainable leaves, a tree that
      mirrors the targeted paths of ``params``.
    apply(leaves, site, x, y, *, path, dropout_key=None) -> y': the adapted output of
      one layer call; bridges call it, users rarely do.
    merge(params, adapter_params) -> params: the dense weights ``W + delta`` (inference, export).
    unmerge(params, adapter_params) -> params: the inverse of ``merge``.
    penalty(params, adapter_params) -> scalar: the method's regulariser before its weight.
    leaf_names: names of the leaves under each target (``{"a", "b"}`` for LoRA).
    config: the hyper-parameters, for summaries and checkpoints.
    roles: ``{leaf name: axis roles}``, what each leaf's axes are, as a pattern over the
      target kernel's layout ``[*stack, *inputs, *outputs]``: ``"stack"``, ``"in"`` and
      ``"out"`` each stand for all of the kernel's axes of that kind, ``"rank"`` for an
      adapter-only axis (never sharded). LoRA: ``a = ("stack", "in", "rank")``,
      ``b = ("stack", "rank", "out")``; DoRA adds ``m = ("stack", "out")``. Sharding is
      derived from these roles (:func:`leaf_axes`), not from leaf names.
    """

    init: Callable
    apply: Callable
    merge: Callable
    unmerge: Callable
    penalty: Callable
    leaf_names: frozenset
    config: dict
    roles: dict | None = None


#: The axis roles of LoRA's factors (also DoRA's); see :attr:`Adapter.roles`.
LORA_ROLES = {"a": ("stack", "in", "rank"), "b": ("stack", "rank", "out")}


def leaf_axes(pattern, layout: tree_lib.Layout, kernel_ndim: int) -> tuple[str, ...]:
    """The role of each axis of a leaf: ``pattern`` with ``"stack"``/``"in"``/``"out"`` expanded
    to as many axes as the kernel's layout has of each kind.

    >>> leaf_axes(("stack", "in", "rank"), tree_lib.Layout(1, 2), 4)
    ('stack', 'in', 'in', 'rank')
    """
    counts = {"stack": layout.stack, "in": layout.inputs, "out": kernel_ndim - layout.stack - layout.inputs}
    out: list[str] = []
    for role in pattern:
        out.extend([role] * counts.get(role, 1))
    return tuple(out)


def _explicit_spec(x) -> tuple | None:
    """``x``'s partition spec when it is traced under an Explicit mesh, else ``None``."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or not mesh.axis_names or AxisType.Explicit not in tuple(mesh.axis_types):
        return None
    spec = tuple(sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def _mesh_axes(entry) -> tuple:
    if entry is None:
        return ()
    return entry if isinstance(entry, tuple) else (entry,)


def contract(lhs, rhs, n: int):
    """Contracts ``lhs``'s last ``n`` axes with ``rhs``'s first ``n`` axes.

    Under an Explicit mesh the output keeps ``lhs``'s remaining sharding and
    ``rhs``'s where it does not reuse a mesh axis, so contractions over sharded
    axes compile (an all-reduce) instead of failing.
    """
    dims = ((tuple(range(lhs.ndim - n, lhs.ndim)), tuple(range(n))), ((), ()))
    lhs_spec, rhs_spec = _explicit_spec(lhs), _explicit_spec(rhs)
    if lhs_spec is None and rhs_spec is None:
        return lax.dot_general(lhs, rhs, dims)
    lhs_spec = lhs_spec or (None,) * lhs.ndim
    rhs_spec = rhs_spec or (None,) * rhs.ndim
    out = list(lhs_spec[: lhs.ndim - n])
    used = {a for e in out for a in _mesh_axes(e)}
    for entry in rhs_spec[n:]:
        axes = _mesh_axes(entry)
        out.append(entry if axes and not (set(axes) & used) else None)
        used |= set(axes)
    return lax.dot_general(lhs, rhs, dims, out_sharding=PartitionSpec(*out))


def match_sharding(x, like):
    """Reshards ``x`` to ``like``'s sharding under an Explicit mesh (elementwise ops need equal specs)."""
    want, have = _explicit_spec(like), _explicit_spec(x)
    if want is None or have == want:
        return x
    return jax.sharding.reshard(x, PartitionSpec(*want))


def replicated(x):
    """``x`` fully replicated under an Explicit mesh (for small adapter-only math); else ``x``."""
    if _explicit_spec(x) is None or all(e is None for e in _explicit_spec(x)):
        return x
    return jax.sharding.reshard(x, PartitionSpec())


def low_rank(site: Site, x, a, b, scale: float):
    """The factored low-rank map ``x -> f(x; scale * a b)`` of a layer, never forming ``a b``.

    ``a: [*inputs, r]`` and ``b: [r, *outputs]`` in Flax orientation. Costs
    ``O(tokens * r * (in + out))`` instead of ``O(tokens * in * out)``. The scale
    multiplies the rank-``r`` intermediate, the smallest tensor on the path.
    """
    if site.kind == "lookup":
        dtype = site.dtype or jnp.result_type(a, b)
        t = jnp.take(a.astype(dtype), x, axis=0) * jnp.asarray(scale, dtype)
        return contract(t, b.astype(dtype), 1)
    dtype = site.dtype or jnp.result_type(x, a, b)
    x, a, b = x.astype(dtype), a.astype(dtype), b.astype(dtype)
    s = jnp.asarray(scale, dtype)
    if site.kind == "attend":  # x E^T with E = s a b: (x b^T) a^T
        t = contract(x, b.T, 1) * s
        return contract(t, a.T, 1)
    if site.kind != "linear":
        raise ValueError(f"unknown site kind {site.kind!r}")
    t = contract(x, a, site.inputs) * s
    return contract(t, b, 1)


def dropout(key, x, rate: float):
    """Inverted dropout: zero each entry with probability ``rate``, scale the rest by ``1/(1-rate)``."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def derive_layout(path: str, kernel_shape, a_shape, b_shape) -> tree_lib.Layout:
    """The layout implied by factor shapes ``a: [*stack, *in, r]``, ``b: [*stack, r, *out]``.

    Raises ``ValueError`` naming ``path`` when the factors do not fit the kernel
    (for example, an adapter trained for another model).
    """
    kernel_shape, a_shape, b_shape = tuple(kernel_shape), tuple(a_shape), tuple(b_shape)
    stack = (len(a_shape) - 1) + (len(b_shape) - 1) - len(kernel_shape)
    inputs = len(a_shape) - 1 - stack
    ok = (
        stack >= 0
        and inputs >= 1
        and len(b_shape) - 1 - stack >= 1
        and a_shape[:-1] == kernel_shape[: stack + inputs]
        and b_shape[:stack] == kernel_shape[:stack]
        and b_shape[stack + 1 :] == kernel_shape[stack + inputs :]
        and a_shape[-1] == b_shape[stack]
    )
    if not ok:
        raise ValueError(
            f"adapter leaves for {path!r} do not fit the parameter: kernel {kernel_shape}, "
            f"a {a_shape}, b {b_shape} (expected a [*stack, *inputs, r], b [*stack, r, *outputs]); "
            f"is this adapter from another model?"
        )
    return tree_lib.Layout(stack, inputs)


def dense(w, dtype=jnp.float32):
    """``w`` as a dense array of ``dtype``, dequantising a quantised weight (see ``lrj.tree.is_quantized``)."""
    return w.dequantize(dtype) if tree_lib.is_quantized(w) else w.astype(dtype)


def dense_delta(a, b, layout: tree_lib.Layout, kernel_shape, scale: float):
    """``scale * a b`` as a dense fp32 array of ``kernel_shape`` (merge/export only)."""
    stack, ins, outs = layout.split(kernel_shape)
    r = a.shape[-1]
    a2 = a.astype(jnp.float32).reshape(*stack, tree_lib.prod(ins), r)
    b2 = b.astype(jnp.float32).reshape(*stack, r, tree_lib.prod(outs))
    delta = jnp.einsum("...ir,...ro->...io", a2, b2, precision=lax.Precision.HIGHEST)
    return (scale * delta).reshape(kernel_shape)


def resolve_targets(adapter_params, params, leaf_names: frozenset) -> list[tuple[tuple, str, Any, dict]]:
    """``(keys, path, kernel, leaves)`` for each target of ``adapter_params`` found in ``params``.

    Raises ``ValueError`` naming the path when a target is missing from ``params``
    or its factors do not fit the kernel (an adapter trained for another model).
    """
    flat = {keys: leaf for keys, _, leaf in tree_lib.flatten_with_paths(params)}
    out = []
    for keys, leaves in tree_lib.adapter_paths(adapter_params, leaf_names):
        path = tree_lib.path_str(keys)
        if keys not in flat:
            near = [tree_lib.path_str(k) for k in list(flat)[:8]]
            raise ValueError(
                f"adapter target {path!r} is not a parameter of this model (is this adapter from another model?); "
                f"params include {near}"
            )
        if "a" in leaves and "b" in leaves:
            derive_layout(path, tree_lib.shape_of(flat[keys]), leaves["a"].shape, leaves["b"].shape)
        out.append((keys, path, flat[keys], leaves))
    return out


def replace_leaves(params, new: dict[tuple, Any]):
    """A copy of ``params`` with the leaves at the given key paths replaced (inputs untouched)."""

    def swap(keypath, leaf):
        keys = tuple(tree_lib._key_name(k) for k in keypath)
        if keys in new:
            value = new[keys]
            if tree_lib._is_variable(leaf):
                return leaf.replace(value)
            return value
        return leaf

    return jax.tree_util.tree_map_with_path(swap, params, is_leaf=tree_lib._is_leaf)
