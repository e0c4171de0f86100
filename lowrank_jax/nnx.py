"""Flax NNX bridge: factored adapter execution inside unchanged NNX models.

:func:`apply` works on a copy of the model's graph (``nnx.split`` then
``nnx.merge(copy=True)``; the user's model is never modified). In the copy,
each targeted ``nnx.Linear``/``nnx.LinearGeneral``/``nnx.Einsum``/``nnx.Conv``/``nnx.Embed``
gets its adapter leaves as :class:`AdapterParam` variables next to its kernel
(so ``nnx.scan``/``nnx.vmap`` over stacked layers slice them with the kernel,
and ``nnx.remat`` recomputes them) and its class is swapped for a subclass whose
``__call__`` (and ``attend``) adds the adapter's factored term after the
original computation. The subclass is recorded in the graph definition, so the
swap survives the graph round trips that NNX transforms make. A module of any other
class that owns a target (a custom ``x @ self.kernel[...]`` layer) is adapted at each
contraction of its kernel (:mod:`lrj.contractions`) or refused naming the target.

Params for ``adapter.init`` are the model's ``nnx.Param`` state, e.g.
``adapter.init(key, nnx.state(model, nnx.Param))``; paths look like
``"blocks/linear1/kernel"``.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx as fnnx

from lowrank_jax import contractions, sites
from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import base

__all__ = ["AdapterAux", "AdapterParam", "apply", "apply_base", "kernel_layouts", "params"]

PREFIX = "lrj_"


class AdapterParam(fnnx.Param):
    """Adapter leaves placed in a model copy (a ``Param`` so ``StateAxes({nnx.Param: 0})`` scans slice it)."""


class AdapterAux(fnnx.Intermediate):
    """An adapter's auxiliary output (``base.WithAux``) sown on its layer in the model copy during
    ``apply(..., with_aux=True)``; under ``nnx.scan`` give it a scan axis (``nnx.StateAxes({..., AdapterAux: 0})``)."""


_ACTIVE: contextvars.ContextVar[dict] = contextvars.ContextVar("lowrank_jax_nnx_active", default={})
_TOKENS = itertools.count()
_CLASSES: dict[type, type] = {}


def params(model) -> Any:
    """The model's ``nnx.Param`` state, the ``params`` to give ``adapter.init``."""
    return fnnx.state(model, fnnx.Param)


def _kernel_name(module) -> str | None:
    if isinstance(module, fnnx.Embed):
        return "embedding"
    if isinstance(module, (fnnx.Linear, fnnx.LinearGeneral, fnnx.Einsum, fnnx.Conv)):
        return "kernel"
    return None


#: The layer families this bridge adapts directly (:func:`lrj.sites.build`).
_FAMILIES = (
    (fnnx.Embed, "embed"), (fnnx.Linear, "dense"), (fnnx.LinearGeneral, "dense_general"),
    (fnnx.Einsum, "einsum"), (fnnx.Conv, "conv"),
)


def _family(module) -> str:
    return sites.family_of(module, _FAMILIES)


def _site_input(module, kind: str, args, kwargs, kernel):
    """``(x, site, out_perm)`` of a layer call (see :func:`lrj.sites.build`)."""
    family = _family(module)
    x = args[0] if args else next(iter(kwargs.values()))
    if family == "embed":
        return sites.build(family, kind, x, kernel, dtype=getattr(module, "dtype", None))
    bias = module.bias[...] if getattr(module, "bias", None) is not None else None
    einsum_str = None
    if family == "einsum":
        einsum_str = module.einsum_str if module.einsum_str is not None else (args[1] if len(args) > 1 else kwargs["einsum_str"])
    return sites.build(
        family, kind, x, kernel, dtype=getattr(module, "dtype", None), bias=bias,
        axis=getattr(module, "axis", None), batch_axes=getattr(module, "batch_axis", None) or (),
        einsum_str=einsum_str, window=sites.ConvWindow.of(module) if family == "conv" else None,
    )


