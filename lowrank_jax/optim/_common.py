"""Helpers shared by the optimizers: argument checks, schedules, sharding, LoRA pairs and their scales."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import base
from lowrank_jax.adapters import scale as scale_lib

ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]


# ----------------------------------------------------------------------------- argument checks

def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    return int(value)


def check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"`{name}` must be a positive number, got {value!r}")
    return float(value)


def check_nonnegative(name: str, value) -> None:
    """Checks Python numbers eagerly; arrays and schedules are the caller's business (as in optax)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and not value >= 0:
        raise ValueError(f"`{name}` must be >= 0, got {value!r}")


def check_beta(name: str, value) -> None:
    if isinstance(value, numbers.Real) and not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be in [0, 1), got {value!r}")


def check_learning_rate(learning_rate) -> None:
    if callable(learning_rate):
        return
    check_nonnegative("learning_rate", learning_rate)


def scaled_schedule(learning_rate: ScalarOrSchedule, factor: float) -> ScalarOrSchedule:
    """``learning_rate * factor`` for a number or a schedule ``count -> lr``."""
    if callable(learning_rate):
        return lambda count: learning_rate(count) * factor
    return learning_rate * factor


def value_at(learning_rate: ScalarOrSchedule, count) -> jax.Array:
    return learning_rate(count) if callable(learning_rate) else jnp.asarray(learning_rate)


# ----------------------------------------------------------------------------- sharding (lrj.mesh_ops)

from lowrank_jax.mesh_ops import explicit_spec, replicated, reshard_to, zeros  # noqa: E402,F401
from lowrank_jax.mesh_ops import match_sharding as reshard_like  # noqa: E402,F401


# ----------------------------------------------------------------------------- LoRA pairs

LORA_FACTORS = scale_lib.LORA_FACTORS
lora_factor_names = scale_lib.lora_factor_names


def adapter_of(scale) -> base.Adapter | None:
    """``scale`` if it is an :class:`lrj.Adapter` (the optimizers' ``scale=`` may be one), else ``None``."""
    return scale if isinstance(scale, base.Adapter) else None


def lora_scale_fn(scale) -> Callable[[str, Any], float]:
    """Turns ``scale`` into ``(path, a) -> s``.

    ``scale`` is a number (every target), an :class:`lrj.Adapter` (its config gives
    ``alpha``/``alpha_pattern``/``rslora``, see :func:`lrj.adapters.scale.target_scale`;
    the rank is ``a.shape[-1]``), or a callable ``path -> s`` where ``path`` is the
    "/"-joined target path (e.g. ``"params/Dense_0/kernel"``).
    """
    if isinstance(scale, base.Adapter):
        config = scale.config
        if "alpha" not in config:
            raise ValueError(f"`scale`: adapter {config.get('method')!r} has no `alpha` in its config; pass a number")
        return lambda path, a: scale_lib.target_scale(config, path, a.shape[-1])
    if callable(scale):
        def from_callable(path, a):
            s = scale(path)
            check_positive(f"scale({path!r})", s)
            return float(s)

        return from_callable
    s = check_positive("scale", scale)
    return lambda path, a: s


def _pattern_str(axes) -> str:
    shown = {"stack": "*stack", "in": "*inputs", "out": "*outputs"}
    return "[" + ", ".join(shown.get(r, r) for r in axes) + "]"


def _fits_counts(shapes: dict, patterns: dict, counts: dict) -> bool:
    """Whether the leaves agree on one kernel layout with ``counts`` axes per role (sizes unknown)."""
    sizes: dict = {}  # (role, index within the role) or adapter-only axis name -> size
    for name, shape in shapes.items():
        expanded = [(role, i) for role in patterns[name] for i in range(counts.get(role, 1))]
        if len(expanded) != len(shape):
            return False
        for (role, i), size in zip(expanded, shape):
            key = (role, i) if role in counts else role
            if sizes.setdefault(key, size) != size:
                return False
    return True


def stack_from_roles(path: str, shapes: dict, roles: dict) -> int:
    """The number of stacked axes, from the leaves' shapes and axis roles alone (no kernel needed).

    A count fits when some numbers of input and output axes make every leaf's shape match its
    pattern, with one size per kernel axis and per adapter-only axis (``"rank"``) across leaves:
    for LoRA, ``a: [*stack, *inputs, r]`` and ``b: [*stack, r, *outputs]`` share their leading
    ``stack`` axes and ``b[stack] == a[-1]``. Raises ``ValueError`` naming ``path`` unless exactly
    one count fits (then pass ``layouts=``).
    """
    shapes = {n: tuple(s) for n, s in shapes.items()}
    patterns = {n: (roles[n].axes if isinstance(roles[n], base.Leaf) else tuple(roles[n])) for n in shapes}
    top = max(len(s) for s in shapes.values())
    fits = sorted({stack for stack in range(top + 1) for inputs in range(1, top + 1) for outputs in range(1, top + 1)
                   if _fits_counts(shapes, patterns, {"stack": stack, "in": inputs, "out": outputs})})
    if len(fits) != 1:
        why = "no" if not fits else f"several ({fits})"
        leaves = ", ".join(f"{n} {s}" for n, s in shapes.items())
        expected = " and ".join(f"{n} {_pattern_str(patterns[n])}" for n in shapes)
        raise ValueError(
            f"LoRA factors at {path!r} ({leaves}): {why} numbers of stacked axes fit {expected}; "
            f"pass `layouts={{{path!r}: lrj.Layout(stack, inputs)}}`"
        )
    return fits[0]


