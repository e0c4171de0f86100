r"""Analytic gradient formulas of the low-rank methods, as plain functions (the research reference).

Everything is in Flax orientation: ``W: [in, out]``, ``y = x W``, ``A: [in, r]``,
``B: [r, out]``, and ``G = dL/dW = x^T (dL/dy)`` is the gradient a full
fine-tuning step would compute. Each function is checked against ``jax.grad``
in ``tests/test_grads.py``.

LoRA (Hu et al, `LoRA <https://arxiv.org/abs/2106.09685>`_, 2021), with
``W' = W + s A B``:

.. math::
    \frac{\partial L}{\partial A} = s\, G B^T, \qquad \frac{\partial L}{\partial B} = s\, A^T G

and, never forming ``G`` (what factored execution computes), with ``g = dL/dy``:
``dA = s x^T (g B^T)``, ``dB = s (x A)^T g``.

DoRA (Liu et al, `DoRA <https://arxiv.org/abs/2402.09353>`_, 2024), with
``W' = m \odot V / \|V\|_c`` column-wise (``\|V\|_c`` the norm of each output
column over the input axis) and ``G' = dL/dW'``:

.. math::
    \frac{\partial L}{\partial m} = \frac{\langle G', V \rangle_c}{\|V\|_c}, \qquad
    \frac{\partial L}{\partial V} = \frac{m}{\|V\|_c}\Big(G' - \frac{\langle G', V\rangle_c}{\|V\|_c^2} V\Big)

(the second is the paper's ``(m/||V'||)(I - V'V'^T/||V'||^2) dL/dW'`` written per
column); with the norm detached (the paper's section 4.3, peft's default) the
projection term disappears: ``dL/dV = (m / ||V||_c) G'``.
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["lora_grads", "lora_grads_from_activations", "dora_grads"]


def lora_grads(G, a, b, scale: float):
    """``(dL/dA, dL/dB) = (s G B^T, s A^T G)`` from the full weight gradient ``G: [in, out]``."""
    return scale * G @ b.T, scale * a.T @ G


def lora_grads_from_activations(x, g, a, b, scale: float):
    """``(dL/dA, dL/dB)`` from the layer input ``x: [n, in]`` and output gradient ``g: [n, out]``,
    in ``O(n r (in + out))``: ``dA = s x^T (g B^T)``, ``dB = s (x A)^T g``. Equal to
    :func:`lora_grads` with ``G = x^T g``, which is never formed."""
    return scale * x.T @ (g @ b.T), scale * (x @ a).T @ g


def dora_grads(G_prime, m, V, *, detach_norm: bool = False):
    """``(dL/dm, dL/dV)`` of ``W' = m V / ||V||_c`` from ``G' = dL/dW'`` (all ``[in, out]``, ``m: [out]``)."""
    norm = jnp.linalg.norm(V, axis=0)
    inner = jnp.sum(G_prime * V, axis=0)
    dm = inner / norm
    if detach_norm:
        return dm, (m / norm) * G_prime
    return dm, (m / norm) * (G_prime - (inner / norm**2) * V)
