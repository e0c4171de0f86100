r"""Language-model losses that never materialise the whole ``[B, T, V]`` logits.

:func:`lm_cross_entropy` is the mean next-token NLL of the head ``logits = h W^T`` (tied:
``W`` is the ``[V, D]`` embedding) computed chunk by chunk over the tokens, with its gradient
formed in the same pass (as Liger-Kernel's fused linear cross-entropy): per chunk of ``C``
tokens,

.. math:: z = h_c W^T, \quad \ell_i = \log\sum_v e^{z_{iv}} - z_{i t_i}, \quad
          \partial z = m \odot (\mathrm{softmax}(z) - \mathrm{onehot}(t)) / \textstyle\sum m,

then ``dh_c = dz W`` and, only when ``W`` is differentiated (full fine-tuning),
``dW += dz^T h_c``. Nothing of size ``[C, V]`` outlives its chunk and the backward pass is a
multiply by the incoming cotangent, so the head costs its two matmuls once each and no
``[B, T, V]`` float32 buffer is kept for the backward pass.

It equals :func:`lowrank_jax.finetune.cross_entropy` of the model's logits (values and
gradients, ``tests/test_losses.py``). :func:`fused_head_applies` says when the main job may
use it: never when an adapter targets the embedding or ``lm_head`` (the head would then run
with the base weight and the adapter's gradient through the head would be silently lost).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["fused_head_applies", "head_weight", "lm_cross_entropy", "next_token_loss"]

#: Tokens per chunk: a ``[512, 49152]`` float32 chunk of logits is 96 MiB (SmolLM2's whole batch of 4 x 128).
DEFAULT_CHUNK = 512


def _chunks(n: int, chunk_size: int) -> tuple[int, int]:
    size = max(1, min(chunk_size, n))
    count = -(-n // size)
    return count, size


def _forward_chunks(h, w, targets, weights, tied: bool, chunk_size: int, w_grad: bool):
    """``(nll [N], dh [N, D], dW or None)`` of the weighted sum of NLLs (weights already normalised)."""
    n, d = h.shape
    count, size = _chunks(n, chunk_size)
    pad = count * size - n
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        targets = jnp.pad(targets, (0, pad))
        weights = jnp.pad(weights, (0, pad))
    dims = (((1,), (1,)), ((), ())) if tied else (((1,), (0,)), ((), ()))  # z = h W^T (tied) or h K

    def one(h_c, t_c, m_c):
        z = jax.lax.dot_general(h_c, w, dims, preferred_element_type=jnp.float32)       # [C, V]
        top = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
        lse = jnp.log(jnp.sum(jnp.exp(z - top), axis=-1)) + top[:, 0]
        picked = jnp.take_along_axis(z, t_c[:, None], axis=-1)[:, 0]
        nll = lse - picked
        p = jnp.exp(z - lse[:, None])
        hit = jax.lax.broadcasted_iota(jnp.int32, z.shape, 1) == t_c[:, None]
        dz = (jnp.where(hit, p - 1.0, p) * m_c[:, None]).astype(h.dtype)                # [C, V]
        # dh = dz W (tied: [C, V] x [V, D]) or dz K^T
        dh = jax.lax.dot_general(dz, w, (((1,), (0,)), ((), ())) if tied else (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32).astype(h.dtype)
        dw = None
        if w_grad:  # tied: dW = dz^T h [V, D]; untied: dK = h^T dz [D, V]
            dw = (jax.lax.dot_general(dz, h_c, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32) if tied
                  else jax.lax.dot_general(h_c, dz, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32))
        return nll, dh, dw

    if count == 1:
        nll, dh, dw = one(h, targets, weights)
    else:
        hs, ts, ms = h.reshape(count, size, d), targets.reshape(count, size), weights.reshape(count, size)

        def body(acc, xs):
            nll, dh, dw = one(*xs)
            return (acc + dw if w_grad else acc), (nll, dh)

        acc0 = jnp.zeros(w.shape, jnp.float32) if w_grad else jnp.zeros((), jnp.float32)
        dw, (nll, dh) = jax.lax.scan(body, acc0, (hs, ts, ms))
        nll, dh = nll.reshape(-1), dh.reshape(-1, d)
        dw = dw if w_grad else None
    return nll[:n], dh[:n], (dw.astype(w.dtype) if w_grad else None)


def _make_fused(tied: bool, chunk_size: int):
    @jax.custom_vjp
    def fused(h, w, targets, weights):
        nll, _, _ = _forward_chunks(h, w, targets, weights, tied, chunk_size, w_grad=False)
        return jnp.sum(nll * weights)

    def fwd(h, w, targets, weights):
        nll, dh, dw = _forward_chunks(h.value, w.value, targets.value, weights.value, tied, chunk_size,
                                      w_grad=w.perturbed)
        return jnp.sum(nll * weights.value), (nll, dh, dw, weights.perturbed)

    def bwd(res, g):
        nll, dh, dw, weights_perturbed = res
        g = jnp.asarray(g, jnp.float32)
        return (g.astype(dh.dtype) * dh, None if dw is None else g.astype(dw.dtype) * dw, None,
                g * nll if weights_perturbed else None)

    fused.defvjp(fwd, bwd, symbolic_zeros=True)
    return fused


_FUSED: dict[tuple[bool, int], Any] = {}


def lm_cross_entropy(hidden, weight, targets, loss_mask=None, *, tied: bool = True,
                     chunk_size: int = DEFAULT_CHUNK) -> jax.Array:
    r"""Mean next-token NLL in float32 of the head on ``hidden [..., D]`` against ``targets [...]``,
    over the targets ``loss_mask`` selects (:math:`\sum m \ell / \max(1, \sum m)`, as
    :func:`lowrank_jax.finetune.cross_entropy`), without the whole logits.

    Args:
      hidden: the final-norm hidden states (``LlamaForCausalLM(output="hidden")``).
      weight: the head: the ``[V, D]`` embedding when ``tied``, else the ``[D, V]`` ``lm_head`` kernel.
      targets: integer ids, ``hidden``'s shape without its last axis.
      loss_mask: weights of the targets (``None``: all 1).
      tied: the orientation of ``weight`` (see above).
      chunk_size: tokens per chunk of logits (``chunk_size x V`` float32 live at a time).

    Differentiable in ``hidden`` and ``weight`` (the gradient of ``weight`` is formed only when it
    is differentiated); logits are accumulated in float32 whatever the inputs' dtype.
    """
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be positive, got {chunk_size}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"`targets` {targets.shape} must be `hidden` {hidden.shape} without its last axis")
    d = hidden.shape[-1]
    if weight.ndim != 2 or weight.shape[1 if tied else 0] != d:
        raise ValueError(f"`weight` {weight.shape} is not a {'[V, D]' if tied else '[D, V]'} head for D = {d}")
    h = hidden.reshape(-1, d)
    t = targets.reshape(-1).astype(jnp.int32)
    mask = jnp.ones(t.shape, jnp.float32) if loss_mask is None else loss_mask.reshape(-1).astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(mask), 1.0)
    key = (bool(tied), int(chunk_size))
    if key not in _FUSED:
        _FUSED[key] = _make_fused(*key)
    return _FUSED[key](h, weight, t, mask / denom)


def head_weight(params, config) -> tuple[jax.Array, bool]:
    """``(weight, tied)`` of a :class:`~lowrank_jax.models.llama.LlamaForCausalLM`'s head in ``params``
    (bare or ``{"params": ...}``): the embedding when ``config.tie_word_embeddings``, else ``lm_head``'s kernel."""
    p = params["params"] if "params" in params else params
    if config.tie_word_embeddings:
        return p["embed_tokens"]["embedding"], True
    return p["lm_head"]["kernel"], False


