"""Weight, tokenizer and corpus loading for real pretrained models (no torch).

- :mod:`lowrank_jax.io.gguf`: llama.cpp GGUF files -> LLaMA Flax params.
- :mod:`lowrank_jax.io.hf_safetensors`: Hugging Face safetensors -> BERT Flax params.
- :mod:`lowrank_jax.io.tokenizer`: byte-level BPE (from GGUF metadata) and WordPiece
  (from ``tokenizer.json``) tokenizers in pure Python.
- :mod:`lowrank_jax.io.peft`: Hugging Face peft LoRA and IA3 adapter directories in and out.
- :mod:`lowrank_jax.io.peft_adalora`: peft AdaLoRA adapter directories in and out.
- :mod:`lowrank_jax.io.hf_names`: transformers' ``LlamaForCausalLM`` names of LLaMA params.
- :mod:`lowrank_jax.io.hf_checkpoint`: transformers checkpoint directories (LLaMA, Mistral, Qwen2)
  and GGUF files -> a :class:`~lowrank_jax.io.hf_checkpoint.Pretrained`, and back to a directory.

The submodules load lazily, on first attribute access (``lowrank_jax.io.gguf``) or
import (``from lowrank_jax.io import gguf``): ``gguf`` and ``hf_safetensors`` build
the reference models (:mod:`lowrank_jax.models`), which ``import lowrank_jax.io.peft``
does not load. Optional packages (``gguf``, ``safetensors``) are imported only when used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on demand
    from lowrank_jax.io import gguf as gguf
    from lowrank_jax.io import hf_checkpoint as hf_checkpoint
    from lowrank_jax.io import hf_names as hf_names
    from lowrank_jax.io import hf_safetensors as hf_safetensors
    from lowrank_jax.io import peft as peft
    from lowrank_jax.io import peft_adalora as peft_adalora
    from lowrank_jax.io import tokenizer as tokenizer

__all__ = ["gguf", "hf_checkpoint", "hf_names", "hf_safetensors", "peft", "peft_adalora", "tokenizer"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")  # also binds it as an attribute of this package
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
