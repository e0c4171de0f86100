"""Flax linen bridge: factored adapter execution inside unchanged linen models.

How it works: :func:`inject` places each target's adapter leaves in the params
collection right next to its kernel (``.../q_proj/kernel@adapter``), so
``nn.scan`` slices them together with a stacked kernel and ``nn.remat``
recomputes them with it. :func:`apply` then runs ``model.apply`` under
``nn.intercept_methods`` (linen's official extension point): every call of
``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum``, ``nn.Conv`` and ``nn.Embed`` (``__call__``
and ``attend``) that finds adapter leaves next to its kernel has its output passed
through ``adapter.apply``, which adds the low-rank term in factored form
(``x W + s (x A) B``). The model's code is not touched and the dense update
``s A B`` is never formed, so no full-size weight gradient exists in the
backward pass. Any other module that owns a target (a custom ``x @ self.param(...)``
layer) is traced to a jaxpr and adapted at each ``dot_general`` consuming its kernel
(:mod:`lrj.contractions`), or refused naming the target: every target runs or raises.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core.scope import in_filter

from lowrank_jax import contractions, sites
from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import base

__all__ = ["apply", "apply_base", "inject", "kernel_layouts", "SUFFIX"]

#: Name suffix of the injected adapter entry next to a kernel.
SUFFIX = "@adapter"


def _param_name(module) -> str | None:
    if isinstance(module, nn.Embed):
        return "embedding"
    if isinstance(module, (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv)):
        return "kernel"
    return None


def _kind(module, method_name: str) -> str | None:
    if isinstance(module, nn.Embed):
        return {"__call__": "lookup", "attend": "attend"}.get(method_name)
    if isinstance(module, (nn.Dense, nn.DenseGeneral, nn.Einsum)) and method_name == "__call__":
        return "linear"
    if isinstance(module, nn.Conv) and method_name == "__call__":
        return "conv"
    return None


def _first_arg(args, kwargs, name):
    return args[0] if args else kwargs[name]


def _bias(module):
    if getattr(module, "use_bias", False) and module.has_variable("params", "bias"):
        return nn.meta.unbox(module.get_variable("params", "bias"))
    return None


#: The layer families this bridge adapts directly (:func:`lrj.sites.build`).
_FAMILIES = (
    (nn.Embed, "embed"), (nn.Dense, "dense"), (nn.DenseGeneral, "dense_general"),
    (nn.Einsum, "einsum"), (nn.Conv, "conv"),
)


def _family(module) -> str:
    return sites.family_of(module, _FAMILIES)


def _site_input(module, kind: str, args, kwargs, kernel):
    """``(x, site, out_perm)`` of a layer call (see :func:`lrj.sites.build`)."""
    family = _family(module)
    x = _first_arg(args, kwargs, {"lookup": "inputs", "attend": "query"}.get(kind, "inputs"))
    if family == "embed":
        return sites.build(family, kind, x, kernel, dtype=getattr(module, "dtype", None))
    einsum_str = None
    if family == "einsum":
        einsum_str = module.einsum_str if module.einsum_str is not None else (args[1] if len(args) > 1 else kwargs["einsum_str"])
    return sites.build(
        family, kind, x, kernel, dtype=getattr(module, "dtype", None), bias=_bias(module),
        axis=getattr(module, "axis", None), batch_axes=getattr(module, "batch_dims", ()), einsum_str=einsum_str,
        window=sites.ConvWindow.of(module) if family == "conv" else None,
    )


def _call_dense(module, method_name: str, args, kwargs, name: str, kernel):
    """Runs the layer's own method on a dequantised copy of its kernel (exact Flax semantics)."""
    params = {k: v for k, v in module.variables["params"].items() if not k.endswith(SUFFIX)}
    params[name] = kernel
    return module.clone(parent=None).apply({"params": params}, *args, method=method_name, **kwargs)


def _with_collection(variables, adapter_params):
    """``(variables, adapter_params, bare)``: bare params (no ``"params"`` collection) wrapped as
    ``{"params": params}``, and the adapter tree made for them (paths without ``"params/"``) with them."""
    if not isinstance(variables, Mapping) or "params" in variables:
        return variables, adapter_params, False
    if adapter_params is not None and isinstance(adapter_params, Mapping) and "params" not in adapter_params:
        shared = tree_lib.shared_of(adapter_params)
        adapter_params = {"params": {k: v for k, v in adapter_params.items() if k != tree_lib.SHARED}}
        if shared:
            adapter_params[tree_lib.SHARED] = shared  # shared leaves stay at the root
    return {"params": variables}, adapter_params, True


