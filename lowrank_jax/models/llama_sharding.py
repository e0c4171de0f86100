"""Sharding rules for :mod:`lowrank_jax.models.llama`: logical axis names mapped to mesh axes.

Every LLaMA parameter axis has a *logical* name; a table of *rules* maps each name to
mesh axes (the convention of MaxText's ``logical_axis_rules`` and levanter's
``axis_mapping``)::

    embed_tokens/embedding        [V, D]      ("vocab", "embed")     vocab-parallel embedding
    */q_proj/kernel               [D, N*H]    ("embed", "heads")     column-parallel
    */k_proj|v_proj/kernel        [D, K*H]    ("embed", "kv_heads")  column-parallel
    */o_proj/kernel               [N*H, D]    ("heads", "embed")     row-parallel
    */gate_proj|up_proj/kernel    [D, F]      ("embed", "mlp")       column-parallel
    */down_proj/kernel            [F, D]      ("mlp", "embed")       row-parallel
    lm_head/kernel                [D, V]      ("embed", "vocab")     vocab-parallel head
    */*norm/scale                 [D]         ("norm",)              replicated
    */q_proj/bias                 [N*H]       ("heads",)             as its kernel's output axis
    */k_proj|v_proj/bias          [K*H]       ("kv_heads",)          (Qwen2; LLaMA attention_bias/mlp_bias)
    */gate_proj|up_proj/bias      [F]         ("mlp",)
    */o_proj|down_proj/bias       [D]         ("norm",)              replicated (added after the reduction)
    (scanned blocks: a leading "layers" axis per stack axis, replicated)

:data:`DEFAULT_RULES`: FSDP (ZeRO-3: parameters, gradients and optimizer state
sharded) over ``fsdp`` through the ``embed`` axis, Megatron tensor parallelism
(Shoeybi et al., 2019, https://arxiv.org/abs/1909.08053) over ``tensor`` through
``heads``/``kv_heads``/``mlp``/``vocab``, and the batch over ``data`` and ``fsdp``.
Rules naming a mesh axis the mesh lacks drop it, so one table serves ``data=2``,
``fsdp=4,tensor=2`` and ``fsdp=16,tensor=4``. A sharded head axis keeps whole heads
on a device (``N`` and ``K`` must be multiples of the tensor size).

Everything else inherits from these shardings: adapters through
:func:`lowrank_jax.adapter_shardings` (``a`` takes the kernel's input spec, ``b`` its
output spec), quantised kernels (:class:`lowrank_jax.quant.QuantizedArray`: their flat
code and scale arrays are sharded over the kernel's mesh axes, ZeRO-3 style, and
gathered by the dequantisation at use), and optimizer states (AdamW moments, GaLore's
projected moments) through :func:`state_shardings`, which reads the shardings that
the optimizer's own ``init`` gives under an Explicit mesh.

Explicit meshes (``jax.make_mesh``'s default in jax 0.10) type every array's
sharding, and the model's contractions over FSDP-sharded axes cannot be typed
without per-layer annotations: :func:`auto_axes` runs a function (the loss) with
the mesh axes Auto inside, so the compiler places the collectives, while its
inputs and outputs keep their explicit types.

References: MaxText ``logical_axis_rules`` (https://github.com/AI-Hypercomputer/maxtext,
``configs/base.yml``); levanter ``axis_mapping`` (https://github.com/stanford-crfm/levanter).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lowrank_jax import tree as tree_lib
from lowrank_jax.run_config import parse_mesh  # re-exported: the mesh text is a run option, parsed without jax

__all__ = [
    "DEFAULT_RULES",
    "PARAM_AXES",
    "abstract",
    "auto_axes",
    "batch_spec",
    "divisible_batch",
    "logical_axes",
    "logical_to_spec",
    "make_mesh",
    "param_shardings",
    "parse_mesh",
    "state_shardings",
]

#: ``(logical name, mesh axes)``: FSDP over ``fsdp``, tensor parallelism over ``tensor``,
#: the batch over ``data`` and ``fsdp``; names absent here (``layers``, ``norm``) are replicated.
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", ("fsdp",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("vocab", ("tensor",)),
    ("layers", ()),
    ("norm", ()),
)

#: ``(path regex, logical axes of the unstacked leaf)``, first ``re.search`` match wins.
PARAM_AXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"(^|/)embed_tokens/embedding$", ("vocab", "embed")),
    (r"/q_proj/kernel$", ("embed", "heads")),
    (r"/(k_proj|v_proj)/kernel$", ("embed", "kv_heads")),
    (r"/o_proj/kernel$", ("heads", "embed")),
    (r"/(gate_proj|up_proj)/kernel$", ("embed", "mlp")),
    (r"/down_proj/kernel$", ("mlp", "embed")),
    (r"(^|/)lm_head/kernel$", ("embed", "vocab")),
    (r"(^|/)(input_layernorm|post_attention_layernorm|norm)/scale$", ("norm",)),
    (r"/q_proj/bias$", ("heads",)),
    (r"/(k_proj|v_proj)/bias$", ("kv_heads",)),
    (r"/(o_proj|down_proj)/bias$", ("norm",)),
    (r"/(gate_proj|up_proj)/bias$", ("mlp",)),
)

Rules = Sequence[tuple[str, Sequence[str] | str | None]]


def make_mesh(shape: Mapping[str, int] | str, *, axis_type: AxisType = AxisType.Explicit, devices=None) -> Mesh:
    """``jax.make_mesh`` from ``{"fsdp": 4, "tensor": 2}`` (or its text), checked against the device count.

    Raises:
      ValueError: the mesh's size differs from the number of devices (both named).
    """
    shape = parse_mesh(shape) if isinstance(shape, str) else dict(shape)
    devices = jax.devices() if devices is None else list(devices)
    size = math.prod(shape.values())
    if size != len(devices):
        text = ",".join(f"{k}={v}" for k, v in shape.items())
        raise ValueError(f"mesh {text} has {size} devices but {len(devices)} are available")
    return jax.make_mesh(tuple(shape.values()), tuple(shape), axis_types=(axis_type,) * len(shape), devices=devices)


def _rules_dict(rules: Rules) -> dict[str, tuple[str, ...]]:
    out = {}
    for name, axes in rules:
        out[name] = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    return out


def logical_to_spec(axes: Sequence[str | None], rules: Rules, mesh: Mesh) -> PartitionSpec:
    """The ``PartitionSpec`` of logical ``axes`` under ``rules`` on ``mesh``.

    Mesh axes the mesh lacks are dropped; a mesh axis already used by an earlier
    dimension is not reused (so ``batch`` and ``embed`` can both name ``fsdp``).
    """
    table, used, spec = _rules_dict(rules), set(), []
    for name in axes:
        mesh_axes = tuple(a for a in table.get(name, ()) if a in mesh.shape and a not in used) if name else ()
        used |= set(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def batch_spec(mesh: Mesh, rules: Rules = DEFAULT_RULES, ndim: int = 2) -> PartitionSpec:
    """Spec of a ``[B, ...]`` batch: ``B`` over the ``batch`` rule's mesh axes."""
    return logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh)


