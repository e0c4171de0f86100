"""Why LongLoRA's first training loss is far above every other method's, measured on SmolLM2.

Part 1, one batch, no training (the base model, LoRA B = 0): the loss of the first training batch
of the main job (batch 4 x 128 tokens of Shakespeare) under full causal attention, S2-Attn
(``no_wrap``, the default, and ``roll``, the reference's), S2-Attn computed densely from
:func:`lowrank_jax.attention.s2_mask` (the same pattern the slow way), groups of G = T/4 without
and with the shift in every head, and S2-Attn and plain groups with token 0 (the "attention sink"
of Xiao et al., 2023, arXiv:2309.17453) visible to every query. Part 2, a short run of the main job's LongLoRA recipe twice: trained under S2-Attn (the
method) and under full attention, the same data and seed; training losses and the held-out
perplexity (full attention for both).

    python benchmarks/bench_longlora_loss.py [--steps 30] [--out benchmarks/results/longlora_loss.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _report import markdown_table, write_json  # noqa: E402

from lowrank_jax import finetune as ft  # noqa: E402
from lowrank_jax import longlora  # noqa: E402
from lowrank_jax.attention import S2Attention, s2_mask  # noqa: E402
from lowrank_jax.models.llama import LlamaForCausalLM  # noqa: E402


class MaskedAttention:
    """Full attention restricted to a fixed ``[N, T, T]`` (or ``[T, T]``) boolean pattern; hashable by name."""

    def __init__(self, name, pattern):
        self.name, self.pattern = name, jnp.asarray(pattern)

    def __hash__(self):
        return hash(self.name)

    def __eq__(self, other):
        return isinstance(other, MaskedAttention) and other.name == self.name

    def __call__(self, query, key, value, *, mask=None, is_causal=True, **unused):
        allowed = self.pattern if self.pattern.ndim == 3 else self.pattern[None]
        allowed = allowed[None] if mask is None else allowed[None] & mask
        return jax.nn.dot_product_attention(query, key, value, mask=allowed)


def first_batch_losses(loaded, cfg) -> list[dict]:
    model, config, params, tok = loaded
    train, _ = ft.load_text_tokens(cfg, tok, cfg.steps * cfg.batch * (cfg.seq_len + 1))
    batch = ft.batches(train, cfg)(0)
    x, y = jnp.asarray(batch[:, :-1]), jnp.asarray(batch[:, 1:])
    t, heads, group = cfg.seq_len, config.num_attention_heads, cfg.seq_len // 4
    causal = np.tril(np.ones((t, t), bool))
    local = causal & (np.arange(t)[:, None] // group == np.arange(t)[None] // group)
    s2 = s2_mask(t, heads, group_size=group)
    first_token = causal & (np.arange(t)[None] == 0)  # every query may see token 0 (the "attention sink")
    patterns = {
        "full causal attention": None,
        "S2-Attn no_wrap (default)": S2Attention(),
        "S2-Attn roll (the reference's)": S2Attention(variant="roll"),
        "S2-Attn no_wrap, dense under s2_mask": MaskedAttention("s2", s2),
        f"groups of {group}, no shift (all heads)": MaskedAttention("local", local),
        f"groups of {group}, shifted by {group // 2} (all heads)": MaskedAttention("shifted", np.broadcast_to(s2[-1], s2.shape)),
        "S2-Attn no_wrap + token 0 visible to all": MaskedAttention("s2+sink", s2 | first_token[None]),
        f"groups of {group}, no shift + token 0 visible": MaskedAttention("local+sink", local | first_token),
    }
    rows = []
    for name, fn in patterns.items():
        logits = LlamaForCausalLM(config.replace(attention_fn=fn)).apply({"params": params}, x)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        nll = -np.asarray(jnp.take_along_axis(logp, y[..., None], -1)[..., 0]).mean(0)
        rows.append({"attention": name, "loss": float(nll.mean()),
                     "loss_by_group": [float(nll[i:i + group].mean()) for i in range(0, t, group)]})
        print(f"{name:44s} {rows[-1]['loss']:.3f}", flush=True)
    return rows


def short_runs(loaded, steps: int) -> dict:
    out = {}
    configure = longlora.configure
    for name in ("S2-Attn", "full attention"):
        if name == "full attention":  # the same recipe with training attention left full
            longlora.configure = lambda config, target_len, **kw: (lambda pair: (pair[1], pair[1]))(configure(config, target_len, **kw))
        try:
            with tempfile.TemporaryDirectory() as tmp:
                cfg = ft.FinetuneConfig(method="longlora", steps=steps, output_dir=f"{tmp}/run", progress=False)
                summary = ft.finetune(cfg, loaded=loaded)
        finally:
            longlora.configure = configure
        out[name] = {k: summary[k] for k in ("losses", "perplexity_before", "perplexity_after")}
        print(f"{name}: loss {summary['losses'][0]:.3f} -> {summary['losses'][-1]:.3f}, held-out perplexity "
              f"{summary['perplexity_before']:.2f} -> {summary['perplexity_after']:.2f}", flush=True)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "longlora_loss.json")
    args = parser.parse_args(argv)
    cfg = ft.FinetuneConfig(method="longlora", steps=args.steps)
    cfg.validate()
    loaded = ft.load_model(cfg)
    first = first_batch_losses(loaded, cfg)
    print(markdown_table(["attention on the first batch (base model)", "loss", "by group of 32 tokens"],
                         [[r["attention"], f"{r['loss']:.3f}", " ".join(f"{v:.2f}" for v in r["loss_by_group"])]
                          for r in first]))
    runs = short_runs(loaded, args.steps)
    lines = []
    for name, r in runs.items():
        losses = r["losses"]
        last = float(np.mean(losses[-5:]))
        lines.append([name, f"{losses[0]:.3f}", f"{last:.3f}", f"{r['perplexity_before']:.2f}", f"{r['perplexity_after']:.2f}"])
    print(markdown_table(["trained under", "first loss", "mean of last 5", "held-out ppl before", "after"], lines))
    write_json(args.out, {"steps": args.steps, "first_batch": first, "runs": runs,
                          "jax": jax.__version__, "backend": jax.default_backend()})


if __name__ == "__main__":
    main()
