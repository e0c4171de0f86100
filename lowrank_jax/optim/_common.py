"""Helpers shared by the optimizers: argument checks, schedules, sharding, LoRA pairs and their scales."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import base

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

def lora_scale_fn(scale) -> Callable[[str, Any], float]:
    """Turns ``scale`` into ``(path, a) -> s``.

    ``scale`` is a number (every target), an :class:`lrj.Adapter` (its config gives
    ``alpha``/``alpha_pattern``/``rslora``; the rank is ``a.shape[-1]``), or a
    callable ``path -> s`` where ``path`` is the "/"-joined target path
    (e.g. ``"params/Dense_0/kernel"``).
    """
    if isinstance(scale, base.Adapter):
        config = scale.config
        if "alpha" not in config:
            raise ValueError(f"`scale`: adapter {config.get('method')!r} has no `alpha` in its config; pass a number")
        from lowrank_jax.adapters.lora import lora_scale

        def from_adapter(path, a):
            alpha = tree_lib.first_match(config.get("alpha_pattern"), path, config["alpha"])
            return lora_scale(int(a.shape[-1]), alpha, bool(config.get("rslora", False)))

        return from_adapter
    if callable(scale):
        def from_callable(path, a):
            s = scale(path)
            check_positive(f"scale({path!r})", s)
            return float(s)

        return from_callable
    s = check_positive("scale", scale)
    return lambda path, a: s


def lora_stack(path: str, a_shape, b_shape, layouts=None) -> int:
    """Number of leading stacked (scan) axes of ``a: [*S, *I, r]``, ``b: [*S, r, *O]``."""
    if layouts is not None:
        layout = layouts(path) if callable(layouts) else tree_lib.first_match(layouts, path, None)
        if layout is not None:
            return int(tree_lib.Layout(*layout).stack)
    r = a_shape[-1]
    fits = [s for s in range(0, min(len(a_shape), len(b_shape)) - 1)
            if tuple(a_shape[:s]) == tuple(b_shape[:s]) and b_shape[s] == r]
    if len(fits) != 1:
        why = "no" if not fits else f"several ({fits})"
        raise ValueError(
            f"LoRA factors at {path!r} (a {tuple(a_shape)}, b {tuple(b_shape)}): {why} numbers of stacked axes fit "
            f"a [*stack, *inputs, r] and b [*stack, r, *outputs]; pass `layouts={{{path!r}: lrj.Layout(stack, inputs)}}`"
        )
    return fits[0]


def map_lora_pairs(fn, updates, params, leaf_names=("a", "b")):
    """Rebuilds ``updates`` with ``fn(path, {name: grad}, {name: param}) -> {name: new grad}`` at every LoRA target.

    A target is a mapping holding both ``a`` and ``b`` (other leaves next to them,
    such as DoRA's ``m``, pass through unchanged, as do leaves outside targets).
    """
    if params is None:
        raise ValueError("this transform needs the current adapter params: call `update(grads, state, params)`")

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
        if all(n in u for n in leaf_names) and not any(isinstance(u[n], Mapping) for n in leaf_names):
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


def lora_pair_paths(tree, leaf_names=("a", "b")) -> list[str]:
    """Paths of the LoRA targets (mappings holding ``a`` and ``b``) in ``tree``."""
    out = []

    def walk(node, keys):
        if isinstance(node, Mapping):
            if all(n in node for n in leaf_names) and not any(isinstance(node[n], Mapping) for n in leaf_names):
                out.append(tree_lib.path_str(keys))
                return
            for k, v in node.items():
                walk(v, keys + (k,))

    walk(tree, ())
    return out
