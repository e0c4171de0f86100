"""Worker process for tests/test_run_dir.py: the main job on a tiny random LLaMA (SmolLM2's tokenizer).

Usage:
  python finetune_worker.py OUT_DIR STEPS [--resume] [--width D]

Runs :func:`lowrank_jax.finetune.finetune` (LoRA, batch 1, seq_len 32) with progress lines on
stderr; ``--width`` sets the hidden size (default 32): a wider model's step takes long enough
that a test's SIGINT lands while a step computes, as it does on a real model. Exits 130 on KeyboardInterrupt, like the command line. On success it writes
``OUT_DIR/final.npz``: every adapter leaf and the losses.
"""

import sys
import jax
import numpy as np

from lowrank_jax import finetune as ft
from lowrank_jax import tree as tree_lib
from lowrank_jax.io.tokenizer import smollm2_tokenizer
from lowrank_jax.models.llama import LlamaConfig, LlamaForCausalLM

TINY = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, scan_layers=True)


def tiny_model(width: int = 32):
    config = TINY.replace(hidden_size=width, intermediate_size=2 * width)
    model = LlamaForCausalLM(config)
    params = model.init(jax.random.key(7), np.zeros((1, 8), np.int32))["params"]
    return model, config, params, smollm2_tokenizer()


def config(out_dir, steps, resume):
    return ft.FinetuneConfig(steps=steps, batch=1, seq_len=32, eval_tokens=128, eval_window=64, save_every=100,
                             warmup=2, output_dir=out_dir, resume=resume, progress=True)


def main():
    out_dir, steps = sys.argv[1], int(sys.argv[2])
    resume = "--resume" in sys.argv
    width = int(sys.argv[sys.argv.index("--width") + 1]) if "--width" in sys.argv else 32
    loaded = tiny_model(width)
    try:
        summary = ft.finetune(config(out_dir, steps, resume), loaded=loaded)
    except KeyboardInterrupt:
        sys.exit(130)
    recipe, trainable, _, _ = ft.restore_adapter(out_dir, loaded=loaded)
    leaves = {path: np.asarray(leaf) for _, path, leaf in tree_lib.flatten_with_paths(trainable)}
    np.savez(f"{out_dir}/final.npz", losses=np.asarray(summary["losses"], np.float64), **leaves)


if __name__ == "__main__":
    main()