def next_token_loss(out, params, head, batch, *, chunk_size: int = DEFAULT_CHUNK) -> jax.Array:
    """:func:`lowrank_jax.finetune.next_token_loss` of a training ``batch`` (``[B, T + 1]`` ids, or
    ``[B, 2, T + 1]`` with the loss mask): ``head`` ``None``: ``out`` is the model's logits ``[B, T, V]``;
    else ``head`` is the model's :class:`~lowrank_jax.models.llama.LlamaConfig`, ``out`` the hidden
    states ``[B, T, D]`` (``output="hidden"``) and the head in ``params`` (:func:`head_weight`) is
    applied chunk by chunk by :func:`lm_cross_entropy`."""
    if head is None:
        from lowrank_jax.finetune import next_token_loss as plain  # lazily: finetune imports this module

        return plain(out, batch)
    weight, tied = head_weight(params, head)
    if batch.ndim == 3:
        return lm_cross_entropy(out, weight, batch[:, 0, 1:], batch[:, 1, 1:], tied=tied, chunk_size=chunk_size)
    return lm_cross_entropy(out, weight, batch[:, 1:], tied=tied, chunk_size=chunk_size)


def fused_head_applies(adapter_params, params, config) -> bool:
    """Whether the main job may compute its loss with :func:`lm_cross_entropy` on the base head:
    the head weight is a plain array in ``params`` and the adapter tree ``adapter_params`` (its
    leaves mirror the paths they change; ``None``: no adapter) has no leaf under ``embed_tokens``
    or ``lm_head``. When this is ``False`` the model's own logits are used, so an adapter on the
    (tied) head is never bypassed."""
    from lowrank_jax import tree as tree_lib

    try:
        weight, _ = head_weight(params, config)
    except (KeyError, TypeError):
        return False
    if not isinstance(weight, jax.Array) or weight.ndim != 2:
        return False
    if adapter_params is None:
        return True
    tree = adapter_params["params"] if isinstance(adapter_params, dict) and "params" in adapter_params else adapter_params
    return not any(keys and keys[0] in ("embed_tokens", "lm_head") for keys, _, _ in tree_lib.flatten_with_paths(tree))
