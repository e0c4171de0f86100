"""Quantise and dequantise the targeted leaves of a params pytree (pure functions).

``quantize_params`` replaces every targeted float leaf by a quantised pytree node
(:class:`~lowrank_jax.quant.nf4.QuantizedArray` by default, or whatever the
``quantizer`` returns); the rest of the tree is returned as is (same objects).
``dequantize_params`` does the reverse for every quantised node it finds. Targets
follow :mod:`lowrank_jax.tree`: a regex matched with ``re.fullmatch`` against the
"/"-joined path (``"params/layers_0/mlp/up_proj/kernel"``), a list of them, or a
callable ``(path, leaf) -> bool``; NNX ``Variable`` leaves keep their wrapper.

Example:
    >>> import functools, jax, jax.numpy as jnp
    >>> import lowrank_jax as lrj
    >>> from lowrank_jax import quant
    >>> params = {"dense": {"kernel": jnp.ones((64, 32)), "bias": jnp.zeros(32)}}
    >>> qparams = quant.quantize_params(params, r".*/kernel")
    >>> type(qparams["dense"]["kernel"]).__name__, qparams["dense"]["bias"] is params["dense"]["bias"]
    ('QuantizedArray', True)
    >>> fp4 = functools.partial(quant.nf4.quantize, quant_type="fp4", double_quant=False)
    >>> quant.quantize_params(params, [r"dense/kernel"], fp4)["dense"]["kernel"].quant_type
    'fp4'
    >>> dense = quant.dequantize_params(qparams, jnp.float32)
    >>> dense["dense"]["kernel"].dtype, float(dense["dense"]["kernel"].sum())
    (dtype('float32'), 2048.0)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lowrank_jax import tree as tree_lib
from lowrank_jax.quant import int8, nf4
from lowrank_jax.quant.blockwise import check_finite

__all__ = ["QUANTIZED_TYPES", "is_quantized", "quantize_params", "dequantize_params"]

#: The quantised pytree node types this package makes (:func:`dequantize_params` and the bridges
#: accept any node of the :func:`is_quantized` protocol, these and others).
QUANTIZED_TYPES = (nf4.QuantizedArray, int8.Int8Array)

#: A quantised node: a pytree node with ``shape``, ``dtype`` and ``dequantize(dtype)``; the one
#: definition, :func:`lowrank_jax.tree.is_quantized`, that the bridges use too.
is_quantized = tree_lib.is_quantized

StackAxes = int | tree_lib.Layout


def _stack_axes(stack_axes, path: str, leaf) -> int:
    """The number of leading stack axes of ``leaf``, from an int or a :class:`lowrank_jax.tree.Layout`."""
    if callable(stack_axes):
        value = stack_axes(path, leaf)
    elif isinstance(stack_axes, Mapping):
        value = tree_lib.first_match(stack_axes, path, 0)
    else:
        value = stack_axes
    shape = tuple(leaf.shape)
    if isinstance(value, tree_lib.Layout):
        if value.stack < 0 or value.inputs < 1 or value.stack + value.inputs >= leaf.ndim:
            raise ValueError(f"layout {value} does not fit {path!r} of shape {shape}")
        return len(value.split(shape)[0])
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < leaf.ndim:
        raise ValueError(f"stack axes for {path!r} of shape {shape} must be an int in [0, {leaf.ndim}) or an "
                         f"lrj.Layout, got {value!r}")
    return value


def quantize_params(params, targets, quantizer: Callable[[jax.Array], Any] | None = None, *,
                    stack_axes: StackAxes | Mapping[str, StackAxes] | Callable[[str, Any], StackAxes] = 0):
    """``params`` with every targeted leaf replaced by ``quantizer(leaf)``.

    Args:
      params: a params pytree (Flax linen variables, an NNX state, nested dicts).
      targets: regex (``re.fullmatch`` on "/"-joined paths), list of regexes, or
        callable ``(path, leaf) -> bool``, as for adapters.
      quantizer: ``array -> quantised node``; default :func:`lowrank_jax.quant.nf4.quantize`
        (NF4, blocks of 64, double quantisation). Use ``functools.partial`` for
        other settings, or :func:`lowrank_jax.quant.int8.quantize`.
      stack_axes: leading axes that stack layers (``nn.scan``): each slice is
        quantised on its own (``jax.vmap``) and the node's leaves get those axes
        in front, so ``nn.scan`` slices them with the layer. Either their number
        (an int) or the kernel's :class:`lowrank_jax.tree.Layout` (the layout the
        adapters take; its ``stack`` axes are the ones vmapped), for all targets,
        as ``{path regex: int or Layout}`` (first match wins, default 0), or as a
        callable ``(path, leaf) -> int or Layout``.

    Returns:
      A new tree; untargeted leaves are the same objects.

    Raises:
      ValueError: nothing matched (the message lists paths), a target is already quantised.
      TypeError: a targeted leaf is not a floating-point array.
    """
    match = tree_lib._matcher(targets)
    quantizer = nf4.quantize if quantizer is None else quantizer
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=tree_lib._is_leaf)
    if not leaves:
        raise ValueError("`params` has no leaves")
    out, paths, hits = [], [], 0
    for keypath, leaf in leaves:
        path = tree_lib.path_str(keypath)
        paths.append(path)
        value = tree_lib._unwrap(leaf)
        if not match(path, value):
            out.append(leaf)
            continue
        if is_quantized(value):
            raise ValueError(f"target {path!r} is already quantised ({type(value).__name__})")
        dtype = getattr(value, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"target {path!r} must be a floating-point array, got {type(value).__name__} "
                            f"of dtype {dtype}")
        fn = quantizer
        stacked = _stack_axes(stack_axes, path, value)
        if stacked:
            check_finite(value, path)  # under vmap the quantiser sees tracers and cannot check
        for _ in range(stacked):
            fn = jax.vmap(fn)
        quantized = fn(value)
        out.append(leaf.replace(quantized) if tree_lib._is_variable(leaf) else quantized)
        hits += 1
    if not hits:
        shown = ", ".join(repr(p) for p in paths[:12]) + (", ..." if len(paths) > 12 else "")
        raise ValueError(f"`targets` {targets!r} matched no parameter; paths in params include: {shown}")
    return jax.tree_util.tree_unflatten(treedef, out)


def dequantize_params(params, dtype=jnp.bfloat16):
    """``params`` with every quantised node replaced by its dense array in ``dtype``.

    Jittable; this is what a QLoRA forward pass does layer by layer (in the
    compute dtype, bfloat16 by default).
    """
    def dense(leaf):
        value = tree_lib._unwrap(leaf)
        if not is_quantized(value):
            return leaf
        array = value.dequantize(dtype)
        return leaf.replace(array) if tree_lib._is_variable(leaf) else array

    return jax.tree.map(dense, params, is_leaf=tree_lib._is_leaf)

