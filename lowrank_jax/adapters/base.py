"""What every adapter is (a NamedTuple of pure functions) and what a bridge hands it.

Bridges (``lrj.linen``, ``lrj.nnx``) find the calls of linear layers inside an
unchanged model and describe each as a :class:`Site`; the adapter's ``apply``
turns the layer's output ``y = f(x; W)`` into the adapted output, computing the
low-rank part in factored form with :func:`low_rank`, never the dense ``s B A``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowrank_jax import tree as tree_lib
from lowrank_jax.mesh_ops import contract, match_sharding, replicated  # noqa: F401  (adapters call base.contract...)

__all__ = ["AUX_COLLECTION", "Adapter", "Leaf", "Site", "WithAux", "low_rank", "dropout", "split", "join", "freeze",
           "split_aux", "take_call_args"]


class Site(NamedTuple):
    """A call of a linear layer, as an adapter sees it.

    kind:
      ``"linear"``: ``x``'s trailing ``inputs`` axes contract with the kernel's leading
        ``inputs`` axes (Dense, DenseGeneral, Einsum, after the bridge moved the
        contracting axes of ``x`` last, in kernel order);
      ``"lookup"``: ``x`` holds integer ids into the kernel's rows (Embed);
      ``"attend"``: ``x`` contracts with the kernel's output axis (``Embed.attend``,
        the tied output head: ``y = x E^T``);
      ``"conv"``: ``x`` is convolved with the kernel ``[*window, in, out]`` (Conv); the
        window and ``in`` are the ``inputs`` axes, so ``a: [*window, in, r]``, ``b: [r, out]``.
    kernel: the per-call kernel, ``[*inputs, *outputs]`` (scan axes already sliced off).
    inputs: number of input axes of ``kernel``.
    dtype: the layer's compute dtype, or ``None`` to promote the operands.
    bias: the layer's bias with its axes in kernel output order, or ``None``
      (DoRA rescales the output without it).
    conv: for ``kind == "conv"`` (``x`` convolved with a kernel ``[*window, in, out]``):
      ``conv(x, k) -> y``, the layer's convolution with another kernel ``k: [*window, in, n]``
      (same window, strides, padding, dilations).
    """

    kind: str
    kernel: Any
    inputs: int
    dtype: Any = None
    bias: Any = None
    conv: Callable | None = None


class Adapter(NamedTuple):
    """A parameter-efficient method as pure functions (see ``lrj.lora``).

    init(key, params) -> adapter_params: one tree holding the adapter's trainable leaves and
      frozen state (see ``roles``), mirroring the targeted paths of ``params``; :func:`split`
      separates the two. ``params`` may be bare or ``{"params": ...}``.
    apply(leaves, site, x, y, *, path, dropout_key=None) -> y': the adapted output of
      one layer call; bridges call it, users rarely do. It may return :class:`WithAux` ``(y', aux)``
      instead: the bridges deliver ``aux`` through the model call (:data:`AUX_COLLECTION`).
    merge(params, adapter_params) -> params: the dense weights ``W + delta`` (inference, export).
    unmerge(params, adapter_params) -> params: the inverse of ``merge``.
    penalty(params, adapter_params) -> scalar: the method's regulariser before its weight.
    leaf_names: names of the leaves under each target (``{"a", "b"}`` for LoRA).
    config: the hyper-parameters, for summaries and checkpoints.
    roles: ``{leaf name: Leaf(axes, trainable)}`` (:class:`Leaf`): what each leaf's axes are
      and whether it is trained. LoRA: ``a = Leaf(("stack", "in", "rank"))``,
      ``b = Leaf(("stack", "rank", "out"))``; DoRA adds ``m = Leaf(("stack", "out"))``.
      Sharding, dropout keys, :func:`split`, summaries and export derive from these
      roles, not from leaf names.
    layouts: the ``layouts`` the adapter was made with (``{path: Layout}`` or a callable); they
      settle a target's layout where its leaves fit several (IA3's stacked ``[L, in]`` vector).
    call_args: names of per-call inputs ``apply`` takes as keyword arguments (a mixed batch's
      ``adapter_index``). The bridges take them from the keyword arguments of their ``apply``
      (``lrj.linen.apply(model, bank, params, bank_params, x, adapter_index=ids)``), hand them to
      every site's ``apply`` unchanged, and pass the rest to the model.
    """

    init: Callable
    apply: Callable
    merge: Callable
    unmerge: Callable
    penalty: Callable
    leaf_names: frozenset
    config: dict
    roles: dict | None = None
    layouts: Any = None
    call_args: frozenset = frozenset()


#: Name of the linen collection (``model.apply(..., mutable=[AUX_COLLECTION])``) and of the top key of
#: the tree ``lrj.nnx.apply(..., with_aux=True)`` returns, that carry the adapters' auxiliary outputs.
AUX_COLLECTION = "adapter_aux"


class WithAux(NamedTuple):
    """An adapter ``apply``'s output ``y`` with auxiliary values ``aux`` (any pytree: router statistics...).

    The bridges return ``y`` to the layer's caller and deliver ``aux`` through the same call that
    returns the model output, never a global: linen sows it into the collection
    :data:`AUX_COLLECTION` (returned when it is ``mutable``; give ``nn.scan`` ``variable_axes``
    ``{AUX_COLLECTION: 0}`` to stack it over layers), NNX sows an ``lrj.nnx.AdapterAux`` variable
    (returned with ``with_aux=True``). Either way the tree mirrors the target paths, e.g.
    ``{"adapter_aux": {"layers_0": {"up": {"kernel": (aux,)}}}}`` (a tuple: one entry per call).
    Adapters that return plain arrays are unaffected.
    """

    y: Any
    aux: Any


def split_aux(out) -> tuple[Any, Any]:
    """``(y, aux)`` from what an adapter's ``apply`` returned; ``aux`` is ``None`` for a plain array."""
    return (out.y, out.aux) if isinstance(out, WithAux) else (out, None)