def _own_targets(module) -> list[str]:
    """Names of the module's own params (not its children's) that carry injected adapter leaves."""
    if not module.has_variable("params", "") and not module.variables.get("params"):
        return []
    return [k.removesuffix(SUFFIX) for k in module.variables.get("params", {}) if k.endswith(SUFFIX)]


def _adapt_unknown_layer(module, method_name: str, args, kwargs, own: list[str], adapter, executed, strip: str,
                         shared: dict, call_args: dict, sown: set | None = None):
    """A layer the bridge does not know that owns a target: adapted at the contraction consuming its
    kernel (:mod:`lrj.contractions`), or refused naming the target."""
    path = "/".join(("params", *module.scope.path, own[0]))
    if len(own) > 1:
        raise NotImplementedError(
            f"{type(module).__name__} at {'/'.join(module.scope.path)!r} owns several adapter targets {own}; the "
            f"bridge adapts one kernel per layer it does not know: target them in separate layers, or only one")
    name = own[0]
    kernel = nn.meta.unbox(module.get_variable("params", name))
    if tree_lib.is_quantized(kernel):
        kernel = kernel.dequantize(getattr(module, "dtype", None) or kernel.dtype)
    injected = dict(module.get_variable("params", name + SUFFIX))
    leaves = {**{k: v for k, v in injected.items() if k != "dropout_key"}, **shared}
    variables = {col: {k: v for k, v in tree.items() if not k.endswith(SUFFIX)} for col, tree in module.variables.items()}

    def call(k, *a, **kw):
        with_kernel = {**variables, "params": {**variables["params"], name: k}}
        return module.clone(parent=None).apply(with_kernel, *a, method=method_name, **kw)

    def adapted(site, x, y):
        out = adapter.apply(leaves, site, x, y, path=path.removeprefix(strip) if strip else path,
                            dropout_key=injected.get("dropout_key"), **call_args)
        return _sow_aux(module, name, out, sown)

    out, contracted = contractions.adapt_contractions(call, kernel, args, kwargs, adapted, path)
    if contracted and executed is not None:
        executed.add(path)
    return out


def _sow_aux(module, name: str, out, sown: set | None = None):
    """The layer output of an adapter's ``apply``; its ``base.WithAux`` values are sown into the collection
    ``base.AUX_COLLECTION`` under the target's path (kept only when that collection is mutable; the paths
    of all such values are added to ``sown``)."""
    y, aux = base.split_aux(out)
    if aux is not None:
        module.sow(base.AUX_COLLECTION, name, aux)
        if sown is not None:
            sown.add("/".join((*module.scope.path, name)))
    return y


def _check_aux_returned(sown: set, result) -> None:
    """Raises naming the sown aux values that ``model.apply`` did not return (an ``nn.scan`` whose
    ``variable_axes`` lack the collection drops them silently)."""
    collection = result[1].get(base.AUX_COLLECTION, {}) if isinstance(result, tuple) and len(result) == 2 else {}
    returned = {path for _, path, _ in tree_lib.flatten_with_paths(collection)}
    lost = sorted(p for p in sown if not any(r == p or r.startswith(p + "/") for r in returned))
    if lost:
        raise ValueError(
            f"auxiliary adapter outputs of {lost[:8]} were sown into {base.AUX_COLLECTION!r} but not returned: give the "
            f"nn.scan around them variable_axes={{..., {base.AUX_COLLECTION!r}: 0}} (or drop it from `mutable`)")


