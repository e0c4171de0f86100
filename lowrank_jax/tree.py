"""Pytree plumbing shared by every adapter: paths, target selection, kernel layouts.

A *path* is the "/"-joined string of a leaf's keys in a params pytree, e.g.
``"params/layers_0/self_attn/q_proj/kernel"`` for Flax linen or
``"blocks/lin/kernel"`` for an NNX pure state dict. Targets are matched
against these strings with :func:`re.fullmatch`.

An adapter tree mirrors the targeted paths: the leaves of a target at
``params/Dense_0/kernel`` live under ``{"params": {"Dense_0": {"kernel": {...}}}}``
and are named after the math (``a``, ``b``, ``m``...).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Layout",
    "Target",
    "path_str",
    "flatten_with_paths",
    "select_targets",
    "nest",
    "get_path",
    "adapter_paths",
    "labels",
    "mask",
]

Targets = str | Sequence[str] | Callable[[str, Any], bool]

#: Param names of the layers the bridges know, and what kind of layer they are.
EMBEDDING_NAMES = ("embedding",)


class Layout(NamedTuple):
    """How a kernel's axes split: ``kernel.shape == (*stack, *inputs, *outputs)``.

    ``stack`` counts leading axes of layers stacked by ``nn.scan``/``nnx.scan``
    (each stacked layer gets its own factors); ``inputs`` counts the axes that
    contract with the layer input. The rest are output axes. A Flax ``Dense``
    kernel ``[in, out]`` is ``Layout(0, 1)``; a scanned one ``[L, in, out]`` is
    ``Layout(1, 1)``; an attention projection ``DenseGeneral(features=(N, H))``
    kernel ``[D, N, H]`` is ``Layout(0, 1)`` and its output projection
    ``DenseGeneral(features=D, axis=(-2, -1))`` kernel ``[N, H, D]`` is
    ``Layout(0, 2)``. The factors then are ``a: [*stack, *inputs, r]`` and
    ``b: [*stack, r, *outputs]``.
    """

    stack: int
    inputs: int

    def split(self, shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """Returns (stack dims, input dims, output dims) of ``shape``."""
        s, i = self.stack, self.inputs
        return tuple(shape[:s]), tuple(shape[s : s + i]), tuple(shape[s + i :])


class Target(NamedTuple):
    """One targeted leaf: its key path, "/"-joined path string, leaf and layout."""

    keys: tuple[Any, ...]
    path: str
    leaf: Any
    layout: Layout

    @property
    def is_embedding(self) -> bool:
        return self.keys[-1] in EMBEDDING_NAMES


def _key_name(key) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    raise TypeError(f"unsupported pytree key {key!r}")


def path_str(keys: Sequence[Any]) -> str:
    """"/"-joins a key path (jax key entries or plain names)."""
    return "/".join(str(_key_name(k) if not isinstance(k, (str, int)) else k) for k in keys)


def _is_variable(x) -> bool:
    # NNX Variables (nnx.State leaves) count as leaves; their value is the array.
    return hasattr(x, "get_value") and hasattr(x, "set_value")


def is_quantized(x) -> bool:
    """A quantised weight: a pytree node with ``shape``, ``dtype`` and ``dequantize(dtype)``.

    The bridges dequantise such kernels inside the layer call (so under
    ``remat`` the dense weight is recomputed, not stored) and treat them as one
    leaf when selecting targets.
    """
    return callable(getattr(x, "dequantize", None)) and hasattr(x, "shape") and hasattr(x, "dtype")


def shape_of(x) -> tuple[int, ...]:
    """The logical shape of an array or a quantised weight (its stack axes, ``batch_shape``, in front)."""
    if is_quantized(x):
        return tuple(getattr(x, "batch_shape", ())) + tuple(x.shape)
    return tuple(np.shape(x))


def _is_leaf(x) -> bool:
    return _is_variable(x) or is_quantized(x)


def _unwrap(x):
    return x.get_value() if _is_variable(x) else x


def flatten_with_paths(tree) -> list[tuple[tuple[Any, ...], str, Any]]:
    """Leaves of ``tree`` as ``(keys, path, leaf)``; NNX Variables are unwrapped, quantised weights are leaves."""
    out = []
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)[0]:
        keys = tuple(_key_name(k) for k in keypath)
        out.append((keys, path_str(keys), _unwrap(leaf)))
    return out


def _matcher(targets: Targets) -> Callable[[str, Any], bool]:
    if callable(targets):
        return targets
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, Sequence) or not targets or not all(isinstance(t, str) for t in targets):
        raise TypeError(
            f"`targets` must be a regex string, a non-empty list of them, or a callable (path, leaf) -> bool; "
            f"got {targets!r}"
        )
    compiled = []
    for t in targets:
        try:
            compiled.append(re.compile(t))
        except re.error as e:
            raise ValueError(f"`targets` pattern {t!r} is not a valid regex: {e}") from None
    return lambda path, leaf: any(c.fullmatch(path) for c in compiled)


def targets_config(targets: Targets) -> dict:
    """How an adapter's config records its ``targets``: the regex(es) as given, or a callable's
    ``repr`` flagged ``targets_callable`` (it cannot be matched from the config)."""
    if callable(targets):
        return {"targets": repr(targets), "targets_callable": True}
    if isinstance(targets, (list, tuple)):
        return {"targets": list(targets)}
    return {"targets": targets}  # a string, or something `init` refuses with a TypeError


def first_match(patterns: Mapping[str, Any] | None, path: str, default):
    """Value of the first pattern in ``patterns`` that fullmatches ``path``, else ``default``."""
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(pattern, path):
            return value
    return default


def default_layout(keys: tuple[Any, ...], shape: tuple[int, ...]) -> Layout | None:
    """The layout of a 2-D kernel or embedding; ``None`` where it is ambiguous."""
    if len(shape) == 2:
        return Layout(0, 1)
    return None


def select_leaves(params, targets: Targets) -> list[tuple[tuple[Any, ...], str, Any]]:
    """``(keys, path, leaf)`` of the floating-point leaves of ``params`` that ``targets`` selects.

    Raises ``ValueError`` naming some existing paths when nothing matches; ``TypeError``
    for a selected leaf that is not floating point.
    """
    match = _matcher(targets)
    leaves = flatten_with_paths(params)
    if not leaves:
        raise ValueError("`params` has no leaves")
    found = []
    for keys, path, leaf in leaves:
        if not match(path, leaf):
            continue
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"target {path!r} must be a floating-point array, got {type(leaf).__name__} of dtype {dtype}")
        found.append((keys, path, leaf))
    if not found:
        sample = [p for _, p, _ in leaves]
        shown = ", ".join(repr(p) for p in sample[:12]) + (", ..." if len(sample) > 12 else "")
        raise ValueError(f"`targets` {targets!r} matched no parameter; paths in params include: {shown}")
    return found


def given_layout(layouts, path: str, leaf=None) -> Layout | None:
    """The layout ``layouts`` (``{path: Layout}`` or ``(path, leaf) -> Layout``) gives ``path``, or ``None``."""
    if layouts is None:
        return None
    if callable(layouts):
        layout = layouts(path, leaf)
    else:  # kernel_layouts' paths are of the variables: "params/..." stands for a bare params path too
        layout = layouts.get(path, layouts.get("params/" + path))
    return Layout(*layout) if layout is not None else None


def select_targets(
    params,
    targets: Targets,
    layouts: Mapping[str, Layout | tuple[int, int]] | Callable[[str, Any], Layout | None] | None = None,
) -> list[Target]:
    """The leaves of ``params`` that ``targets`` selects, with their layouts.

    Raises ``ValueError`` naming some existing paths when nothing matches, and
    when an N-D kernel's layout is not given; ``TypeError`` for non-floating leaves.
    """
    found = []
    for keys, path, leaf in select_leaves(params, targets):
        shape = shape_of(leaf)
        layout = given_layout(layouts, path, leaf)
        layout = layout if layout is not None else default_layout(keys, shape)
        if layout is None:
            raise ValueError(
                f"target {path!r} has shape {shape}: say which axes are stacked (scan) and which are inputs with "
                f"`layouts={{{path!r}: lrj.Layout(stack=..., inputs=...)}}`, or discover them with "
                f"`lrj.linen.kernel_layouts(model, *args)` / `lrj.nnx.kernel_layouts(model, *args)`"
            )
        if layout.stack < 0 or layout.inputs < 1 or layout.stack + layout.inputs >= len(shape):
            raise ValueError(f"layout {layout} does not fit target {path!r} of shape {shape}")
        found.append(Target(keys, path, leaf, layout))
    return found


def nest(items: Mapping[tuple[Any, ...], Any]) -> dict:
    """Builds a nested dict from ``{key_path: value}``."""
    root: dict = {}
    for keys, value in items.items():
        node = root
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return root


def merge_trees(x, y, keys: tuple = ()):
    """The union of two nested dicts of leaves (``x``'s order first); raises on a leaf in both."""
    if not x:
        return y
    if not y:
        return x
    if not isinstance(x, Mapping) or not isinstance(y, Mapping):
        raise ValueError(f"{path_str(keys)!r} is a leaf of both trees")
    out = dict(x)
    for k, v in y.items():
        out[k] = merge_trees(out[k], v, keys + (k,)) if k in out else v
    return out


def without(x, y):
    """``x`` without the leaves at ``y``'s paths (the inverse of :func:`merge_trees`)."""
    if not isinstance(y, Mapping) or not y:
        return x
    out = {}
    for k, v in x.items():
        if k not in y:
            out[k] = v
        elif isinstance(v, Mapping) and isinstance(y[k], Mapping):
            rest = without(v, y[k])
            if rest:
                out[k] = rest
    return out


def get_path(tree, keys: Sequence[Any]):
    node = tree
    for k in keys:
        node = node[k]
    return node


#: Root key of an adapter tree's shared leaves (one array for every target: VeRA's projections).
SHARED = "@shared"


def shared_of(adapter_params) -> dict:
    """The adapter tree's shared leaves (``adapter_params[SHARED]``), ``{}`` when it has none."""
    if isinstance(adapter_params, Mapping) and isinstance(adapter_params.get(SHARED), Mapping):
        return dict(adapter_params[SHARED])
    return {}


def adapter_paths(adapter_params, leaf_names: frozenset[str]) -> list[tuple[tuple[Any, ...], dict]]:
    """``(target keys, {leaf name: array})`` for every target in an adapter tree.

    A target is a dict whose keys are all adapter leaf names (``a``, ``b``, ...); the shared
    leaves at the root's :data:`SHARED` key belong to no target.
    """
    out = []

    def walk(node, keys):
        if not keys and isinstance(node, Mapping) and SHARED in node:
            node = {k: v for k, v in node.items() if k != SHARED}
        if isinstance(node, Mapping):
            if node and set(node) <= leaf_names and not any(isinstance(v, Mapping) for v in node.values()):
                out.append((keys, dict(node)))
                return
            for k, v in node.items():
                walk(v, keys + (k,))
        else:
            raise ValueError(f"adapter tree has a stray leaf at {path_str(keys)!r}; expected a dict of {sorted(leaf_names)}")

    walk(adapter_params, ())
    return out


def labels(adapter_params) -> Any:
    """A tree like ``adapter_params`` whose leaves are their own names (``"a"``, ``"b"``, ...).

    Made for ``optax.partition({"a": ..., "b": ...}, lrj.labels)``.
    """
    return jax.tree_util.tree_map_with_path(lambda kp, _: str(_key_name(kp[-1])), adapter_params)


def mask(adapter_params, names: Sequence[str]) -> Any:
    """Boolean tree: ``True`` where a leaf's name is in ``names`` (for optax masks)."""
    names = frozenset(names)
    return jax.tree_util.tree_map_with_path(lambda kp, _: _key_name(kp[-1]) in names, adapter_params)


def num_params(tree) -> int:
    """Number of scalars in ``tree``; a quantised weight counts as its logical (unquantised) size."""
    return int(sum(np.prod(shape_of(x)) for x in jax.tree.leaves(tree, is_leaf=is_quantized)))


def prod(xs: Sequence[int]) -> int:
    return int(math.prod(xs))
