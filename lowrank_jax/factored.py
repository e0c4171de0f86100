r"""The factored LoRA branch ``y = s (x A) B`` of a linear layer with a hand-written VJP.

With ``x: [..., in]`` flattened to ``[N, in]``, ``t = x A`` (``[N, r]``, kept from the forward
pass) and the incoming cotangent ``g: [N, out]``:

.. math:: u = g B^T, \quad \partial x = s\, u A^T, \quad
          \partial A = s\, (u^T x)^T, \quad \partial B = s\, t^T g .

Every product is written with the small ``[N, r]`` operand transposed (``t^T``, ``u^T``: ``r x N``),
behind an ``optimization_barrier`` so XLA keeps it that way: each matmul is then a plain
row-major GEMM. JAX's own transpose of ``(x A) B`` contracts the token axis of both operands,
and inside ``nn.scan`` XLA's CPU backend answered it by transposing the large ``[N, out]``
cotangent in the elementwise fusion that produces it (strided writes: 18% of the SmolLM2
LoRA step in a profile, ``benchmarks/bench_smollm2_profile.py``). Gradients of inputs that are
not differentiated (LoRA-FA's frozen ``A``, the first layer's input) are not formed
(``symbolic_zeros``). Values and gradients equal plain autodiff's (``tests/test_losses.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lowrank_jax.mesh_ops import contract, match_sharding

__all__ = ["lora_linear"]


def _dot(p, q):
    """``p @ q`` for 2-D ``p, q``; under an Explicit mesh its output sharding follows
    :func:`lowrank_jax.mesh_ops.contract` (a contraction over a sharded axis is an all-reduce)."""
    return contract(p, q, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _branch(x2, a, b, scale):
    return _dot(_dot(x2, a) * jnp.asarray(scale, x2.dtype), b)


def _fwd(x2, a, b, scale):
    s = jnp.asarray(scale, x2.value.dtype)
    t = _dot(x2.value, a.value) * s                                   # [N, r], scaled
    return _dot(t, b.value), (x2.value, a.value, b.value, t, x2.perturbed, a.perturbed, b.perturbed)


def _bwd(scale, res, g):
    x2, a, b, t, want_x, want_a, want_b = res
    if type(g) is jax.custom_derivatives.SymbolicZero:
        g = jnp.zeros(g.shape, g.dtype)
    s = jnp.asarray(scale, x2.dtype)
    g = g.astype(x2.dtype)
    u = _dot(g, b.T) * s if want_x or want_a else None                # [N, r] = s g B^T
    dx = match_sharding(_dot(u, a.T), x2) if want_x else None
    da = match_sharding(_dot(jax.lax.optimization_barrier(u.T), x2).T, a) if want_a else None   # (u^T x)^T
    db = match_sharding(_dot(jax.lax.optimization_barrier(t.T), g), b) if want_b else None      # t^T g
    return dx, da, db


_branch.defvjp(_fwd, _bwd, symbolic_zeros=True)


def lora_linear(x, a, b, scale: float):
    """``scale * (x @ a) @ b`` for ``x: [..., in]``, ``a: [in, r]``, ``b: [r, out]`` (all one dtype),
    differentiated by the VJP above."""
    lead = x.shape[:-1]
    y = _branch(x.reshape(-1, x.shape[-1]), a, b, float(scale))
    return y.reshape(*lead, b.shape[-1])