class Leaf(NamedTuple):
    """What one adapter leaf is: the role of each of its axes, and whether training updates it.

    axes: a pattern over the target kernel's layout ``[*stack, *inputs, *outputs]``:
      ``"stack"``, ``"in"`` and ``"out"`` each stand for all of the kernel's axes of that
      kind, ``"param"`` for all of the parameter's axes (a leaf that *is* the parameter,
      trained in its place: :func:`lrj.full_finetune`); any other name (``"rank"``,
      ``"expert"``...) is one adapter-only axis, never sharded. LoRA's ``a`` is
      ``("stack", "in", "rank")``.
    trainable: ``False`` for frozen adapter state (VeRA's shared projections, LaMDA's
      frozen A, LoRA-FA's A after :func:`lrj.freeze`): :func:`lrj.split` puts it apart,
      and no gradient is computed for it.
    shared: one array for all targets, stored once at the adapter tree's root under
      ``lrj.tree.SHARED`` (VeRA's projections); the bridges hand it to every target's
      ``apply`` next to the target's own leaves (never sliced by ``scan``). Its axes are
      adapter-only, so it is replicated when sharded.
    """

    axes: tuple
    trainable: bool = True
    shared: bool = False


#: The leaves of LoRA (also DoRA's ``a`` and ``b``); see :attr:`Adapter.roles`.
LORA_ROLES = {"a": Leaf(("stack", "in", "rank")), "b": Leaf(("stack", "rank", "out"))}


def leaf_axes(pattern, layout: tree_lib.Layout, kernel_ndim: int) -> tuple[str, ...]:
    """The role of each axis of a leaf: ``pattern`` (a :class:`Leaf` or its ``axes``) with
    ``"stack"``/``"in"``/``"out"`` expanded to as many axes as the kernel's layout has of each kind.

    >>> leaf_axes(("stack", "in", "rank"), tree_lib.Layout(1, 2), 4)
    ('stack', 'in', 'in', 'rank')
    """
    pattern = _pattern(pattern)
    counts = {"stack": layout.stack, "in": layout.inputs, "out": kernel_ndim - layout.stack - layout.inputs,
              "param": kernel_ndim}
    out: list[str] = []
    for role in pattern:
        out.extend([role] * counts.get(role, 1))
    return tuple(out)


def roles_of(adapter: Adapter) -> dict[str, Leaf]:
    """``adapter.roles`` as :class:`Leaf` values; raises naming the adapter when it declares none."""
    if not adapter.roles:
        raise ValueError(
            f"adapter {adapter.config.get('method', '?')!r} declares no leaf roles (`Adapter.roles`); "
            f"each of its leaves {sorted(adapter.leaf_names)} needs a lrj.Leaf(axes, trainable)"
        )
    out = {n: (r if isinstance(r, Leaf) else Leaf(tuple(r))) for n, r in adapter.roles.items()}
    undeclared = sorted(set(adapter.leaf_names) - set(out))
    if undeclared:
        raise ValueError(f"adapter {adapter.config.get('method', '?')!r} declares no roles for leaves {undeclared}")
    return out


