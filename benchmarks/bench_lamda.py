"""LaMDA's memory point on SmolLM2-135M: its train step against LoRA's at the same rank (issue 13).

Run from the repository root::

    python benchmarks/bench_lamda.py              # batch 1 x 128, attention targets, r = 8; ~3 min
    python benchmarks/bench_lamda.py --quick      # batch 1 x 64, 1 warm-up + 1 timed round
    python benchmarks/bench_lamda.py --tiny       # a small random LLaMA, no model package (the test)

It prints a table and writes ``benchmarks/results/lamda.json``.

*Model, step, FLOPs, memory*: as ``benchmarks/bench_methods.py`` (its ``_train_step``, ``time_steps``
and ``add_ratios``): SmolLM2's 30 blocks as one ``nn.scan``, the step
``lrj.make_train_step(loss_fn, optax.adamw(1e-4), adapter=adapter)`` jitted with the adapter tree
and optimizer state donated; FLOPs from XLA's ``cost_analysis`` of unscanned 1- and 2-block twins
extrapolated to 30 blocks, memory from ``memory_analysis`` of the scanned program.

*Methods* (same targets and rank ``r``): ``lrj.lora(r, alpha)`` (the baseline);
``lamda(r, alpha, max_steps)`` with ``lrj.optim.lamda_freeze`` around the same adamw (the official
gradient zeroing; A frozen, S [r, r] and B trainable); LoRA-FA's structure
``lrj.freeze(lrj.lora(r, alpha), {"a"})`` on plain adamw (also no gradient of A, but no S).

*No gradient of A*: per target and block LoRA's backward has ``dA = x^T dT``, ``2 T in r`` FLOPs
(``T`` tokens); LaMDA never forms it. The JSON records ``a_grad_flops_expected`` (that sum over the
targets and blocks) next to ``flops_saved`` (LoRA's step FLOPs minus the method's); LaMDA's extra
work, ``S B`` (``[r, r] x [r, out]``) and ``dS``, costs ``O(r^2 out)`` per target, independent of ``T``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import lowrank_jax as lrj
from _llama_common import cost, count_params, load  # benchmarks/_llama_common.py
from _machine import machine  # benchmarks/_machine.py
from _report import markdown_table, write_json  # benchmarks/_report.py
from bench_methods import _train_step, add_ratios, time_steps  # benchmarks/bench_methods.py
from lowrank_jax.adapters.lamda import lamda
from lowrank_jax.optim.lamda_freeze import lamda_freeze

RESULTS = Path(__file__).resolve().parent / "results" / "lamda.json"
CLAIM = "LaMDA paper / seed 003: up to 17.7x fewer trainable parameters than LoRA (DeBERTa-V3 on GLUE)"


@dataclasses.dataclass(frozen=True)
class Config:
    targets: str = "attention"
    rank: int = 8
    alpha: float = 16.0
    max_steps: int = 1000
    learning_rate: float = 1e-4
    batch: int = 1
    seq: int = 128
    warmup: int = 1
    runs: int = 3
    tiny: bool = False
    seed: int = 0

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


FULL = Config()
QUICK = dataclasses.replace(FULL, seq=64, warmup=1, runs=1)


def methods(cfg: Config, t: str):
    """``[(key, name, make(layouts) -> (adapter, optimizer), baseline)]``."""
    adamw = optax.adamw(cfg.learning_rate)

    def make_lamda(layouts):
        adapter = lamda(cfg.rank, cfg.alpha, t, cfg.max_steps, layouts=layouts)
        return adapter, lamda_freeze(adapter, adamw)

    return [
        ("lora", f"LoRA (r={cfg.rank}, alpha={cfg.alpha:g})",
         lambda lo: (lrj.lora(rank=cfg.rank, alpha=cfg.alpha, targets=t, layouts=lo), adamw), True),
        ("lamda", f"LaMDA (r={cfg.rank}, lamda_freeze)", make_lamda, False),
        ("lora_fa_structure", f"LoRA with a frozen (lrj.freeze, r={cfg.rank})",
         lambda lo: (lrj.freeze(lrj.lora(rank=cfg.rank, alpha=cfg.alpha, targets=t, layouts=lo), {"a"}), adamw), False),
    ]


def a_grad_flops(params, targets: str, layouts, tokens: int, rank: int) -> float:
    """``sum over targets and stacked layers of 2 * tokens * in * r``: the FLOPs of LoRA's ``dA = x^T dT``."""
    total = 0
    for t in lrj.tree.select_targets(params, targets, layouts):
        stack, ins, _ = t.layout.split(lrj.tree.shape_of(t.leaf))
        total += 2 * tokens * lrj.tree.prod(ins) * rank * lrj.tree.prod(stack)
    return float(total)


