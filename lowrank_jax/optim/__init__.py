"""Optimizers for low-rank fine-tuning, as optax ``GradientTransformation``\\ s.

Each method has a ``scale_by_*`` layer (the update direction, no learning rate)
and an alias chaining it with the learning rate and weight decay, as in optax:

* :func:`lora_plus` -- LoRA+ (Hayou et al. 2024): peft's parameter groups on
  :func:`optax.partition`, B factors at ``lr * lr_ratio``.
* :func:`galore` / :func:`scale_by_galore` -- GaLore (Zhao et al. 2024), equal to
  galore-torch's ``GaLoreAdamW`` step for step; 8-bit moments, randomized SVD.
* :func:`lora_fa` / :func:`scale_by_lora_fa` -- LoRA-FA (Zhang et al. 2023), as peft.
* :func:`lora_pro` / :func:`scale_by_lora_pro` / :func:`lora_pro_gradients` --
  LoRA-Pro's equivalent gradients (Wang et al. 2024), from the LoRA gradients alone.
* :func:`lamda_freeze` -- LaMDA's gradual freezing of B's rank components (Azizi et al. 2024),
  as the official code (gradients zeroed) or exactly (updates zeroed).
* :func:`lisa` / :func:`scale_by_lisa` -- LISA (Pan et al. 2024): a few decoder layers trained at
  a time, drawn every ``interval`` steps; embeddings, norm and head always, as LMFlow.
* :func:`adamw_hf` / :func:`scale_by_adam_hf` / :func:`add_decayed_weights_after_step`
  -- transformers' legacy AdamW, the Adam galore-torch and peft's LoRA-FA use.

Optimizers that need the adapter factors (LoRA-FA, LoRA-Pro) read them from the
``params`` argument of ``update``, as :func:`lrj.make_train_step` passes them.
"""

from lowrank_jax.optim._blockwise8 import QuantizedMoment as QuantizedMoment
from lowrank_jax.optim.adam import DecayAfterStepState as DecayAfterStepState
from lowrank_jax.optim.adam import ScaleByAdamHFState as ScaleByAdamHFState
from lowrank_jax.optim.adam import adamw_hf as adamw_hf
from lowrank_jax.optim.adam import add_decayed_weights_after_step as add_decayed_weights_after_step
from lowrank_jax.optim.adam import scale_by_adam_hf as scale_by_adam_hf
from lowrank_jax.optim.galore import GaLoreDimensionNumbers as GaLoreDimensionNumbers
from lowrank_jax.optim.galore import GaLoreProjector as GaLoreProjector
from lowrank_jax.optim.galore import ScaleByGaLoreState as ScaleByGaLoreState
from lowrank_jax.optim.galore import galore as galore
from lowrank_jax.optim.galore import scale_by_galore as scale_by_galore
from lowrank_jax.optim.lamda_freeze import LamdaFreezeState as LamdaFreezeState
from lowrank_jax.optim.lamda_freeze import lamda_freeze as lamda_freeze
from lowrank_jax.optim.lisa import ScaleByLisaState as ScaleByLisaState
from lowrank_jax.optim.lisa import lisa as lisa
from lowrank_jax.optim.lisa import scale_by_lisa as scale_by_lisa
from lowrank_jax.optim.lora_fa import lora_fa as lora_fa
from lowrank_jax.optim.lora_fa import lora_fa_labels as lora_fa_labels
from lowrank_jax.optim.lora_fa import scale_by_lora_fa as scale_by_lora_fa
from lowrank_jax.optim.lora_plus import lora_plus as lora_plus
from lowrank_jax.optim.offload import host_offload as host_offload
from lowrank_jax.optim.lora_plus import lora_plus_labels as lora_plus_labels
from lowrank_jax.optim.lora_pro import lora_pro as lora_pro
from lowrank_jax.optim.lora_pro import lora_pro_gradients as lora_pro_gradients
from lowrank_jax.optim.lora_pro import scale_by_lora_pro as scale_by_lora_pro

__all__ = [
    "DecayAfterStepState",
    "GaLoreDimensionNumbers",
    "GaLoreProjector",
    "LamdaFreezeState",
    "QuantizedMoment",
    "ScaleByAdamHFState",
    "ScaleByGaLoreState",
    "ScaleByLisaState",
    "adamw_hf",
    "add_decayed_weights_after_step",
    "galore",
    "host_offload",
    "lamda_freeze",
    "lisa",
    "lora_fa",
    "lora_fa_labels",
    "lora_plus",
    "lora_plus_labels",
    "lora_pro",
    "lora_pro_gradients",
    "scale_by_adam_hf",
    "scale_by_galore",
    "scale_by_lisa",
    "scale_by_lora_fa",
    "scale_by_lora_pro",
]
