r"""LoRA-FA: A frozen, B's gradient preconditioned so that ``s B A`` follows the full gradient.

Reference: Zhang et al, `LoRA-FA: Memory-efficient Low-rank Adaptation for Large
Language Models Fine-tuning <https://arxiv.org/abs/2308.03303>`_, 2023.
Reference implementation matched: peft ``optimizers/lorafa.py``
(``create_lorafa_optimizer`` / ``LoraFAOptimizer``), recorded in
``tests/fixtures/make_optim_references.py``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from lowrank_jax import tree as tree_lib
from lowrank_jax.optim import _common, _linalg
from lowrank_jax.optim.adam import add_decayed_weights_after_step, scale_by_adam_hf

__all__ = ["scale_by_lora_fa", "lora_fa", "lora_fa_labels"]


def _flat_pair(path, a, b, layouts, adapter=None):
    """``a: [*S, I, r]`` and ``b: [*S, r, O]`` views of N-D factors."""
    stack = _common.lora_stack(path, a.shape, b.shape, layouts, adapter)
    s_shape = a.shape[:stack]
    r = a.shape[-1]
    return stack, a.reshape(*s_shape, -1, r), b.reshape(*s_shape, r, -1)


def _gram_a(a2):
    """``a^T a: [*S, r, r]`` (torch: ``A A^T``), replicated under an Explicit mesh."""
    a2 = _common.replicated(a2)
    return jnp.einsum("...ir,...is->...rs", a2, a2, precision=_linalg.HIGHEST)


def scale_by_lora_fa(scale: Any, *, delta: float = 1e-8, layouts: Any = None) -> optax.GradientTransformation:
    r"""LoRA-FA's gradient map: ``a`` gets a zero update, ``b``'s gradient is preconditioned.

    In Flax orientation (``a: [in, r]``, ``b: [r, out]``, ``W' = W + s a b``; peft's
    ``A = a^T``, ``B = b^T``):

    .. math::
        g_b' = \frac{1}{s^2} \, \mathrm{pinv}(a^\top a + \delta I) \, g_b
        \quad (\text{peft: } g_B' = \tfrac{1}{s^2} g_B \, \mathrm{pinv}(A A^\top + \delta I)),
        \qquad g_a' = 0.

    Since ``g_b = s a^T G`` for the full gradient ``G = dL/dW``, ``s a g_b'`` is
    the least-squares projection of ``G`` onto matrices ``a Y`` (the closest
    weight change that A frozen allows); the tests check this property. N-D factors
    ``a: [*stack, *inputs, r]``, ``b: [*stack, r, *outputs]`` are handled per stacked slice.

    Every mapping of the update tree holding both ``a`` and ``b`` is a LoRA
    target (given an adapter as ``scale``, the two leaves its roles declare
    ``("stack", "in", "rank")`` and ``("stack", "rank", "out")``, and the stacked
    axes follow from those roles); other leaves pass through. The transform needs the current factors:
    call ``update(grads, state, params)``. It computes in float32 and returns the
    gradients' dtypes. peft computes ``g_B pinv(...)`` under a bfloat16 autocast
    on CPU; this is the float32 computation (the tests compare with both).

    Args:
      scale: the LoRA scaling ``s``: a number, the :class:`lrj.Adapter` that made
        the factors (its ``alpha``/``alpha_pattern``/``rslora`` and each target's rank), or
        ``path -> s`` for the "/"-joined target path.
      delta: the ridge ``delta`` (peft: 1e-8).
      layouts: ``{path regex: lrj.Layout}`` or ``path -> Layout`` when the stacked
        axes of N-D factors are ambiguous.

    Returns:
      An :class:`optax.GradientTransformation`.
    """
    scale_of = _common.lora_scale_fn(scale)
    adapter = _common.adapter_of(scale)
    a_name, b_name = _common.lora_factor_names(adapter)
    _common.check_nonnegative("delta", delta)

    def init_fn(params):
        # params may be the trainable part alone (A frozen by lrj.freeze): its B factors suffice
        has_b = any(tree_lib._key_name(kp[-1]) == b_name for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0])
        if not (_common.lora_pair_paths(params, adapter=adapter) or has_b):
            raise _common.no_factors_error("LoRA-FA", adapter)
        return optax.EmptyState()

    def precondition(path, g, p):
        a, b, gb = p[a_name], p[b_name], g[b_name]
        s = scale_of(path, a)
        stack, a2, _ = _flat_pair(path, a, b, layouts, adapter)
        gb2 = gb.astype(jnp.float32).reshape(*b.shape[: stack + 1], -1)
        inv = _linalg.pinv_psd(_gram_a(a2.astype(jnp.float32)), delta)
        new_b = jnp.einsum("...rs,...so->...ro", inv, gb2, precision=_linalg.HIGHEST) / (s * s)
        new_b = _common.reshard_like(new_b.reshape(gb.shape).astype(gb.dtype), gb)
        return {a_name: jnp.zeros_like(g[a_name]), b_name: new_b}

    def update_fn(updates, state, params=None, *, frozen=None, **extra_args):
        del extra_args
        if frozen:  # A frozen (lrj.freeze + lrj.make_train_step): its factors arrive as optax's extra argument
            full = tree_lib.merge_trees(updates, jax.tree.map(jnp.zeros_like, frozen))
            new, _ = _common.map_lora_pairs(precondition, full, tree_lib.merge_trees(params, frozen), adapter=adapter)
            return tree_lib.without(new, frozen), state
        new, _ = _common.map_lora_pairs(precondition, updates, params, adapter=adapter)
        return new, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def lora_fa_labels(params, adapter=None) -> Any:
    """``"frozen"`` for every ``a`` factor of a LoRA target, ``"train"`` elsewhere.

    Given ``adapter``, the factors are the leaves its roles declare (see :func:`scale_by_lora_fa`).
    """
    targets = set(_common.lora_pair_paths(params, adapter=adapter))
    a_name, _ = _common.lora_factor_names(adapter)

    def label(keypath, leaf):
        keys = tuple(tree_lib._key_name(k) for k in keypath)
        return "frozen" if keys and keys[-1] == a_name and tree_lib.path_str(keys[:-1]) in targets else "train"

    return jax.tree_util.tree_map_with_path(label, params)


def lora_fa(
    learning_rate: _common.ScalarOrSchedule,
    scale: Any,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    mask: Any = None,
    delta: float = 1e-8,
    layouts: Any = None,
) -> optax.GradientTransformation:
    r"""LoRA-FA as peft's ``create_lorafa_optimizer`` builds it: frozen A, preconditioned B, adamw_hf.

    .. math::
        g_b' = \frac{1}{s^2} \mathrm{pinv}(a^\top a + \delta I) \, g_b, \qquad
        b \leftarrow \Big(b - \eta \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
        \frac{m_t}{\sqrt{v_t} + \epsilon}\Big)(1 - \eta \lambda)

    with ``m_t, v_t`` the moments of ``g_b'``; ``a`` never changes and has no
    optimizer state. Leaves outside LoRA targets get the same Adam on their raw
    gradient (peft: transformers' AdamW). That is ``chain(scale_by_lora_fa(scale),
    partition({"frozen": set_to_zero(), "train": chain(scale_by_adam_hf(b1, b2, eps),
    scale_by_learning_rate(lr))}), add_decayed_weights_after_step(weight_decay, lr, mask))``
    with the decay masked off the frozen factors (see :func:`lrj.optim.adamw_hf`).

    A is frozen, so its gradient is never used: make the adapter with
    ``lrj.freeze(adapter, {"a"})`` and the step with ``lrj.make_train_step(..., adapter=...)``,
    which computes no gradient of ``a`` (0.991x LoRA's FLOPs, 0.724x its temp memory in
    ``benchmarks/bench_lora_fa.py``) and passes the frozen ``a`` to this optimizer as optax's
    extra argument ``frozen=`` (initialise it on the trainable part,
    ``tx.init(lrj.split(adapter, adapter_params)[0])``). Given the whole tree instead, ``a``'s
    update is zero.

    Args:
      learning_rate: ``eta`` (number or schedule).
      scale: the LoRA scaling ``s`` (number, :class:`lrj.Adapter`, or ``path -> s``).
      b1, b2, eps: Adam (peft's defaults: 0.9, 0.999, 1e-6).
      weight_decay: ``lambda``, applied after the step as peft does.
      mask: where to decay (tree or callable), default everywhere.
      delta, layouts: see :func:`scale_by_lora_fa`.

    Returns:
      An :class:`optax.GradientTransformation` whose ``update`` needs ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lowrank_jax as lrj
      >>> lp = {"q": {"kernel": {"a": jnp.eye(4, 2), "b": jnp.zeros((2, 3))}}}
      >>> tx = lrj.optim.lora_fa(1e-2, scale=2.0)
      >>> grads = jax.tree.map(jnp.ones_like, lp)
      >>> updates, _ = tx.update(grads, tx.init(lp), lp)
      >>> updates["q"]["kernel"]["a"].any()
      Array(False, dtype=bool)

    References:
      Zhang et al, `LoRA-FA: Memory-efficient Low-rank Adaptation for Large
      Language Models Fine-tuning <https://arxiv.org/abs/2308.03303>`_, 2023.
    """
    _common.check_learning_rate(learning_rate)
    adapter = _common.adapter_of(scale)

    def labels(params):
        return lora_fa_labels(params, adapter)

    def decay_mask(params):
        trainable = jax.tree.map(lambda label: label == "train", labels(params))
        if mask is None:
            return trainable
        user = mask(params) if callable(mask) else mask
        return jax.tree.map(lambda t, u: bool(t and u), trainable, user)

    return optax.chain(
        scale_by_lora_fa(scale, delta=delta, layouts=layouts),
        optax.partition(
            {"frozen": optax.set_to_zero(),
             "train": optax.chain(scale_by_adam_hf(b1, b2, eps), optax.scale_by_learning_rate(learning_rate))},
            labels,
        ),
        add_decayed_weights_after_step(weight_decay, learning_rate, decay_mask),
    )
