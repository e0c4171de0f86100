"""Weight, tokenizer and corpus loading for real pretrained models (no torch).

- :mod:`lowrank_jax.io.gguf`: llama.cpp GGUF files -> LLaMA Flax params.
- :mod:`lowrank_jax.io.hf_safetensors`: Hugging Face safetensors -> BERT Flax params.
- :mod:`lowrank_jax.io.tokenizer`: byte-level BPE (from GGUF metadata) and WordPiece
  (from ``tokenizer.json``) tokenizers in pure Python.
- :mod:`lowrank_jax.io.peft`: Hugging Face peft LoRA adapter directories in and out.
- :mod:`lowrank_jax.io.hf_names`: transformers' ``LlamaForCausalLM`` names of LLaMA params.

Optional packages (``gguf``, ``safetensors``) are imported only when used.
"""

from lowrank_jax.io import gguf as gguf
from lowrank_jax.io import hf_names as hf_names
from lowrank_jax.io import hf_safetensors as hf_safetensors
from lowrank_jax.io import peft as peft
from lowrank_jax.io import tokenizer as tokenizer

__all__ = ["gguf", "hf_names", "hf_safetensors", "peft", "tokenizer"]
