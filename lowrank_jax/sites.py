"""How a layer call becomes a :class:`~lowrank_jax.adapters.base.Site`: one module for both bridges.

The linen and NNX bridges recognise the same layer families and read the same
attributes from them (``axis`` of DenseGeneral, ``einsum_str`` of Einsum, the
window of Conv); :func:`build` turns a call of any of them into the adapter's
view: the input with its contracting axes last, the per-call kernel, the
number of input axes, the bias in kernel output order, and the permutation back
to the layer's output axes.

Families: ``"dense"`` (``nn.Dense``, ``nnx.Linear``), ``"dense_general"``
(``nn.DenseGeneral``, ``nnx.LinearGeneral``), ``"einsum"`` (``nn.Einsum``,
``nnx.Einsum``), ``"embed"`` (``nn.Embed``, ``nnx.Embed``; kinds ``"lookup"`` and
``"attend"``) and ``"conv"`` (``nn.Conv``, ``nnx.Conv``: kernel
``[*window, in, out]``, ``Layout(0, ndim - 1)``).
"""

from __future__ import annotations

import functools
import re
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from lowrank_jax.adapters import base

__all__ = ["ConvWindow", "build", "einsum_plan"]


class ConvWindow(NamedTuple):
    """The attributes of a Flax convolution that fix its window (all but its features)."""

    kernel_size: Any
    strides: Any = 1
    padding: Any = "SAME"
    input_dilation: Any = 1
    kernel_dilation: Any = 1
    feature_group_count: int = 1
    precision: Any = None

    @classmethod
    def of(cls, module) -> ConvWindow:
        """The window of an ``nn.Conv`` or ``nnx.Conv`` (they name these attributes alike)."""
        if getattr(module, "mask", None) is not None:
            raise NotImplementedError("LoRA on a masked Conv is not supported")
        return cls(*(getattr(module, f) for f in cls._fields))


def conv(window: ConvWindow, x, kernel, dtype=None):
    """``x`` convolved with ``kernel: [*window, in, features]`` exactly as a Flax Conv with this window.

    LoRA's ``a`` is such a kernel with ``r`` features (peft's ``lora_A`` is a Conv with the
    base layer's window); computed by Flax's own ``nn.Conv``, so padding modes, strides,
    dilations and batch axes mean what they mean in the model.
    """
    if window.feature_group_count != 1:
        raise NotImplementedError(f"LoRA on a grouped Conv (feature_group_count={window.feature_group_count}) is not supported")
    layer = nn.Conv(features=kernel.shape[-1], kernel_size=window.kernel_size, strides=window.strides,
                    padding=window.padding, input_dilation=window.input_dilation,
                    kernel_dilation=window.kernel_dilation, use_bias=False, dtype=dtype, precision=window.precision)
    return layer.apply({"params": {"kernel": kernel}}, x)


def einsum_plan(einsum_str: str, x_ndim: int):
    """For ``"x,k->o"``: the permutation moving ``x``'s contracted axes last (in kernel order),
    the number of kernel input axes, the permutation from the delta's axes to ``o``'s, and the
    permutation putting a bias's axes in kernel order (``None`` when already)."""
    spec = einsum_str.replace(" ", "")
    m = re.fullmatch(r"([a-zA-Z]+),([a-zA-Z]+)->([a-zA-Z]+)", spec)
    if not m:
        raise NotImplementedError(f"LoRA on Einsum supports 'x,k->o' subscripts without '...'; got {einsum_str!r}")
    xs, ks, os_ = m.groups()
    ins = [c for c in ks if c in xs and c not in os_]
    outs = [c for c in ks if c in os_ and c not in xs]
    if list(ks) != ins + outs or not ins or not outs:
        raise NotImplementedError(
            f"LoRA on Einsum {einsum_str!r} needs a kernel whose contracted axes come first and whose other axes all "
            f"appear in the output (no per-head shared axes); got contracted {ins}, output {outs}"
        )
    rest = [c for c in xs if c not in ins]
    x_perm = [xs.index(c) for c in rest] + [xs.index(c) for c in ins]
    delta_letters = rest + outs
    out_perm = [delta_letters.index(c) for c in os_]
    bias_letters = [c for c in os_ if c in outs]  # a bias has the kernel's output axes in output order
    bias_perm = [bias_letters.index(c) for c in outs]
    return x_perm, len(ins), out_perm, (None if bias_perm == sorted(bias_perm) else bias_perm)


def build(family: str, kind: str, x, kernel, *, dtype=None, bias=None, axis=None, batch_axes=(),
          einsum_str: str | None = None, window: ConvWindow | None = None):
    """``(x, site, out_perm)`` for one call of a layer of ``family``.

    ``out_perm`` takes the site's output axes (``x``'s other axes, then the kernel's
    outputs) to the layer's, or is ``None`` when they agree.
    """
    if kind in ("lookup", "attend"):
        return x, base.Site(kind, kernel, 1, dtype), None
    if family == "dense":
        return x, base.Site("linear", kernel, 1, dtype, bias), None
    if family == "dense_general":
        if tuple(batch_axes):
            raise NotImplementedError("LoRA on DenseGeneral/LinearGeneral with batch axes is not supported")
        axis = axis if isinstance(axis, (tuple, list)) else (axis,)
        axis = tuple(a % x.ndim for a in axis)
        x = jnp.moveaxis(x, axis, tuple(range(x.ndim - len(axis), x.ndim)))
        return x, base.Site("linear", kernel, len(axis), dtype, bias), None
    if family == "einsum":
        x_perm, n_in, out_perm, bias_perm = einsum_plan(einsum_str, x.ndim)
        if bias is not None and bias_perm is not None:
            bias = jnp.transpose(bias, bias_perm)
        if out_perm == sorted(out_perm):
            out_perm = None
        return jnp.transpose(x, x_perm), base.Site("linear", kernel, n_in, dtype, bias), out_perm
    if family == "conv":
        site = base.Site("conv", kernel, kernel.ndim - 1, dtype, bias, functools.partial(conv, window, dtype=dtype))
        return x, site, None
    raise ValueError(f"unknown layer family {family!r}")


def family_of(module, families) -> str:
    """The family of ``module`` from a bridge's ``((layer class, family), ...)`` table."""
    for cls, family in families:
        if isinstance(module, cls):
            return family
    raise TypeError(f"not a layer the bridge adapts: {type(module).__name__}")


def conv_inputs(module) -> int:
    """Input axes of a Conv kernel ``[*window, in, out]``: the window's and ``in``."""
    size = module.kernel_size
    return (1 if isinstance(size, int) else len(size)) + 1