def _run(module, kind: str, original, args, kwargs):
    name = _kernel_name(module)
    var = getattr(module, name)
    kernel = var.get_value()
    if tree_lib.is_quantized(kernel):
        # Dequantise inside the call, in the compute dtype: under remat it is recomputed, never stored.
        dense = kernel.dequantize(module.dtype or kernel.dtype)
        var.set_value(dense)
        try:
            y = original(module, *args, **kwargs)
        finally:
            var.set_value(kernel)
        kernel = dense
    else:
        y = original(module, *args, **kwargs)
    if not module._lrj_adapted:
        return y
    token, path = module._lrj_token, module._lrj_path
    active = _ACTIVE.get().get(token)
    if active is None:
        raise RuntimeError(f"adapted layer {path!r} was called outside lrj.nnx.apply")
    adapter, executed, shared, call_args, with_aux = active
    executed.add(path)
    leaves = {**{n: getattr(module, PREFIX + n)[...] for n in module._lrj_leaves}, **shared}
    key_var = getattr(module, PREFIX + "dropout_key", None)
    x, site, out_perm = _site_input(module, kind, args, kwargs, kernel)
    if out_perm is not None:
        y = jnp.transpose(y, tuple(sorted(range(len(out_perm)), key=out_perm.__getitem__)))
    y = adapter.apply(leaves, site, x, y, path=path, dropout_key=None if key_var is None else key_var[...], **call_args)
    y = _sow_aux(module, y, with_aux)
    return y if out_perm is None else jnp.transpose(y, out_perm)


AUX_NAME = PREFIX + "aux"


def _sow_aux(module, out, with_aux: bool):
    """The layer output of an adapter's ``apply``; with ``with_aux`` its ``base.WithAux`` values are sown
    on ``module`` as an :class:`AdapterAux` (a tuple, one entry per call)."""
    y, aux = base.split_aux(out)
    if aux is not None and with_aux:  # what Module.sow did (now deprecated outside nnx.capture), kept as a variable
        var = getattr(module, AUX_NAME, None)  # so that nnx.scan/nnx.remat carry it like any state
        if isinstance(var, AdapterAux):
            var.set_value((*var.get_value(), aux))
        else:
            setattr(module, AUX_NAME, AdapterAux((aux,)))
    return y


def _collect_aux(clone) -> dict:
    """``{AUX_COLLECTION: {*module path: {kernel name: (aux, ...)}}}``: the sown values, as linen's collection."""
    found = {}
    for path, module in fnnx.iter_modules(clone):
        var = getattr(module, AUX_NAME, None)
        if isinstance(var, AdapterAux):
            found[(*path, module._lrj_path.rsplit("/", 1)[-1])] = var.get_value()
    return {base.AUX_COLLECTION: tree_lib.nest(found)}


def _is_known(cls: type) -> bool:
    return issubclass(cls, tuple(layer for layer, _ in _FAMILIES))


def _run_unknown(module, original, args, kwargs):
    """A custom layer's call with its targeted kernel's contractions adapted (:mod:`lrj.contractions`)."""
    path, name = module._lrj_path, module._lrj_param
    active = _ACTIVE.get().get(module._lrj_token)
    if active is None:
        raise RuntimeError(f"adapted layer {path!r} was called outside lrj.nnx.apply")
    adapter, executed, shared, call_args, with_aux = active
    kernel = getattr(module, name).get_value()
    if tree_lib.is_quantized(kernel):
        kernel = kernel.dequantize(getattr(module, "dtype", None) or kernel.dtype)
    leaves = {**{n: getattr(module, PREFIX + n)[...] for n in module._lrj_leaves}, **shared}
    key_var = getattr(module, PREFIX + "dropout_key", None)
    graphdef, state = fnnx.split(module)

    def call(k, *a, **kw):  # a copy made inside the trace, so its kernel can hold the traced k
        copy = fnnx.merge(graphdef, state, copy=True)
        getattr(copy, name).set_value(k)
        return original(copy, *a, **kw)

    def adapted(site, x, y):
        out = adapter.apply(leaves, site, x, y, path=path, dropout_key=None if key_var is None else key_var[...],
                            **call_args)
        return _sow_aux(module, out, with_aux)

    out, contracted = contractions.adapt_contractions(call, kernel, args, kwargs, adapted, path)
    if contracted:
        executed.add(path)
    return out