def _axes_of(path: str, ndim: int) -> tuple[str, ...]:
    for pattern, axes in PARAM_AXES:
        if re.search(pattern, path):
            if ndim < len(axes):
                raise ValueError(f"{path!r} has {ndim} axes, fewer than its logical axes {axes}")
            return ("layers",) * (ndim - len(axes)) + axes
    raise ValueError(f"no logical axes for LLaMA parameter {path!r}: it matches none of "
                     f"{[p for p, _ in PARAM_AXES]} (pass params of lowrank_jax.models.llama)")


def logical_axes(params) -> Any:
    """A tree like ``params`` of logical-axis tuples (one per leaf; a quantised kernel gets its kernel's).

    Raises:
      ValueError: a leaf whose path is not a LLaMA parameter (named).
    """
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: _axes_of(tree_lib.path_str(kp), len(tree_lib.shape_of(x))), params, is_leaf=tree_lib.is_quantized)


def _check_divides(path: str, shape, spec: PartitionSpec, mesh: Mesh, units: Mapping[int, int]) -> None:
    for dim, (size, entry) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape))):
        if entry is None:
            continue
        names = (entry,) if isinstance(entry, str) else tuple(entry)
        shards = math.prod(mesh.shape[a] for a in names)
        unit = units.get(dim, 1)
        if size % (shards * unit):
            what = f"{size // unit} heads" if unit > 1 else f"size {size}"
            raise ValueError(f"mesh axis {'x'.join(names)}={shards} does not divide axis {dim} of {path!r} "
                             f"(shape {tuple(shape)}: {what})")


def _quantized_sharding(node, spec: PartitionSpec, mesh: Mesh):
    """Shardings for a quantised node's leaves: stack axes replicated, the flat last axis over the
    kernel's mesh axes that divide it (ZeRO-3 storage; dequantisation gathers it at use)."""
    stack = len(node.batch_shape)
    kernel_axes = [a for e in tuple(spec)[stack:] if e is not None for a in ((e,) if isinstance(e, str) else e)]

    def leaf_sharding(leaf):
        shape = tuple(leaf.shape)
        if len(shape) <= stack:  # a per-slice scalar (the double-quantisation offset)
            return NamedSharding(mesh, PartitionSpec())
        axes = list(kernel_axes)
        while axes and shape[-1] % math.prod(mesh.shape[a] for a in axes):
            axes.pop()
        last = None if not axes else axes[0] if len(axes) == 1 else tuple(axes)
        return NamedSharding(mesh, PartitionSpec(*([None] * (len(shape) - 1)), last))

    return jax.tree.map(leaf_sharding, node)