def build(cfg: Config, config, params, batch):
    from lowrank_jax.finetune import resolve_targets
    from lowrank_jax.models.llama import LlamaForCausalLM, unstack_layers

    t = resolve_targets(cfg.targets)
    ids = jnp.zeros((1, 8), jnp.int32)
    model = LlamaForCausalLM(config)
    layouts = lrj.linen.kernel_layouts(model, ids)
    variables = {"params": params}
    rng = jax.random.key(cfg.seed + 1)
    abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)  # noqa: E731
    unstacked = jax.eval_shape(unstack_layers, abstract(params))
    twins = []
    for n in (1, 2):  # unscanned twins, shapes only: XLA counts a scan body once
        model_n = LlamaForCausalLM(config.replace(scan_layers=False, num_hidden_layers=n))
        vars_n = {"params": {k: v for k, v in unstacked.items()
                             if not k.startswith("layers_") or int(k.removeprefix("layers_")) < n}}
        twins.append((model_n, lrj.linen.kernel_layouts(model_n, ids), vars_n))
    batch_shape = jax.ShapeDtypeStruct(batch.shape, batch.dtype)
    rng_shape = jax.eval_shape(lambda: jax.random.key(0))
    tokens = int(batch.shape[0] * (batch.shape[1] - 1))
    expected = a_grad_flops(params, t, layouts, tokens, cfg.rank)
    rows, runnable = [], []
    for key, name, make, baseline in methods(cfg, t):
        adapter, optimizer = make(layouts)
        lp = adapter.init(jax.random.key(cfg.seed), variables)
        trainable, frozen = lrj.split(adapter, lp)
        state = optimizer.init(trainable)
        row = {"key": key, "method": name, "targets": t, "baseline": baseline, "status": "ok",
               "trainable_params": count_params(trainable), "frozen_adapter_params": count_params(frozen),
               # once t >= r (step ceil(r * freeze_fraction * max_steps)) LaMDA's b is frozen whole: only s trains
               "trainable_params_after_b_frozen": count_params([v for kp, v in jax.tree_util.tree_flatten_with_path(trainable)[0]
                                                                if key != "lamda" or kp[-1].key == "s"])}
        t0 = time.perf_counter()
        compiled = jax.jit(_train_step(model, adapter, optimizer, 0.0), donate_argnums=(0, 1)).lower(
            lp, state, variables, batch, rng).compile()
        row["compile_s"] = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        row |= {"flops_scanned": float(cost(compiled).get("flops", float("nan"))),
                "argument_bytes": int(mem.argument_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes),
                "output_bytes": int(mem.output_size_in_bytes), "alias_bytes": int(mem.alias_size_in_bytes)}
        fs = []
        for model_n, layouts_n, vars_n in twins:
            adapter_n, optimizer_n = make(layouts_n)
            lp_n = jax.eval_shape(adapter_n.init, jax.random.key(cfg.seed), vars_n)
            state_n = jax.eval_shape(optimizer_n.init, lrj.split(adapter_n, lp_n)[0])
            c = jax.jit(_train_step(model_n, adapter_n, optimizer_n, 0.0)).lower(
                lp_n, state_n, vars_n, batch_shape, rng_shape).compile()
            fs.append(float(cost(c).get("flops", float("nan"))))
        row["flops_unscanned_1_2_blocks"] = fs
        row["flops"] = fs[0] + (config.num_hidden_layers - 1) * (fs[1] - fs[0])
        row["a_grad_flops_expected"] = 0.0 if key == "lora" else expected
        rows.append(row)
        runnable.append((compiled, (lp, state), variables))
        print(f"  compiled {name} ({row['compile_s']:.1f} s)", file=sys.stderr, flush=True)
    for row in rows:
        row["flops_saved"] = rows[0]["flops"] - row["flops"]
        row["lora_a_grad_flops"] = expected
    return rows, runnable


