"""Sharding-aware array helpers shared by adapters and optimizers.

Under an Explicit mesh (``jax.make_mesh``'s default in jax 0.10) every traced
array carries its partition spec in its type, and contractions over sharded
axes or elementwise ops between differently sharded operands need an explicit
output sharding. These helpers read the specs and do the right thing; without
an Explicit mesh (one device, or an Auto mesh under ``jit`` shardings) they are
the plain ``jax.numpy``/``lax`` operations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, PartitionSpec

__all__ = ["explicit_spec", "contract", "match_sharding", "replicated", "reshard_to", "zeros"]


def explicit_spec(x) -> tuple | None:
    """``x``'s partition spec (padded to ``x.ndim``) when traced under an Explicit mesh, else ``None``."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or not mesh.axis_names or AxisType.Explicit not in tuple(mesh.axis_types):
        return None
    spec = tuple(sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def _mesh_axes(entry) -> tuple:
    if entry is None:
        return ()
    return entry if isinstance(entry, tuple) else (entry,)


def contract(lhs, rhs, n: int):
    """Contracts ``lhs``'s last ``n`` axes with ``rhs``'s first ``n`` axes.

    Under an Explicit mesh the output keeps ``lhs``'s remaining sharding and
    ``rhs``'s where it does not reuse a mesh axis, so contractions over sharded
    axes compile (an all-reduce) instead of failing.
    """
    dims = ((tuple(range(lhs.ndim - n, lhs.ndim)), tuple(range(n))), ((), ()))
    lhs_spec, rhs_spec = explicit_spec(lhs), explicit_spec(rhs)
    if lhs_spec is None and rhs_spec is None:
        return lax.dot_general(lhs, rhs, dims)
    lhs_spec = lhs_spec or (None,) * lhs.ndim
    rhs_spec = rhs_spec or (None,) * rhs.ndim
    out = list(lhs_spec[: lhs.ndim - n])
    used = {a for e in out for a in _mesh_axes(e)}
    for entry in rhs_spec[n:]:
        axes = _mesh_axes(entry)
        out.append(entry if axes and not (set(axes) & used) else None)
        used |= set(axes)
    return lax.dot_general(lhs, rhs, dims, out_sharding=PartitionSpec(*out))


def reshard_to(x, spec: tuple | None):
    """``x`` resharded to ``spec`` under an Explicit mesh; ``x`` when there is none or it already has it."""
    have = explicit_spec(x)
    if spec is None or have is None or tuple(have) == tuple(spec):
        return x
    return jax.sharding.reshard(x, PartitionSpec(*spec))


def match_sharding(x, like):
    """Reshards ``x`` to ``like``'s sharding under an Explicit mesh (elementwise ops need equal specs)."""
    return reshard_to(x, explicit_spec(like))


def replicated(x):
    """``x`` fully replicated under an Explicit mesh (for small adapter-only math); else ``x``."""
    spec = explicit_spec(x)
    if spec is None or all(e is None for e in spec):
        return x
    return jax.sharding.reshard(x, PartitionSpec())


def zeros(shape, dtype, spec: tuple | None):
    """Zeros, sharded by ``spec`` when an Explicit mesh is active (so states inherit shardings)."""
    if spec is None:
        return jnp.zeros(shape, dtype)
    return jnp.zeros(shape, dtype, out_sharding=PartitionSpec(*spec))