def lora_stack(path: str, a_shape, b_shape, layouts=None, adapter: base.Adapter | None = None) -> int:
    """Number of leading stacked (scan) axes of ``a: [*S, *I, r]``, ``b: [*S, r, *O]``.

    ``layouts`` (``{path regex: lrj.Layout}`` or ``path -> Layout``) decides when it names the
    path; otherwise :func:`stack_from_roles` solves it from the factors' roles (``adapter``'s,
    default LoRA's).
    """
    if layouts is not None:
        layout = layouts(path) if callable(layouts) else tree_lib.first_match(layouts, path, None)
        if layout is not None:
            return int(tree_lib.Layout(*layout).stack)
    a_name, b_name = lora_factor_names(adapter)
    roles = scale_lib.roles_or_lora(adapter)
    return stack_from_roles(path, {a_name: a_shape, b_name: b_shape}, {a_name: roles[a_name], b_name: roles[b_name]})


def _is_pair(node, leaf_names) -> bool:
    return all(n in node for n in leaf_names) and not any(isinstance(node[n], Mapping) for n in leaf_names)


def map_lora_pairs(fn, updates, params, leaf_names=LORA_FACTORS, *, adapter: base.Adapter | None = None):
    """Rebuilds ``updates`` with ``fn(path, {name: grad}, {name: param}) -> {name: new grad}`` at every LoRA target.

    A target is a mapping holding both factors, named ``leaf_names`` or, given ``adapter``,
    the leaves its roles declare ``("stack", "in", "rank")`` and ``("stack", "rank", "out")``
    (:func:`lora_factor_names`); ``fn`` sees them under those names. Other leaves next to
    them, such as DoRA's ``m``, pass through unchanged, as do leaves outside targets.
    """
    if params is None:
        raise ValueError("this transform needs the current adapter params: call `update(grads, state, params)`")
    if adapter is not None:
        leaf_names = lora_factor_names(adapter)

    found = []

    def rebuild(like, items: dict):
        if type(like) is dict:
            return items
        try:
            return type(like)(items)
        except Exception:  # noqa: BLE001 - a Mapping we cannot rebuild: fall back to a dict
            return items

    def walk(u, p, keys):
        if not isinstance(u, Mapping):
            return u
        if _is_pair(u, leaf_names):
            if not isinstance(p, Mapping) or not all(n in p for n in leaf_names):
                raise ValueError(f"`params` has no LoRA factors at {tree_lib.path_str(keys)!r}")
            new = fn(tree_lib.path_str(keys), {n: u[n] for n in leaf_names}, {n: p[n] for n in leaf_names})
            found.append(keys)
            return rebuild(u, {k: (new[k] if k in new else v) for k, v in u.items()})
        if not isinstance(p, Mapping):
            raise ValueError(f"`params` does not mirror `updates` at {tree_lib.path_str(keys)!r}")
        return rebuild(u, {k: walk(v, p[k], keys + (k,)) for k, v in u.items()})

    out = walk(updates, params, ())
    return out, found


def lora_pair_paths(tree, leaf_names=LORA_FACTORS, *, adapter: base.Adapter | None = None) -> list[str]:
    """Paths of the LoRA targets (mappings holding both factors, see :func:`map_lora_pairs`) in ``tree``."""
    if adapter is not None:
        leaf_names = lora_factor_names(adapter)
    out = []

    def walk(node, keys):
        if isinstance(node, Mapping):
            if _is_pair(node, leaf_names):
                out.append(tree_lib.path_str(keys))
                return
            for k, v in node.items():
                walk(v, keys + (k,))

    walk(tree, ())
    return out


def no_factors_error(method: str, adapter: base.Adapter | None) -> ValueError:
    """The error of an optimizer ``init`` that finds no LoRA factors in its params."""
    a_name, b_name = lora_factor_names(adapter)
    return ValueError(f"{method} found no LoRA factors: expected mappings holding leaves named {a_name!r} and "
                      f"{b_name!r} (the tree `adapter.init` returns)")
