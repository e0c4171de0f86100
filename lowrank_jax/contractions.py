"""Adapting a layer the bridges do not know, at the contraction that consumes its kernel.

A custom layer (``x @ self.param("kernel", ...)``, a hand-written einsum) is traced to a
jaxpr with its kernel as an explicit input; the jaxpr is then evaluated inside the
surrounding computation (``jit``, ``grad``, ``scan``...), and at each ``dot_general``
whose right operand is the kernel (or a dtype cast of it) the adapter's ``apply`` turns
that contraction's output ``y = x W`` into the adapted one, exactly as for ``nn.Dense``.
Any other use of the kernel (a gather, an elementwise op, a reshape before the
contraction) is refused with the target's path, so a target is adapted or refused,
never skipped.

This is the general route qwix reaches by patching jax's functions during the call
(``qwix/_src/interception.py``); evaluating the traced jaxpr needs neither global state
nor turning jit off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core as jex

from lowrank_jax.adapters import base

__all__ = ["adapt_contractions"]

#: Primitives that pass the kernel through unchanged in value (a cast) before it is contracted.
_CASTS = ("convert_element_type",)
#: Call-like primitives whose inner jaxpr is evaluated with the same rules.
_CALLS = ("jit", "pjit", "closed_call", "core_call", "remat", "checkpoint")


def adapt_contractions(fn: Callable, kernel, args, kwargs, on_contraction: Callable, path: str):
    """``fn(kernel, *args, **kwargs)`` with every contraction of ``kernel`` replaced by ``on_contraction``.

    ``on_contraction(site, x, y) -> y'`` gets a ``"linear"`` :class:`~lowrank_jax.adapters.base.Site`
    (``x``'s contracted axes moved last, in kernel order) and the contraction's output ``y``.
    Returns ``(output, number of contractions adapted)``.

    Raises:
      NotImplementedError: naming ``path`` when the kernel is used other than as the right
        operand of a contraction over its leading axes.
    """
    flat, treedef = jax.tree.flatten((args, kwargs))

    def traced(k, *flat_args):
        a, kw = jax.tree.unflatten(treedef, flat_args)
        return fn(k, *a, **kw)

    closed, out_shape = jax.make_jaxpr(traced, return_shape=True)(kernel, *flat)
    count = [0]
    outs = _evaluate(closed.jaxpr, closed.consts, [kernel, *flat], {0}, on_contraction, path, count)
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs), count[0]


def _evaluate(jaxpr, consts, args, kernel_positions, on_contraction, path, count):
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jex.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    holds_kernel = {jaxpr.invars[i] for i in kernel_positions}
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        uses = [i for i, v in enumerate(eqn.invars) if not isinstance(v, jex.Literal) and v in holds_kernel]
        name = eqn.primitive.name
        if not uses:
            outvals = _bind(eqn, invals)
        elif name in _CASTS:
            outvals = _bind(eqn, invals)
            holds_kernel.update(eqn.outvars)
        elif name == "dot_general" and uses == [1]:
            (y,) = _bind(eqn, invals)
            outvals = [_contraction(invals[0], invals[1], eqn.params["dimension_numbers"], y, on_contraction, path)]
            count[0] += 1
        elif name in _CALLS and "jaxpr" in eqn.params:
            inner = eqn.params["jaxpr"]
            inner_jaxpr, inner_consts = (inner.jaxpr, inner.consts) if hasattr(inner, "consts") else (inner, [])
            outvals = _evaluate(inner_jaxpr, inner_consts, invals, set(uses), on_contraction, path, count)
        else:
            role = "the left operand of a contraction" if name == "dot_general" else f"`{name}`"
            raise NotImplementedError(
                f"adapter target {path!r} is used by {role} in its layer, which the bridge cannot adapt: only "
                f"contractions `x @ kernel` (lax.dot_general with the kernel on the right, over its leading axes) "
                f"are adapted in layers the bridge does not know"
            )
        for v, val in zip(eqn.outvars, outvals):
            env[v] = val
    return [read(v) for v in jaxpr.outvars]


def _bind(eqn, invals) -> list:
    with eqn.ctx.manager:  # as jax.core.eval_jaxpr binds an equation
        out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
    return list(out) if eqn.primitive.multiple_results else [out]


def _contraction(x, kernel, dimension_numbers, y, on_contraction, path: str):
    (x_contract, k_contract), (x_batch, k_batch) = dimension_numbers
    n = len(k_contract)
    if x_batch or k_batch or tuple(k_contract) != tuple(range(n)):
        raise NotImplementedError(
            f"adapter target {path!r} is contracted over its axes {tuple(k_contract)} (batch axes {tuple(k_batch)}); "
            f"the bridge adapts contractions over a kernel's leading (input) axes, [*inputs, *outputs]"
        )
    free = [d for d in range(x.ndim) if d not in x_contract]
    x = jax.numpy.transpose(x, (*free, *x_contract))
    return on_contraction(base.Site("linear", kernel, n), x, y)
