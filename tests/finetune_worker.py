"""Worker process for tests/test_run_dir.py and tests/test_scale.py: the main job on a tiny random LLaMA
(SmolLM2's tokenizer).

Usage:
  python finetune_worker.py OUT_DIR STEPS [--resume] [--width D] [--method M] [--batch B] [--devices N]
                            [--mesh M] [--coordinator HOST:PORT --num-processes P --process-id I] [--remat R]

Runs :func:`lowrank_jax.finetune.finetune` (LoRA unless ``--method``, batch 1 unless ``--batch``,
seq_len 32) with progress lines on stderr; ``--width`` sets the hidden size (default 32): a wider
model's step takes long enough that a test's SIGINT lands while a step computes, as it does on a
real model. ``--devices N`` simulates N CPU devices (set before jax is imported); the other flags
are the main job's. Exits 130 on KeyboardInterrupt, like the command line. On success it writes
``OUT_DIR/final-<process id>.npz``: every adapter leaf and the losses.
"""

import os
import sys


def flag(name, default=None):
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


if flag("--devices"):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={flag('--devices')}"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lowrank_jax import finetune as ft  # noqa: E402
from lowrank_jax import tree as tree_lib  # noqa: E402
from lowrank_jax.io.tokenizer import smollm2_tokenizer  # noqa: E402
from lowrank_jax.models.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402

TINY = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, scan_layers=True)


def tiny_model(width: int = 32, scan_layers: bool = True):
    config = TINY.replace(hidden_size=width, intermediate_size=2 * width, scan_layers=scan_layers)
    model = LlamaForCausalLM(config)
    params = model.init(jax.random.key(7), np.zeros((1, 8), np.int32))["params"]
    return model, config, params, smollm2_tokenizer()


def config(out_dir, steps, resume, **changes):
    options = dict(steps=steps, batch=1, seq_len=32, eval_tokens=128, eval_window=64, save_every=100, warmup=2,
                   output_dir=out_dir, resume=resume, progress=True)
    return ft.FinetuneConfig(**{**options, **changes})


def main():
    out_dir, steps = sys.argv[1], int(sys.argv[2])
    resume = "--resume" in sys.argv
    scale = {"method": flag("--method", "lora"), "batch": int(flag("--batch", 1)), "mesh": flag("--mesh"),
             "coordinator": flag("--coordinator"), "num_processes": int(flag("--num-processes", 1)),
             "process_id": int(flag("--process-id", 0)), "remat": flag("--remat"),
             "save_every": int(flag("--save-every", 100))}
    cfg = config(out_dir, steps, resume, **scale)
    if cfg.coordinator:  # jax.distributed starts before anything touches the backend (the model's init)
        cfg.validate()
        ft.start_runtime(cfg)
    loaded = tiny_model(int(flag("--width", 32)), scan_layers=scale["method"] != "lamda++")  # as finetune.load_model
    try:
        summary = ft.finetune(cfg, loaded=loaded)
    except KeyboardInterrupt:
        sys.exit(130)
    except ft.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    index = scale["process_id"]
    if jax.process_count() == 1:
        recipe, trainable, _, _ = ft.restore_adapter(out_dir, loaded=loaded)
    else:
        trainable = None
    leaves = {path: np.asarray(leaf) for _, path, leaf in tree_lib.flatten_with_paths(trainable)} if trainable else {}
    np.savez(f"{out_dir}/final-{index}.npz", losses=np.asarray(summary["losses"], np.float64),
             perplexity_after=summary["perplexity_after"], **leaves)


if __name__ == "__main__":
    main()
