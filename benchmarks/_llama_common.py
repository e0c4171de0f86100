"""Helpers shared by the LLaMA benchmarks (bench_dora, bench_methods): the model and tokens, the loss, XLA's costs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def load(cfg):
    """``(description, config, params, batch)``: SmolLM2 and Shakespeare tokens, or a tiny random LLaMA."""
    from lowrank_jax.models.llama import LlamaConfig, LlamaForCausalLM

    if cfg.tiny:
        config = LlamaConfig.tiny(scan_layers=True, num_hidden_layers=3)
        params = LlamaForCausalLM(config).init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"]
        batch = jax.random.randint(jax.random.key(2), (cfg.batch, cfg.seq + 1), 0, config.vocab_size, jnp.int32)
        return "tiny random LLaMA (LlamaConfig.tiny, 3 scanned layers), random tokens", config, params, batch
    from lowrank_jax import finetune
    from lowrank_jax.io import gguf, tokenizer

    config, params = gguf.load_smollm2(scan_layers=True)
    fcfg = finetune.FinetuneConfig(batch=cfg.batch, seq_len=cfg.seq, steps=1, eval_tokens=256, eval_window=256)
    train, _ = finetune.load_text_tokens(fcfg, tokenizer.smollm2_tokenizer(), cfg.batch * (cfg.seq + 1))
    batch = jnp.asarray(finetune.batches(train, fcfg)(0))
    return ("SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32), Shakespeare tokens", config, params, batch)


def cross_entropy(logits, targets):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return cost or {}