def _interceptor(adapter: base.Adapter | None, executed: set | None = None, strip: str = "", shared=None,
                 call_args=None, sown: set | None = None):
    call_args = call_args or {}

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        kind = _kind(module, context.method_name)
        if kind is None:
            # a known layer's helper methods (Einsum's bias-shape inference...) are not calls of the layer
            unknown = adapter is not None and _param_name(module) is None and (context.method_name == "__call__" or not context.method_name.startswith("_"))
            own = _own_targets(module) if unknown and context.method_name != "setup" else []
            if not own:
                return next_fun(*args, **kwargs)
            return _adapt_unknown_layer(module, context.method_name, args, kwargs, own, adapter, executed, strip,
                                        shared or {}, call_args, sown)
        name = _param_name(module)
        if not module.has_variable("params", name):  # module.init: nothing to adapt yet
            return next_fun(*args, **kwargs)
        kernel = nn.meta.unbox(module.get_variable("params", name))
        adapted = adapter is not None and module.has_variable("params", name + SUFFIX)
        if tree_lib.is_quantized(kernel):
            # Dequantise inside the call, in the compute dtype: under remat it is recomputed, never stored.
            kernel = kernel.dequantize(module.dtype or kernel.dtype)
            y = _call_dense(module, context.method_name, args, kwargs, name, kernel)
        elif not adapted:
            return next_fun(*args, **kwargs)
        else:
            y = next_fun(*args, **kwargs)
        if not adapted:
            return y
        injected = dict(module.get_variable("params", name + SUFFIX))
        x, site, out_perm = _site_input(module, kind, args, kwargs, kernel)
        leaves = {**{k: v for k, v in injected.items() if k in adapter.leaf_names}, **(shared or {})}
        path = "/".join(("params", *module.scope.path, name))
        if executed is not None:
            executed.add(path)
        path = path.removeprefix(strip) if strip else path
        if out_perm is not None:
            y = jnp.transpose(y, tuple(sorted(range(len(out_perm)), key=out_perm.__getitem__)))
        y = adapter.apply(leaves, site, x, y, path=path, dropout_key=injected.get("dropout_key"), **call_args)
        y = _sow_aux(module, name, y, sown)
        return y if out_perm is None else jnp.transpose(y, out_perm)

    return intercept


def _check_substituted(variables, substituted: dict) -> None:
    have = {keys for keys, _, _ in tree_lib.flatten_with_paths(variables)}
    missing = [tree_lib.path_str(k) for k in substituted if k not in have]
    if missing:
        raise ValueError(f"trained base leaves {missing} are not parameters of this model (is this adapter from another model?)")


def inject(adapter: base.Adapter, variables, adapter_params, *, dropout_rng=None):
    """``variables`` with each target's adapter leaves placed next to its kernel, and trained
    base leaves (role ``("param",)``, :func:`lrj.full_finetune`) in place of their parameters.

    ``variables`` is what ``model.init`` returns (``{"params": ...}``); the input
    trees are not modified. With a ``dropout_rng``, each target also gets its own
    dropout keys, one per stacked (scanned) layer.
    """
    adapter_params, substituted = base.substitutions(adapter, adapter_params)
    if substituted:
        _check_substituted(variables, substituted)
        variables = base.replace_leaves(variables, substituted)
    entries = {}
    targets = base.resolve_targets(adapter_params, variables, adapter.leaf_names)
    for i, (keys, path, kernel, leaves) in enumerate(targets):
        if keys[0] != "params":
            raise ValueError(f"adapter target {path!r} is not in the 'params' collection")
        kernel = nn.meta.unbox(kernel)
        entry = dict(leaves)
        if dropout_rng is not None and adapter.config.get("dropout", 0.0) > 0.0:
            entry["dropout_key"] = base.dropout_keys(dropout_rng, i, path, kernel, leaves, adapter)
        entries[keys[:-1] + (keys[-1] + SUFFIX,)] = entry

    def add(node, keys):
        if not isinstance(node, dict) and not hasattr(node, "items"):
            return node
        out = {k: add(v, keys + (k,)) for k, v in node.items()}
        for entry_keys, entry in entries.items():
            if entry_keys[:-1] == keys:
                out[entry_keys[-1]] = entry
        return out

    return add(variables, ())