def format_table(rows) -> str:
    header = ["method", "trainable params", "LoRA / method params", "same, once b is frozen", "FLOPs x LoRA", "temp mem x LoRA",
              "time x LoRA", "MFLOP saved (LoRA dA)", "temp MiB"]
    base = rows[0]["trainable_params"]
    lines = [[r["method"], f"{r['trainable_params']:,}", f"{1 / r['params_x_lora']:.2f}x",
              f"{base / r['trainable_params_after_b_frozen']:.1f}x", f"{r['flops_x_lora']:.3f}",
              f"{r['temp_x_lora']:.3f}", f"{r.get('time_x_lora', float('nan')):.3f}",
              f"{r['flops_saved'] / 1e6:.2f} ({r['a_grad_flops_expected'] / 1e6:.2f})", f"{r['temp_bytes'] / 2**20:.1f}"]
             for r in rows]
    return markdown_table(header, lines)


def run(cfg: Config, *, out: Path | None = RESULTS, command: str | None = None) -> dict:
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    description, config, params, batch = load(cfg)
    rows, runnable = build(cfg, config, params, batch)
    time_steps(cfg, rows, runnable, batch)
    add_ratios(rows)
    result = {
        "command": command, "load_average": {"start": load_start, "end": os.getloadavg()},
        "config": dataclasses.asdict(cfg) | {"tokens": cfg.tokens, "model": description,
                                              "num_hidden_layers": config.num_hidden_layers,
                                              "optimizer": f"optax.adamw({cfg.learning_rate:g}); LaMDA: lamda_freeze(adapter, adamw)"},
        "machine": machine(), "rows": rows, "claim": CLAIM,
        "notes": ["FLOPs: unscanned 1- and 2-block twins extrapolated, f(L) = f(1) + (L - 1)(f(2) - f(1)); memory "
                  "and time: the scanned program. 'a_grad_flops_expected' = 2 * tokens * in * r summed over targets "
                  "and blocks: LoRA's dA, which LaMDA and frozen-A LoRA never compute."],
        "wall_s": time.perf_counter() - t_start,
    }
    write_json(out, result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="batch 1 x 64, 1 warm-up + 1 timed round")
    p.add_argument("--tiny", action="store_true", help="a small random LLaMA instead of SmolLM2 (no model package)")
    p.add_argument("--targets", default=None, help="a main-job preset (attention, all-linear, qv), a list or a regex")
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    for field in ("rank", "batch", "seq", "runs", "warmup", "max_steps"):
        p.add_argument(f"--{field.replace('_', '-')}", dest=field, type=int, default=None)
    a = p.parse_args(argv)
    cfg = dataclasses.replace(QUICK if a.quick else FULL, tiny=a.tiny)
    cfg = dataclasses.replace(cfg, **{k: v for k in ("targets", "rank", "batch", "seq", "runs", "warmup", "max_steps")
                                      if (v := getattr(a, k)) is not None})
    print(f"config: {cfg}", file=sys.stderr)
    command = " ".join(["python", "benchmarks/bench_lamda.py", *(sys.argv[1:] if argv is None else argv)])
    result = run(cfg, out=a.out, command=command)
    print(f"model: {result['config']['model']}; {cfg.batch} x {cfg.seq} tokens; load average "
          f"{result['load_average']['start'][0]:.2f} -> {result['load_average']['end'][0]:.2f}")
    print(format_table(result["rows"]))
    print(f"claim: {CLAIM}")
    for note in result["notes"]:
        print(note)
    if a.out is not None:
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