def _adapted_class(cls: type) -> type:
    if cls in _CLASSES.values():
        return cls
    if cls not in _CLASSES:
        namespace = {}
        if issubclass(cls, fnnx.Embed):
            namespace["__call__"] = lambda self, *a, **k: _run(self, "lookup", cls.__call__, a, k)
            namespace["attend"] = lambda self, *a, **k: _run(self, "attend", cls.attend, a, k)
        elif _is_known(cls):
            kind = "conv" if issubclass(cls, fnnx.Conv) else "linear"
            namespace["__call__"] = lambda self, *a, **k: _run(self, kind, cls.__call__, a, k)
        else:  # a layer the bridge does not know: adapted at the contraction consuming its kernel
            namespace["__call__"] = lambda self, *a, **k: _run_unknown(self, cls.__call__, a, k)
        _CLASSES[cls] = type(f"Adapted{cls.__name__}", (cls,), namespace)
    return _CLASSES[cls]


@contextlib.contextmanager
def _active(token: int, adapter, executed: set, shared: dict, call_args: dict, with_aux: bool = False):
    reset = _ACTIVE.set({**_ACTIVE.get(), token: (adapter, executed, shared, call_args, with_aux)})
    try:
        yield
    finally:
        _ACTIVE.reset(reset)


def adapted_copy(model, adapter: base.Adapter | None, adapter_params, *, dropout_rng=None):
    """``(copy, token)``: a copy of ``model`` whose targeted layers run the adapter and whose
    quantised kernels are dequantised inside their calls."""
    graphdef, state = fnnx.split(model)
    clone = fnnx.merge(graphdef, state, copy=True)
    modules = {tuple(p): m for p, m in fnnx.iter_modules(clone)}
    token = next(_TOKENS)
    for path, module in modules.items():  # quantised kernels are dequantised in the call, adapted or not
        name = _kernel_name(module)
        if name is not None and tree_lib.is_quantized(getattr(module, name).get_value()):
            module.__class__ = _adapted_class(type(module))
            module._lrj_adapted, module._lrj_token, module._lrj_path = False, token, tree_lib.path_str((*path, name))
    if adapter is None:
        return clone, token
    adapter_params, substituted = base.substitutions(adapter, adapter_params)
    for keys, value in substituted.items():  # trained base leaves replace their parameters
        module = modules.get(tuple(keys[:-1]))
        var = getattr(module, str(keys[-1]), None) if module is not None else None
        if not isinstance(var, fnnx.Variable):
            raise ValueError(f"trained base leaf {tree_lib.path_str(keys)!r} is not a variable of this model")
        var.set_value(value)
    targets = base.resolve_targets(adapter_params, params(clone), adapter.leaf_names)
    for i, (keys, path, kernel, leaves) in enumerate(targets):
        module = modules.get(tuple(keys[:-1]))
        known = module is not None and _is_known(type(module))
        if module is None or (known and _kernel_name(module) != keys[-1]):
            raise ValueError(
                f"adapter target {path!r} is not the kernel of an nnx.Linear/LinearGeneral/Einsum/Conv/Embed "
                f"(found {type(module).__name__})"
            )
        if not known:
            if getattr(module, "_lrj_param", keys[-1]) != keys[-1]:
                raise NotImplementedError(
                    f"{type(module).__name__} owns several adapter targets ({module._lrj_path!r}, {path!r}); the bridge "
                    f"adapts one kernel per layer it does not know")
            module._lrj_param = keys[-1]
        module.__class__ = _adapted_class(type(module))
        module._lrj_adapted, module._lrj_token, module._lrj_path = True, token, path
        module._lrj_leaves = tuple(sorted(leaves))
        for n, v in leaves.items():
            setattr(module, PREFIX + n, AdapterParam(v))
        if dropout_rng is not None and adapter.config.get("dropout", 0.0) > 0.0:
            setattr(module, PREFIX + "dropout_key",
                    AdapterParam(base.dropout_keys(dropout_rng, i, path, kernel, leaves, adapter)))
    return clone, token