def layout_of(path: str, kernel_shape, leaves: dict, roles: dict, layouts=None) -> tree_lib.Layout:
    """The kernel layout that every leaf's shape fits, given the leaves' axis roles.

    Each leaf of a target must have, on each ``"stack"``/``"in"``/``"out"`` axis of its
    pattern, the size of the kernel's axis of that role. Raises ``ValueError`` naming
    ``path`` when no layout fits (an adapter from another model) or several do.
    """
    kernel_shape = tuple(kernel_shape)
    ndim = len(kernel_shape)
    candidates = [tree_lib.Layout(s, i) for s in range(ndim - 1) for i in range(1, ndim - s)]
    if all(_pattern(roles[name]) == ("param",) for name in leaves):
        candidates = [tree_lib.Layout(0, 0)]  # the leaves are the parameter itself: no split needed
    fits = []
    for layout in candidates:
        by_role = role_dims(layout, kernel_shape)
        if all(_fits(_shape(leaf), leaf_axes(roles[name], layout, ndim), by_role) for name, leaf in leaves.items()):
            fits.append(layout)
    if len(fits) == 1:
        return fits[0]
    given = tree_lib.given_layout(layouts, path)
    if given is not None and given in fits:
        return given
    shapes = {n: _shape(v) for n, v in leaves.items()}
    patterns = {n: _pattern(roles[n]) for n in leaves}
    if not fits:
        raise ValueError(
            f"adapter leaves for {path!r} do not fit the parameter: kernel {kernel_shape}, leaves {shapes} "
            f"(expected {patterns} over [*stack, *inputs, *outputs]); is this adapter from another model?"
        )
    raise ValueError(f"adapter leaves {shapes} for {path!r} fit several layouts of kernel {kernel_shape}: {fits}; "
                     f"make the adapter with `layouts=` (lrj.linen.kernel_layouts) to settle it")


def role_dims(layout: tree_lib.Layout, kernel_axes) -> dict:
    """``{role: the kernel's entries (sizes, specs) of that role}``: stack, in, out, and
    ``"param"`` for all of them in order (a leaf that is the parameter itself)."""
    kernel_axes = tuple(kernel_axes)
    return {**dict(zip(("stack", "in", "out"), layout.split(kernel_axes))), "param": kernel_axes}


def _pattern(role) -> tuple:
    return role.axes if isinstance(role, Leaf) else tuple(role)


def _shape(leaf) -> tuple:
    return tuple(leaf.shape) if hasattr(leaf, "shape") else tuple(np.shape(leaf))


def _fits(shape, axes, by_role) -> bool:
    if len(shape) != len(axes):
        return False
    taken = dict.fromkeys(by_role, 0)
    for size, role in zip(shape, axes):
        if role in by_role:
            if size != by_role[role][taken[role]]:
                return False
            taken[role] += 1
    return True


def substitutions(adapter: Adapter, adapter_params) -> tuple[Any, dict]:
    """``(site_params, {keys: value})``: the adapter tree without the targets whose leaf *is* the
    parameter (role ``("param",)``, :func:`lrj.full_finetune`), and those leaves by their
    parameter's key path, which the bridges put in place of the parameter before the call."""
    if not adapter.roles:
        return adapter_params, {}
    roles = roles_of(adapter)
    sites, subs = {}, {}
    for keys, leaves in tree_lib.adapter_paths(adapter_params, adapter.leaf_names):
        whole = [n for n in leaves if _pattern(roles[n]) == ("param",)]
        if not whole:
            sites[keys] = leaves
        elif len(whole) == 1 and len(leaves) == 1:
            subs[keys] = leaves[whole[0]]
        else:
            raise ValueError(f"{tree_lib.path_str(keys)!r}: a leaf that is the parameter itself ({whole}) cannot "
                             f"share its target with other leaves ({sorted(leaves)})")
    if not subs:
        return adapter_params, {}
    sites = tree_lib.nest(sites)
    if tree_lib.shared_of(adapter_params):
        sites[tree_lib.SHARED] = tree_lib.shared_of(adapter_params)
    return sites, subs


def frozen_names(adapter: Adapter) -> frozenset:
    """Names of the adapter's frozen leaves (no roles declared: none)."""
    if not adapter.roles:
        return frozenset()
    return frozenset(n for n, leaf in roles_of(adapter).items() if not leaf.trainable)


def freeze(adapter: Adapter, names) -> Adapter:
    """``adapter`` with the leaves ``names`` frozen: initialised as before, never trained.

    ``lrj.freeze(lrj.lora(...), {"a"})`` is LoRA-FA's adapter (A stays at its random
    init): with :func:`split` (``lrj.make_train_step(adapter=...)`` does it) no gradient
    of ``a`` is computed, which saves the FLOPs of ``dL/da`` and the activations they
    need, rather than computing and discarding it.
    """
    names = frozenset([names] if isinstance(names, str) else names)
    roles = roles_of(adapter)
    unknown = sorted(names - set(roles))
    if unknown:
        raise ValueError(f"cannot freeze {unknown}: adapter {adapter.config.get('method', '?')!r} has leaves {sorted(roles)}")
    roles = {n: leaf._replace(trainable=leaf.trainable and n not in names) for n, leaf in roles.items()}
    frozen = sorted(n for n, leaf in roles.items() if not leaf.trainable)
    return adapter._replace(roles=roles, config={**adapter.config, "frozen": frozen})


