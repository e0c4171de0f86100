"""lowrank_jax: low-rank fine-tuning and memory-saving methods for JAX and Flax.

Adapters are factories returning :class:`Adapter`, a NamedTuple of pure
functions over Flax params pytrees; bridges (:mod:`lowrank_jax.linen`,
:mod:`lowrank_jax.nnx`) run them in factored form inside unchanged models.
"""

from lowrank_jax import attention as attention
from lowrank_jax import grads as grads
from lowrank_jax import linalg as linalg
from lowrank_jax import linen as linen
from lowrank_jax import longlora as longlora
from lowrank_jax import nnx as nnx
from lowrank_jax import optim as optim
from lowrank_jax import quant as quant
from lowrank_jax.adapters.adalora import AdaLoraState as AdaLoraState
from lowrank_jax.adapters.adalora import adalora as adalora
from lowrank_jax.adapters.adalora import adalora_allocator as adalora_allocator
from lowrank_jax.adapters.base import Adapter as Adapter
from lowrank_jax.adapters.base import Leaf as Leaf
from lowrank_jax.adapters.base import freeze as freeze
from lowrank_jax.adapters.base import join as join
from lowrank_jax.adapters.base import split as split
from lowrank_jax.adapters.base import Site as Site
from lowrank_jax.adapters.combinators import combine as combine
from lowrank_jax.adapters.combinators import full_finetune as full_finetune
from lowrank_jax.adapters.bitfit import bitfit as bitfit
from lowrank_jax.adapters.dora import dora as dora
from lowrank_jax.adapters.dora import weight_norms as dora_weight_norms
from lowrank_jax.adapters.ia3 import ia3 as ia3
from lowrank_jax.adapters.lora import LoraGA as LoraGA
from lowrank_jax.adapters.lora import init_with_residual as init_with_residual
from lowrank_jax.adapters.lora import offset_to_plain_lora as offset_to_plain_lora
from lowrank_jax.adapters.lora import lora as lora
from lowrank_jax.adapters.lora import lora_scale as lora_scale
from lowrank_jax.adapters.vera import vera as vera
from lowrank_jax.sharding import adapter_shardings as adapter_shardings
from lowrank_jax.training import average_gradient as average_gradient
from lowrank_jax.training import make_train_step as make_train_step
from lowrank_jax.training import trainable_summary as trainable_summary
from lowrank_jax.tree import Layout as Layout
from lowrank_jax.tree import labels as labels
from lowrank_jax.tree import mask as mask

__version__ = "0.1.0"

__all__ = [
    "AdaLoraState",
    "Adapter",
    "Layout",
    "Leaf",
    "LoraGA",
    "Site",
    "adalora",
    "adalora_allocator",
    "adapter_shardings",
    "attention",
    "average_gradient",
    "bitfit",
    "combine",
    "dora",
    "dora_weight_norms",
    "freeze",
    "full_finetune",
    "grads",
    "ia3",
    "init_with_residual",
    "join",
    "labels",
    "linen",
    "longlora",
    "linalg",
    "lora",
    "lora_scale",
    "make_train_step",
    "mask",
    "nnx",
    "offset_to_plain_lora",
    "optim",
    "quant",
    "split",
    "trainable_summary",
    "vera",
]