def apply(model, adapter: base.Adapter, adapter_params, *args, dropout_rng=None, method: str = "__call__",
          with_aux: bool = False, **kwargs):
    """``getattr(model, method)(*args, **kwargs)`` with the adapter executed in factored form.

    ``model`` is left unchanged: the call runs on a copy of its graph. Works
    under ``jax.jit``/``jax.grad`` with respect to ``adapter_params``.

    With ``with_aux=True`` returns ``(output, aux)``: the auxiliary values of an adapter whose
    ``apply`` returns ``base.WithAux`` (a mixture's router statistics,
    :func:`lowrank_jax.adapters.moe.mixlora`), sown as :class:`AdapterAux` on each adapted layer of the
    copy and returned as linen's collection is, ``{"adapter_aux": {*path: {kernel name: (aux, ...)}}}``
    (feed it to ``lowrank_jax.adapters.moe.aux_loss``). Inside ``nnx.scan`` the scanned state must give
    ``AdapterAux`` an axis (``nnx.StateAxes({nnx.Param: 0, lrj.nnx.AdapterAux: 0, ...})``).

    Raises:
      ValueError: naming every target the call did not execute (it would get zero gradients).
    """
    call_args = base.take_call_args(adapter, kwargs)
    clone, token = adapted_copy(model, adapter, adapter_params, dropout_rng=dropout_rng)
    executed: set[str] = set()
    with _active(token, adapter, executed, tree_lib.shared_of(adapter_params), call_args, with_aux):
        try:
            out = getattr(clone, method)(*args, **kwargs)
        except ValueError as e:
            if not with_aux:
                raise
            raise ValueError(f"{e} [with_aux=True: an nnx.scan/nnx.vmap over adapted layers must give "
                             f"lrj.nnx.AdapterAux an axis, e.g. nnx.StateAxes({{nnx.Param: 0, AdapterAux: 0, ...: None}})]") from e
    site_params, _ = base.substitutions(adapter, adapter_params)
    targets = [path for _, path, _, _ in base.resolve_targets(site_params, params(clone), adapter.leaf_names)]
    missed = [path for path in targets if path not in executed]
    if missed:
        raise ValueError(
            f"adapter targets were not executed by this call: {missed[:8]}{' ...' if len(missed) > 8 else ''}. "
            f"A targeted layer this `method=` does not call gets no gradient; narrow `targets`."
        )
    return (out, _collect_aux(clone)) if with_aux else out


def apply_base(model, *args, method: str = "__call__", **kwargs):
    """Calls ``model`` whose kernels may be quantised (``lrj.quant``), with no adapter; ``model`` is unchanged."""
    clone, _ = adapted_copy(model, None, None)
    return getattr(clone, method)(*args, **kwargs)


def kernel_layouts(model) -> dict[str, tree_lib.Layout]:
    """The :class:`lrj.Layout` of every Linear/LinearGeneral/Einsum/Embed kernel in ``model``.

    Leading kernel axes beyond what the layer's own shape attributes describe
    are stacked (``nnx.vmap``-created layers scanned with ``nnx.scan``).
    """
    out = {}
    for path, module in fnnx.iter_modules(model):
        name = _kernel_name(module)
        if name is None:
            continue
        kernel = getattr(module, name)
        if isinstance(module, fnnx.LinearGeneral):
            own, inputs = len(module.in_features) + len(module.out_features), len(module.in_features)
        elif isinstance(module, fnnx.Einsum):
            own = len(module.kernel_shape)
            inputs = sites.einsum_plan(module.einsum_str, 0)[1] if module.einsum_str else 1
        elif isinstance(module, fnnx.Conv):
            inputs = sites.conv_inputs(module)
            own = inputs + 1
        else:
            own, inputs = 2, 1
        out[tree_lib.path_str((*path, name))] = tree_lib.Layout(kernel.ndim - own, inputs)
    return out
