"""lowrank_jax: low-rank fine-tuning and memory-saving methods for JAX and Flax.

Adapters are factories returning :class:`Adapter`, a NamedTuple of pure
functions over Flax params pytrees; bridges (:mod:`lowrank_jax.linen`,
:mod:`lowrank_jax.nnx`) run them in factored form inside unchanged models.

The names below are imported on first use (PEP 562), so ``import lowrank_jax`` and the
command line's ``--help`` do not pay for jax, flax and optax until something needs them.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: Subpackages and modules reachable as ``lrj.<name>``.
_MODULES = ("attention", "distributed", "grads", "linalg", "linen", "longlora", "multi_train", "nnx", "optim", "plan", "quant", "tree")

#: Public name -> (module, attribute).
_EXPORTS = {
    "AdaLoraState": ("lowrank_jax.adapters.adalora", "AdaLoraState"),
    "adalora": ("lowrank_jax.adapters.adalora", "adalora"),
    "adalora_allocator": ("lowrank_jax.adapters.adalora", "adalora_allocator"),
    "Adapter": ("lowrank_jax.adapters.base", "Adapter"),
    "Leaf": ("lowrank_jax.adapters.base", "Leaf"),
    "Site": ("lowrank_jax.adapters.base", "Site"),
    "freeze": ("lowrank_jax.adapters.base", "freeze"),
    "join": ("lowrank_jax.adapters.base", "join"),
    "split": ("lowrank_jax.adapters.base", "split"),
    "combine": ("lowrank_jax.adapters.combinators", "combine"),
    "full_finetune": ("lowrank_jax.adapters.combinators", "full_finetune"),
    "aflora": ("lowrank_jax.adapters.aflora", "aflora"),
    "aflora_freezing": ("lowrank_jax.adapters.aflora", "aflora_freezing"),
    "AfloraFreezingState": ("lowrank_jax.adapters.aflora", "AfloraFreezingState"),
    "bitfit": ("lowrank_jax.adapters.bitfit", "bitfit"),
    "dora": ("lowrank_jax.adapters.dora", "dora"),
    "dora_weight_norms": ("lowrank_jax.adapters.dora", "weight_norms"),
    "ia3": ("lowrank_jax.adapters.ia3", "ia3"),
    "lamda": ("lowrank_jax.adapters.lamda", "lamda"),
    "lamda_plus": ("lowrank_jax.adapters.lamda", "lamda_plus"),
    "lamda_plus_ranks": ("lowrank_jax.adapters.lamda", "lamda_plus_ranks"),
    "LoraGA": ("lowrank_jax.adapters.lora", "LoraGA"),
    "init_with_residual": ("lowrank_jax.adapters.lora", "init_with_residual"),
    "offset_to_plain_lora": ("lowrank_jax.adapters.lora", "offset_to_plain_lora"),
    "lora": ("lowrank_jax.adapters.lora", "lora"),
    "lora_scale": ("lowrank_jax.adapters.lora", "lora_scale"),
    "vera": ("lowrank_jax.adapters.vera", "vera"),
    "molora": ("lowrank_jax.adapters.moe", "molora"),
    "mixlora": ("lowrank_jax.adapters.moe", "mixlora"),
    "malora": ("lowrank_jax.adapters.moe", "malora"),
    "moe_aux_loss": ("lowrank_jax.adapters.moe", "aux_loss"),
    "WithAux": ("lowrank_jax.adapters.base", "WithAux"),
    "multi_lora": ("lowrank_jax.adapters.multi", "multi_lora"),
    "LoraBank": ("lowrank_jax.adapters.multi", "Bank"),
    "bank_shardings": ("lowrank_jax.adapters.multi", "bank_shardings"),
    "adapter_shardings": ("lowrank_jax.sharding", "adapter_shardings"),
    "average_gradient": ("lowrank_jax.training", "average_gradient"),
    "make_train_step": ("lowrank_jax.training", "make_train_step"),
    "trainable_summary": ("lowrank_jax.training", "trainable_summary"),
    "Layout": ("lowrank_jax.tree", "Layout"),
    "labels": ("lowrank_jax.tree", "labels"),
    "mask": ("lowrank_jax.tree", "mask"),
}

__all__ = sorted((*_MODULES, *_EXPORTS))


def __getattr__(name: str):
    if name in _EXPORTS:
        module, attribute = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attribute)
    elif name in _MODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module 'lowrank_jax' has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted({*globals(), *__all__})
