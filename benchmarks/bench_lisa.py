"""LISA train-step cost: full fine-tuning with AdamW vs LISA (``keep`` and ``reset`` optimizer state).

Run from the repository root::

    python benchmarks/bench_lisa.py            # 8 scanned layers, d = 256 (about a minute)
    python benchmarks/bench_lisa.py --quick    # 4 scanned layers, d = 64 (seconds)

It prints a table and writes ``benchmarks/results/lisa.json`` (``--out`` to change it).

Model: :class:`lowrank_jax.models.llama.LlamaForCausalLM` with ``scan_layers=True`` (untied head),
random init and random tokens, float32; loss = next-token cross entropy. Every variant is the same
jitted step ``(params, opt_state, batch) -> (params, opt_state, loss)`` (no donation), compiled for
XLA's ``cost_analysis()`` FLOPs and ``memory_analysis()`` bytes; ratios are to ``full AdamW`` in the
same run (argument bytes hold the params, the optimizer state and the batch; temp bytes the
activations and gradients):

1. ``full AdamW``: ``optax.adamw(lr)`` over every parameter.
2. ``LISA keep``: ``lrj.optim.lisa(lr, n_layers, interval)`` (LMFlow's default: every layer's Adam
   moments kept, as torch keeps them once each layer has been sampled).
3. ``LISA reset``: ``state_on_switch="reset"``: Adam moments for ``n_layers`` slots only.

What to expect: no FLOP saving (the gradient of every layer is still computed: the sampled set is
data, not shape) and temp memory as full fine-tuning; ``reset`` saves ``2 (L - n) / L`` of the
layers' parameter bytes in the optimizer state (the argument bytes), ``keep`` saves nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _llama_common as common  # noqa: E402
from _machine import machine  # noqa: E402
from _report import markdown_table, memory_bytes, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "lisa.json"


@dataclasses.dataclass(frozen=True)
class Config:
    layers: int = 8
    hidden: int = 256
    intermediate: int = 512
    vocab: int = 512
    batch: int = 4
    seq: int = 128
    n_layers: int = 2
    interval: int = 20


FULL = Config()
QUICK = Config(layers=4, hidden=64, intermediate=128, vocab=128, batch=2, seq=32, n_layers=1)


def variants(cfg: Config):
    from lowrank_jax.optim.lisa import lisa

    lr = 1e-4
    return [("full AdamW", optax.adamw(lr)),
            ("LISA keep", lisa(lr, cfg.n_layers, cfg.interval)),
            ("LISA reset", lisa(lr, cfg.n_layers, cfg.interval, state_on_switch="reset"))]


def run(cfg: Config, out: Path | None = RESULTS) -> dict:
    from lowrank_jax.models.llama import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.tiny(scan_layers=True, tie_word_embeddings=False, num_hidden_layers=cfg.layers,
                              hidden_size=cfg.hidden, intermediate_size=cfg.intermediate, vocab_size=cfg.vocab)
    model = LlamaForCausalLM(config)
    batch = jax.random.randint(jax.random.key(2), (cfg.batch, cfg.seq + 1), 0, cfg.vocab, jnp.int32)
    params = jax.jit(model.init)(jax.random.key(1), batch[:, :-1])["params"]
    layer_bytes = sum(x.nbytes for x in jax.tree.leaves(params["layers"]))

    def loss_fn(p, tokens):
        return common.cross_entropy(model.apply({"params": p}, tokens[:, :-1]), tokens[:, 1:])

    rows = []
    for name, opt in variants(cfg):
        def step(p, state, tokens, opt=opt):
            loss, grads = jax.value_and_grad(loss_fn)(p, tokens)
            updates, state = opt.update(grads, state, p)
            return optax.apply_updates(p, updates), state, loss

        state = opt.init(params)
        compiled = jax.jit(step).lower(params, state, batch).compile()
        mem = compiled.memory_analysis()
        row = {"variant": name, "flops": float(common.cost(compiled).get("flops", 0.0)),
               "argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
               "temp_bytes": int(mem.temp_size_in_bytes), "alias_bytes": int(mem.alias_size_in_bytes),
               "opt_state_bytes": int(sum(x.nbytes for x in jax.tree.leaves(state)))}
        new_params, _, loss = compiled(params, state, batch)
        row["loss"] = float(loss)
        row["layers_changed"] = [bool(jnp.any(new_params["layers"]["mlp"]["up_proj"]["kernel"][i]
                                              != params["layers"]["mlp"]["up_proj"]["kernel"][i])) for i in range(cfg.layers)]
        rows.append(row)
    base = rows[0]
    for row in rows:
        for key in ("flops", "argument_bytes", "temp_bytes", "output_bytes", "opt_state_bytes"):
            row[key.replace("_bytes", "") + "_ratio"] = row[key] / base[key] if base[key] else float("nan")
        row["total_ratio"] = memory_bytes(row, "total") / memory_bytes(base, "total")
    expected_reset_saving = 2 * (cfg.layers - cfg.n_layers) / cfg.layers * layer_bytes
    result = {"config": dataclasses.asdict(cfg), "machine": machine(), "rows": rows, "layer_param_bytes": layer_bytes,
              "expected_reset_state_saving_bytes": expected_reset_saving,
              "measured_reset_state_saving_bytes": rows[1]["opt_state_bytes"] - rows[2]["opt_state_bytes"]}
    write_json(out, result)
    return result


def format_table(result: dict) -> str:
    header = ["variant", "FLOPs x", "argument x", "temp x", "output x", "total x", "opt state MB", "layers updated"]
    lines = [[r["variant"], f"{r['flops_ratio']:.3f}", f"{r['argument_ratio']:.3f}", f"{r['temp_ratio']:.3f}",
              f"{r['output_ratio']:.3f}", f"{r['total_ratio']:.3f}", f"{r['opt_state_bytes'] / 2**20:.2f}",
              str(sum(r["layers_changed"]))] for r in result["rows"]]
    return markdown_table(header, lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="4 layers, d = 64")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    result = run(QUICK if a.quick else FULL, a.out)
    print(format_table(result))
    print(f"reset saves {result['measured_reset_state_saving_bytes'] / 2**20:.2f} MB of optimizer state "
          f"(expected 2 (L - n) / L x layer params = {result['expected_reset_state_saving_bytes'] / 2**20:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
