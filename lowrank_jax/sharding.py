"""Adapter shardings inherited from the base kernels' shardings.

Rule (``kernel: [*stack, *inputs, *outputs]`` with spec ``(S..., I..., O...)``):
``a: [*stack, *inputs, r]`` gets ``(S..., I..., None)`` and
``b: [*stack, r, *outputs]`` gets ``(S..., None, O...)``. The rank axis is never
sharded (it is small), so ``x @ a`` needs the same collective as ``x @ W`` over
the input axes, and ``(x a) @ b`` produces the same output sharding as ``x @ W``.
In general each leaf axis takes the spec of the kernel axis whose role it has
(:attr:`lrj.Adapter.roles`): stack, input and output axes inherit, rank axes are replicated.
Adapter-only axes (``"rank"``, ``"expert"``...) are replicated unless ``adapter_axes`` maps their
role to a mesh axis: ``adapter_axes={"expert": "expert"}`` shards a mixture's experts
(``lowrank_jax.adapters.moe``) over the mesh axis ``"expert"``, expert parallelism.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
from jax.sharding import NamedSharding, PartitionSpec

from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import base
from lowrank_jax.mesh_ops import _mesh_axes

__all__ = ["adapter_shardings"]


def _spec_of(sharding, ndim: int) -> tuple:
    spec = tuple(sharding.spec)
    return spec + (None,) * (ndim - len(spec))


def _check_adapter_axes(adapter_axes: Mapping, roles: dict) -> None:
    """Each key of ``adapter_axes`` is an adapter-only axis role some leaf has (a typo would silently replicate)."""
    kernel_roles = {"stack", "in", "out", "param"}
    have = sorted({r for leaf in roles.values() for r in base._pattern(leaf) if r not in kernel_roles})
    for role in adapter_axes:
        if role in kernel_roles:
            raise ValueError(f"`adapter_axes` maps {role!r}, a kernel axis role: those inherit the kernel's spec")
        if role not in have:
            raise ValueError(f"`adapter_axes` maps {role!r}, which no leaf of the adapter has; its adapter-only axes are {have}")


def adapter_shardings(params, adapter_params, shardings=None, *, adapter: base.Adapter | None = None,
                      adapter_axes: Mapping[str, str | tuple | None] | None = None):
    """A tree of shardings for ``adapter_params`` (arrays or ``jax.ShapeDtypeStruct``s).

    Args:
      params: the base params; leaves are arrays or ``ShapeDtypeStruct``s carrying
        ``.sharding``, unless ``shardings`` is given.
      adapter_params: the adapter tree (or ``jax.eval_shape(adapter.init, key, params)``).
      shardings: optional tree of ``NamedSharding`` matching ``params``.
      adapter: the adapter that made ``adapter_params``; its :attr:`~lrj.Adapter.roles` say what
        each leaf's axes are. Default: LoRA's roles plus ``m = ("stack", "out")`` (DoRA).
      adapter_axes: ``{adapter-only axis role: mesh axis (or tuple of them)}``, e.g. ``{"expert": "expert"}``
        for expert parallelism; unmapped adapter-only axes are replicated. Raises ``ValueError`` naming the
        role when no leaf has it, the mesh lacks the axis, the axis does not divide the leaf's size, or
        the leaf's spec already uses that mesh axis.

    Returns:
      A tree like ``adapter_params`` of ``NamedSharding`` (or the kernel's own
      sharding when it is not a ``NamedSharding``, e.g. a single device).
    """
    flat_shardings = None
    if shardings is not None:
        flat_shardings = {
            keys: s for keys, _, s in tree_lib.flatten_with_paths(shardings)
        } if not isinstance(shardings, NamedSharding) else None
    names = frozenset(
        tree_lib._key_name(kp[-1]) for kp, _ in jax.tree_util.tree_flatten_with_path(adapter_params)[0]
    )
    roles = base.roles_of(adapter) if adapter is not None else {**base.LORA_ROLES, "m": base.Leaf(("stack", "out"))}
    adapter_axes = dict(adapter_axes or {})
    _check_adapter_axes(adapter_axes, roles)
    out = {}
    for keys, path, kernel, leaves in base.resolve_targets(adapter_params, params, names):
        if isinstance(shardings, NamedSharding):
            sharding = shardings
        elif flat_shardings is not None:
            sharding = flat_shardings[keys]
        else:
            sharding = getattr(kernel, "sharding", None)
        if sharding is None:
            raise ValueError(f"no sharding for {path!r}: pass arrays/ShapeDtypeStructs with shardings or `shardings=`")
        undeclared = sorted(set(leaves) - set(roles))
        if undeclared and isinstance(sharding, NamedSharding):
            raise ValueError(f"no axis roles declared for adapter leaf {undeclared[0]!r} at {path!r}; "
                             f"pass the adapter (`adapter=`) whose `roles` declare it")
        hint = adapter.layouts if adapter is not None else None
        layout = base.layout_of(path, tree_lib.shape_of(kernel), leaves, roles, hint) if not undeclared else None
        ndim = len(tree_lib.shape_of(kernel))
        entry = {}
        for name in leaves:
            if not isinstance(sharding, NamedSharding):
                entry[name] = sharding
                continue
            kernel_spec = _spec_of(sharding, ndim)
            by_role = base.role_dims(layout, kernel_spec)
            axes = base.leaf_axes(roles[name], layout, ndim)
            taken = {k: 0 for k in by_role}
            spec = []
            for role in axes:
                if role in by_role:
                    spec.append(by_role[role][taken[role]])
                    taken[role] += 1
                else:  # rank, expert... axes of the adapter alone: replicated unless `adapter_axes` maps them
                    spec.append(adapter_axes.get(role))
            if adapter_axes:
                _check_mapped(path, name, spec, axes, tree_lib.shape_of(leaves[name]), sharding.mesh, adapter_axes)
            entry[name] = NamedSharding(sharding.mesh, PartitionSpec(*spec))
        out[keys] = entry
    result = tree_lib.nest(out)
    shared = tree_lib.shared_of(adapter_params)
    if shared:  # one array for every target, adapter-only axes: replicated on the targets' mesh
        some = next((v for entry in out.values() for v in entry.values()), None)
        replicated = NamedSharding(some.mesh, PartitionSpec()) if isinstance(some, NamedSharding) else some
        result[tree_lib.SHARED] = {n: replicated for n in shared}
    return result


def _check_mapped(path: str, name: str, spec: list, axes: tuple, shape, mesh, adapter_axes: Mapping) -> None:
    """Raises naming the leaf when an ``adapter_axes`` entry does not fit it on ``mesh``."""
    used: dict = {}
    for dim, (role, entry) in enumerate(zip(axes, spec)):
        for axis in _mesh_axes(entry):
            if axis in used:
                raise ValueError(f"leaf {name!r} at {path!r}: mesh axis {axis!r} would shard both its {axes[used[axis]]!r} "
                                 f"and {role!r} axes (`adapter_axes` {dict(adapter_axes)})")
            used[axis] = dim
        if role in adapter_axes and entry is not None:
            missing = [a for a in _mesh_axes(entry) if a not in mesh.shape]
            if missing:
                raise ValueError(f"`adapter_axes` maps {role!r} to mesh axes {missing} that the mesh {dict(mesh.shape)} lacks")
            size = 1
            for a in _mesh_axes(entry):
                size *= mesh.shape[a]
            if shape[dim] % size:
                raise ValueError(f"leaf {name!r} at {path!r}: its {role!r} axis of size {shape[dim]} does not divide "
                                 f"over mesh axes {entry!r} ({size} devices)")