def param_shardings(params, mesh: Mesh, rules: Rules = DEFAULT_RULES, *, config=None, dense: bool = False) -> Any:
    """``NamedSharding``s for LLaMA ``params`` (arrays, ``ShapeDtypeStruct``s or quantised nodes).

    Args:
      params: the params tree (bare or ``{"params": ...}``; scanned or per-layer).
      mesh: the mesh (Explicit or Auto axes).
      rules: ``(logical name, mesh axes)`` pairs, e.g. :data:`DEFAULT_RULES`.
      config: the model's :class:`~lowrank_jax.models.llama.LlamaConfig`; with it a sharded
        head axis must split into whole heads (``N``, ``K`` multiples of its mesh size).

    Returns:
      A tree like ``params``; a quantised node maps to a node of the same type whose leaves
      are ``NamedSharding``s, or with ``dense=True`` to the sharding of the dense kernel it
      stands for (what :func:`lowrank_jax.adapter_shardings` takes as ``shardings=``).

    Raises:
      ValueError: an unknown parameter path, or a mesh axis that does not divide the
        dimension it shards (the path, axis and size named).
    """
    head_dim = config.resolved_head_dim if config is not None else 1

    def one(kp, x):
        path = tree_lib.path_str(kp)
        shape = tree_lib.shape_of(x)  # a quantised node's stack axes in front
        axes = _axes_of(path, len(shape))
        spec = logical_to_spec(axes, rules, mesh)
        units = {d: head_dim for d, name in enumerate(axes) if name in ("heads", "kv_heads")}
        _check_divides(path, shape, spec, mesh, units)
        if tree_lib.is_quantized(x) and not dense:
            return _quantized_sharding(x, spec, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=tree_lib.is_quantized)


def abstract(tree, shardings) -> Any:
    """``jax.ShapeDtypeStruct``s of ``tree``'s leaves carrying ``shardings`` (a matching tree): inputs
    for ``jit(...).lower`` with nothing allocated."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def state_shardings(init, trainable, mesh: Mesh) -> Any:
    """Shardings of ``init(trainable)`` (an optimizer state), inherited from ``trainable``'s.

    ``init`` is traced abstractly (``jax.eval_shape``) under ``mesh`` with Explicit axes, so
    every state leaf gets the sharding the optimizer gives it from the parameters' types
    (AdamW's moments the parameter's, GaLore's projected moments the kept side's, counts
    replicated). Works for an Auto ``mesh`` too: the specs are moved onto it.

    Args:
      init: ``optimizer.init``.
      trainable: the trainable tree as arrays or ``ShapeDtypeStruct``s with ``NamedSharding``s.
      mesh: the mesh the result refers to.
    """
    explicit = jax.sharding.AbstractMesh(tuple(mesh.shape.values()), tuple(mesh.shape),
                                         axis_types=(AxisType.Explicit,) * len(mesh.shape))
    typed = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=NamedSharding(explicit, x.sharding.spec)), trainable)
    with jax.sharding.use_abstract_mesh(explicit):
        shapes = jax.eval_shape(init, typed)

    def on_mesh(x):
        sharding = getattr(x, "sharding", None)
        spec = sharding.spec if isinstance(sharding, NamedSharding) else PartitionSpec()
        return NamedSharding(mesh, spec)

    return jax.tree.map(on_mesh, shapes)


def auto_axes(fn, out_spec: PartitionSpec | Any = PartitionSpec()):
    """``fn`` run with the mesh's axes Auto inside when the current mesh is Explicit, else ``fn``.

    Wrap a loss (``out_spec`` default: a replicated scalar) so that an FSDP/tensor-parallel
    model compiles under an Explicit mesh: inside, the compiler propagates the inputs'
    shardings and places the all-gathers and reduce-scatters. Differentiable.
    """
    def wrapped(*args, **kwargs):
        mesh = jax.sharding.get_abstract_mesh()
        if not mesh.axis_names or AxisType.Explicit not in tuple(mesh.axis_types):
            return fn(*args, **kwargs)
        return jax.sharding.auto_axes(lambda a, k: fn(*a, **k), out_sharding=out_spec)(args, kwargs)

    return wrapped


def divisible_batch(batch: int, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> None:
    """ValueError when the batch axes' mesh size does not divide ``batch``."""
    spec = batch_spec(mesh, rules, 1)
    entry = spec[0]
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    shards = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    if batch % shards:
        raise ValueError(f"batch {batch} is not divisible by the batch mesh axes "
                         f"{'x'.join(names)}={shards}")
