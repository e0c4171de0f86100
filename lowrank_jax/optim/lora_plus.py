r"""LoRA+: a larger learning rate for the B factors, as peft's ``create_loraplus_optimizer`` groups them.

Reference: Hayou et al, `LoRA+: Efficient Low Rank Adaptation of Large Models
<https://arxiv.org/abs/2402.12354>`_, 2024. Reference implementation matched:
peft ``optimizers/loraplus.py`` (``create_loraplus_optimizer``); the tests replay
gradients recorded from it with ``torch.optim.AdamW`` and compare every parameter
after each step (``tests/fixtures/make_optim_references.py``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import optax

from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import scale as scale_lib
from lowrank_jax.optim import _common

__all__ = ["lora_plus", "lora_plus_labels", "LORA_PLUS_GROUPS"]

#: The label of every group, in peft's order: ``groupA``, ``embedding``, ``groupB``, ``groupB_no_decay``.
LORA_PLUS_GROUPS = ("a", "embedding", "b", "b_no_decay")

#: 1-D leaves that peft leaves undecayed: biases and LayerNorm parameters (Flax names both norms' weight ``scale``).
NO_DECAY_NAMES = ("bias", "scale")


def lora_plus_labels(params, adapter=None) -> Any:
    """peft's LoRA+ group of every leaf of a trainable tree, as a tree of labels.

    * ``"embedding"``: the factors ``a``/``b`` of a target whose path ends in
      ``embedding`` (an ``nn.Embed`` table; peft: parameters of a LoRA ``Embedding``);
    * ``"b"``: every ``b`` factor and every other 1-D leaf (DoRA's ``m``, gates...);
    * ``"b_no_decay"``: 1-D leaves named ``bias`` or ``scale`` (biases and norm
      parameters; peft excludes names containing "bias" and ``nn.LayerNorm`` weights
      from weight decay). Flax names the weight of ``LayerNorm`` and ``RMSNorm``
      alike ``scale``, so an RMSNorm weight is not decayed here, where peft (which
      only knows ``nn.LayerNorm``) decays a LLaMA ``RMSNorm`` weight;
    * ``"a"``: everything else (``a`` factors and any other trainable matrix).

    Leaves are named by their last key; the target path is the keys before it.
    A bias stacked by ``nn.scan`` is 2-D and lands in ``"a"`` (peft's rule is
    ``ndim == 1``): pass your own labels to :func:`lora_plus` if that matters.

    Given ``adapter`` (:class:`lrj.Adapter`), its leaves are grouped by their roles, not
    their names: the factor ``("stack", "in", "rank")`` is A, ``("stack", "rank", "out")``
    is B, and another leaf with at most one axis besides ``"stack"`` (DoRA's
    ``m: ("stack", "out")``) goes with B, which is peft's ``ndim == 1`` rule applied per
    layer: on unstacked trees the groups are the ones above, and a stacked ``m`` is put
    with B as peft puts each layer's magnitude vector.
    """
    factors = _common.lora_factor_names(adapter)
    roles = scale_lib.roles_or_lora(adapter) if adapter is not None else {}

    def label(keypath, leaf):
        keys = tuple(tree_lib._key_name(k) for k in keypath)
        name = keys[-1] if keys else None
        if name in factors and len(keys) >= 2 and keys[-2] in tree_lib.EMBEDDING_NAMES:
            return "embedding"
        vector = getattr(leaf, "ndim", None) == 1
        if name in roles and name not in factors:
            vector = len([r for r in roles[name].axes if r != "stack"]) <= 1
        if name == factors[1] or vector:
            return "b_no_decay" if name in NO_DECAY_NAMES else "b"
        return "a"

    return jax.tree_util.tree_map_with_path(label, params)


def _accepts(factory, name: str) -> bool:
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return True
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def lora_plus(
    learning_rate: _common.ScalarOrSchedule,
    lr_ratio: float,
    *,
    base: Callable[..., optax.GradientTransformation] = optax.adamw,
    lr_embedding: _common.ScalarOrSchedule = 1e-6,
    weight_decay: float | None = 0.0,
    labels: Any = None,
    adapter: Any = None,
    **base_kwargs,
) -> optax.GradientTransformation:
    r"""LoRA+: ``base`` optimizers per parameter group, B factors at ``lr_ratio`` times the learning rate.

    .. math::
        \eta_A = \eta, \qquad \eta_B = \lambda \eta \;(\lambda = \text{lr\_ratio}), \qquad
        \eta_{\text{embedding}} = \text{lr\_embedding}

    Groups follow peft's ``create_loraplus_optimizer`` (see :func:`lora_plus_labels`):
    ``"a"`` at ``learning_rate``; ``"b"`` (every ``b`` factor and other 1-D leaf) at
    ``learning_rate * lr_ratio``; ``"b_no_decay"`` (1-D ``bias``/``scale`` leaves)
    at ``learning_rate * lr_ratio`` without weight decay; ``"embedding"`` (both
    factors of an embedding target) at ``lr_embedding``. Each group gets its own
    ``base(learning_rate=..., weight_decay=..., **base_kwargs)``, combined with
    :func:`optax.partition`.

    ``weight_decay`` is passed to ``base`` for every group but ``"b_no_decay"``
    (which gets 0), as peft's ``loraplus_weight_decay`` (default 0.0, which also
    overrides the base optimizer's own default, as in peft). Use ``None`` for a
    ``base`` without weight decay (e.g. :func:`optax.sgd`).

    A schedule ``learning_rate`` is scaled by ``lr_ratio`` for B; ``lr_embedding``
    is used as given (a number stays constant under a schedule; pass a schedule
    to decay it too). With ``base=optax.adamw`` (and its ``eps=1e-8``) one step
    equals ``torch.optim.AdamW`` under peft's grouping, which the tests check.

    Args:
      learning_rate: ``eta``, the A factors' learning rate (number or schedule).
      lr_ratio: ``lambda = eta_B / eta_A``; no default (the paper uses 16 to 20).
      base: an optax optimizer factory taking ``learning_rate`` (and ``weight_decay``).
      lr_embedding: learning rate of embedding factors (peft: 1e-6).
      weight_decay: decay for all groups except ``"b_no_decay"``, or ``None``.
      labels: a label tree (or callable of the params) replacing :func:`lora_plus_labels`.
      adapter: the :class:`lrj.Adapter` that made the tree: its leaves are grouped by their
        roles (``lora_plus_labels(params, adapter)``); the same groups as without it on
        unstacked LoRA and DoRA trees.
      **base_kwargs: passed to every ``base`` call (e.g. ``b1``, ``eps``).

    Returns:
      An :class:`optax.GradientTransformation` (an :func:`optax.partition`).

    Example:
      >>> import jax, jax.numpy as jnp, optax, lowrank_jax as lrj
      >>> lp = {"dense": {"kernel": {"a": jnp.ones((4, 2)), "b": jnp.zeros((2, 3))}, "bias": jnp.zeros(3)}}
      >>> lrj.optim.lora_plus_labels(lp)
      {'dense': {'bias': 'b_no_decay', 'kernel': {'a': 'a', 'b': 'b'}}}
      >>> tx = lrj.optim.lora_plus(1e-3, lr_ratio=16.0)
      >>> grads = jax.tree.map(jnp.ones_like, lp)
      >>> updates, _ = tx.update(grads, tx.init(lp), lp)
      >>> float(updates["dense"]["kernel"]["b"][0, 0] / updates["dense"]["kernel"]["a"][0, 0])
      16.0...
    """
    _common.check_learning_rate(learning_rate)
    if not callable(lr_embedding):
        _common.check_nonnegative("lr_embedding", lr_embedding)
    lr_ratio = _common.check_positive("lr_ratio", lr_ratio)
    if not callable(base):
        raise TypeError(f"`base` must be an optax optimizer factory such as optax.adamw, got {base!r}")
    if weight_decay is not None:
        _common.check_nonnegative("weight_decay", weight_decay)
        if not _accepts(base, "weight_decay"):
            if weight_decay != 0:
                raise ValueError(f"`base` {getattr(base, '__name__', base)!r} takes no `weight_decay`; "
                                 f"use weight_decay=None")
            weight_decay = None
    if "learning_rate" in base_kwargs:
        raise ValueError("pass the learning rate as `learning_rate`, not in the base optimizer's keyword arguments")

    def make(lr, decay: bool):
        kwargs = dict(base_kwargs)
        if weight_decay is not None:
            kwargs["weight_decay"] = weight_decay if decay else 0.0
        return base(learning_rate=lr, **kwargs)

    transforms = {
        "a": make(learning_rate, True),
        "embedding": make(lr_embedding, True),
        "b": make(_common.scaled_schedule(learning_rate, lr_ratio), True),
        "b_no_decay": make(_common.scaled_schedule(learning_rate, lr_ratio), False),
    }
    if labels is None:
        labels = functools.partial(lora_plus_labels, adapter=adapter)
    return optax.partition(transforms, labels)
