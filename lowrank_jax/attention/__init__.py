"""Attention functions in the conventions of :func:`jax.nn.dot_product_attention`.

- :func:`s2_attention`: LongLoRA's shifted sparse attention (S2-Attn) on
  ``(BTNH)`` arrays with grouped-query attention, ``G/T`` of full attention's
  cost; :class:`S2Attention` binds its options as a hashable ``attention_fn``
  for :class:`lowrank_jax.models.llama.LlamaConfig`.
"""

from lowrank_jax.attention.s2 import VARIANTS as VARIANTS
from lowrank_jax.attention.s2 import S2Attention as S2Attention
from lowrank_jax.attention.s2 import resolve_group_size as resolve_group_size
from lowrank_jax.attention.s2 import s2_attention as s2_attention
from lowrank_jax.attention.s2 import s2_mask as s2_mask

__all__ = ["S2Attention", "VARIANTS", "resolve_group_size", "s2_attention", "s2_mask"]