def split(adapter: Adapter, adapter_params) -> tuple[dict, dict]:
    """``(trainable, frozen)``: the adapter tree's leaves by their declared :attr:`Leaf.trainable`.

    Both mirror ``adapter_params``' target paths; a target with no leaf of a kind is absent
    from that tree. Differentiate w.r.t. ``trainable`` only (``lrj.make_train_step`` does), so no
    gradient of frozen state is ever computed; :func:`join` rebuilds the whole tree.
    """
    frozen = frozen_names(adapter)
    trainable_out, frozen_out = {}, {}
    for keys, leaves in tree_lib.adapter_paths(adapter_params, adapter.leaf_names):
        t = {n: v for n, v in leaves.items() if n not in frozen}
        f = {n: v for n, v in leaves.items() if n in frozen}
        if t:
            trainable_out[keys] = t
        if f:
            frozen_out[keys] = f
    trainable_out, frozen_out = tree_lib.nest(trainable_out), tree_lib.nest(frozen_out)
    shared = tree_lib.shared_of(adapter_params)
    for part, want_frozen in ((trainable_out, False), (frozen_out, True)):
        picked = {n: v for n, v in shared.items() if (n in frozen) == want_frozen}
        if picked:
            part[tree_lib.SHARED] = picked
    return trainable_out, frozen_out


def join(adapter: Adapter, trainable, frozen):
    """The whole adapter tree from :func:`split`'s two parts.

    Raises ``ValueError`` naming the leaf when one is in both parts, or in the part its
    declared role does not belong to (a tree split for another adapter).
    """
    frozen_leaves = frozen_names(adapter)
    for part, tree, want_frozen in (("trainable", trainable, False), ("frozen", frozen, True)):
        for keys, leaves in tree_lib.adapter_paths(tree or {}, adapter.leaf_names):
            wrong = sorted(n for n in leaves if (n in frozen_leaves) != want_frozen)
            if wrong:
                raise ValueError(f"leaves {wrong} at {tree_lib.path_str(keys)!r} are in the {part} tree, but the adapter "
                                 f"declares them {'trainable' if want_frozen else 'frozen'}")

    return tree_lib.merge_trees(trainable, frozen)


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
    if site.kind == "conv":  # peft's Conv LoRA: a is a conv with r outputs and the layer's window, b a 1x1 conv
        t = site.conv(x, a) * s
        return contract(t, b, 1)
    if site.kind != "linear":
        raise ValueError(f"unknown site kind {site.kind!r}")
    if site.inputs == 1 and a.ndim == 2 and b.ndim == 2 and isinstance(scale, (int, float)):
        from lowrank_jax.factored import lora_linear  # its VJP keeps the large cotangent untransposed

        return lora_linear(x, a, b, scale)
    t = contract(x, a, site.inputs) * s
    return contract(t, b, 1)


def dropout_keys(rng, index: int, path: str, kernel, leaves: dict, adapter: Adapter):
    """The dropout key(s) of target number ``index``: one per stacked (scanned) layer, so that
    ``nn.scan``/``nnx.scan`` slice them with the kernel; the stack comes from the leaves' roles."""
    roles = roles_of(adapter) if adapter.roles else LORA_ROLES
    layout = layout_of(path, tree_lib.shape_of(kernel), leaves, roles, adapter.layouts)
    stack = tuple(tree_lib.shape_of(kernel)[: layout.stack])
    key = jax.random.fold_in(rng, index)
    return jax.random.split(key, tree_lib.prod(stack)).reshape(stack) if stack else key


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


def additive_merge(deltas: Callable) -> tuple[Callable, Callable]:
    """``(merge, unmerge)`` of a method whose update adds to the kernel: ``W +- delta``.

    ``deltas(params, adapter_params) -> {key path: (kernel, dense fp32 delta)}``; the result is
    cast back to each kernel's dtype, quantised kernels are dequantised first.
    """

    def shifted(params, adapter_params, sign: float):
        new = {k: (dense(w) + sign * d).astype(w.dtype) for k, (w, d) in deltas(params, adapter_params).items()}
        return replace_leaves(params, new)

    return (lambda params, adapter_params: shifted(params, adapter_params, 1.0),
            lambda params, adapter_params: shifted(params, adapter_params, -1.0))


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


def take_call_args(adapter: Adapter | None, kwargs: dict) -> dict:
    """The per-call adapter inputs (:attr:`Adapter.call_args`) removed from a bridge's ``kwargs``
    (which keeps the model's own keyword arguments)."""
    names = adapter.call_args if adapter is not None else frozenset()
    return {name: kwargs.pop(name) for name in list(kwargs) if name in names}