def apply(model: nn.Module, adapter: base.Adapter, variables, adapter_params, *args,
          dropout_rng=None, **kwargs) -> Any:
    """``model.apply(variables, *args, **kwargs)`` with the adapter executed in factored form.

    Args:
      model: an unchanged linen module.
      adapter: e.g. ``lrj.lora(...)``.
      variables: what ``model.init`` returned (``{"params": ...}``, plus any other collections),
        or the bare ``params`` (``variables["params"]``).
      adapter_params: the adapter's tree (``adapter.init(key, variables)``, or
        ``adapter.init(key, params)`` for bare params, whose paths then lack ``"params/"``).
      *args, **kwargs: passed to ``model.apply`` (``method=``, ``rngs=``, ``mutable=``...), except
        the adapter's per-call inputs (names in ``adapter.call_args``, e.g. a bank's
        ``adapter_index``), which go to every site's ``adapter.apply``.
      dropout_rng: key for dropout on the adapter branch; ``None`` disables it (eval).

    Auxiliary outputs: an adapter whose ``apply`` returns ``base.WithAux`` (a mixture's router
    statistics, :func:`lowrank_jax.adapters.moe.mixlora`) has them sown into the collection
    ``base.AUX_COLLECTION`` (``"adapter_aux"``) under each target's path. Ask for it like any linen
    collection: ``y, state = lrj.linen.apply(model, adapter, params, lp, x, mutable=["adapter_aux"])``,
    then ``lowrank_jax.adapters.moe.aux_loss(state)``. Without ``mutable`` the values are dropped (flax's
    ``sow``); inside ``nn.scan`` the scan's ``variable_axes`` must include ``{"adapter_aux": 0}``
    (``nn.remat`` needs nothing); values sown but not returned (a scan without that axis) raise
    ``ValueError`` naming the targets.

    Raises:
      ValueError: naming every target the call did not execute (a layer this call does not
        use): such a target would otherwise silently get zero gradients.
      NotImplementedError: naming a target that a layer the bridge does not know uses other
        than by contracting it (see :mod:`lrj.contractions`).
    """
    call_args = base.take_call_args(adapter, kwargs)
    variables, adapter_params, bare = _with_collection(variables, adapter_params)
    injected = inject(adapter, variables, adapter_params, dropout_rng=dropout_rng)
    executed: set[str] = set()
    shared = tree_lib.shared_of(adapter_params)
    sown: set[str] = set()
    intercept = _interceptor(adapter, executed, strip="params/" if bare else "", shared=shared, call_args=call_args,
                             sown=sown)
    with nn.intercept_methods(intercept):
        out = model.apply(injected, *args, **kwargs)
    if sown and in_filter(kwargs.get("mutable", False), base.AUX_COLLECTION):
        _check_aux_returned(sown, out)
    site_params, _ = base.substitutions(adapter, adapter_params)
    targets = [path for _, path, _, _ in base.resolve_targets(site_params, variables, adapter.leaf_names)]
    missed = [path.removeprefix("params/") if bare else path for path in targets if path not in executed]
    if missed:
        # A target no supported layer call executed would get zero gradients and a merge that differs
        # from the factored output: refuse instead of a silent no-op.
        raise ValueError(
            f"adapter targets were not executed by this call: {missed[:8]}{' ...' if len(missed) > 8 else ''}. "
            f"A target whose layer this `method=` does not call, or whose kernel the layer never contracts, gets "
            f"no gradient; narrow `targets`."
        )
    return out


def apply_base(model: nn.Module, variables, *args, **kwargs) -> Any:
    """``model.apply`` on params whose kernels may be quantised (``lrj.quant``), with no adapter.

    Each quantised kernel is dequantised inside its layer call, in the layer's compute dtype.
    """
    variables, _, _ = _with_collection(variables, None)
    with nn.intercept_methods(_interceptor(None)):
        return model.apply(variables, *args, **kwargs)


def kernel_layouts(model: nn.Module, *args, method=None, **kwargs) -> dict[str, tree_lib.Layout]:
    """Discovers the :class:`lrj.Layout` of every Dense/DenseGeneral/Einsum/Conv/Embed kernel.

    Traces ``model.init`` abstractly (no FLOPs, no memory) and compares each
    layer's per-call kernel with the stored parameter: leading axes the call does
    not see are scan-stacked. Pass the result as ``lrj.lora(..., layouts=...)``.
    """
    seen: dict[str, tuple[int, int]] = {}

    def record(next_fun, a, kw, context):
        out = next_fun(*a, **kw)
        module, kind = context.module, _kind(context.module, context.method_name)
        if kind is not None:
            name = _param_name(module)
            kernel = nn.meta.unbox(module.get_variable("params", name))
            inputs = _site_input(module, kind, a, kw, kernel)[1].inputs
            seen["/".join(("params", *module.scope.path, name))] = (kernel.ndim, inputs)
        return out

    with nn.intercept_methods(record):
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, method=method, **kwargs))
    full = {p: leaf.shape for _, p, leaf in tree_lib.flatten_with_paths(nn.meta.unbox(shapes))}
    return {p: tree_lib.Layout(len(full[p]) - ndim, inputs) for p, (ndim, inputs) in seen.items() if p in full}
