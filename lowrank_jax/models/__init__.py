"""Reference Flax (linen) models for real pretrained checkpoints.

- :mod:`lowrank_jax.models.llama`: LLaMA-family decoder (SmolLM2-135M via
  :func:`lowrank_jax.io.gguf.load_smollm2`).
- :mod:`lowrank_jax.models.bert`: BERT encoder + sentence-transformers pooling
  (all-MiniLM-L6-v2 via :func:`lowrank_jax.io.hf_safetensors.load_minilm`).

Every projection is a plain ``nn.Dense`` named as in the Hugging Face checkpoint,
so adapters target them by path, e.g. ``r".*/self_attn/(q_proj|v_proj)/kernel"``.
"""

from lowrank_jax.models import bert as bert
from lowrank_jax.models import llama as llama
from lowrank_jax.models.bert import BertConfig as BertConfig
from lowrank_jax.models.bert import BertModel as BertModel
from lowrank_jax.models.bert import sentence_embeddings as sentence_embeddings
from lowrank_jax.models.llama import LlamaConfig as LlamaConfig
from lowrank_jax.models.llama import LlamaForCausalLM as LlamaForCausalLM
from lowrank_jax.models.llama import generate as generate
from lowrank_jax.models.llama import init_cache as init_cache
from lowrank_jax.models.llama import mean_nll as mean_nll
from lowrank_jax.models.llama import perplexity as perplexity
from lowrank_jax.models.llama import stack_layers as stack_layers
from lowrank_jax.models.llama import unstack_layers as unstack_layers

__all__ = [
    "BertConfig", "BertModel", "LlamaConfig", "LlamaForCausalLM", "bert", "generate", "init_cache",
    "llama", "mean_nll", "perplexity", "sentence_embeddings", "stack_layers", "unstack_layers",
]
