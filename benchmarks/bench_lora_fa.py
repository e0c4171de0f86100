"""LoRA-FA train-step cost: LoRA + AdamW vs LoRA-FA with A trainable vs LoRA-FA with ``lrj.freeze``.

Run from the repository root::

    python benchmarks/bench_lora_fa.py            # ~4 min on 2 shared CPU cores
    python benchmarks/bench_lora_fa.py --quick    # same shapes, fewer timed rounds

It prints a table and writes ``benchmarks/results/lora_fa.json``.

Model and batch: exactly ``bench_lora.py``'s (imported from it): a stack of ``layers``
(6) bias-free Dense ``d -> d`` layers (d = 1024) with ReLU, input ``[4, 512, 1024]``,
loss = mean of the squared output, float32; LoRA r = 16, alpha = 32 on every kernel.
Families: ``linen`` (plain stack) and ``linen-scan`` (``nn.scan(nn.remat(Block))``).
Every step is ``lrj.make_train_step(loss_fn, optimizer, adapter=...)``, jitted, with
the adapter tree, the optimizer state, the base params, the batch and a key passed as
arguments. Variants (the first is each family's baseline):

1. ``LoRA + adamw``: ``lrj.lora`` and ``optax.adamw``.
2. ``LoRA-FA, A trainable``: the same ``lrj.lora`` adapter (A trainable) with
   ``lrj.optim.lora_fa``: A's gradient is computed, then its update is zeroed.
3. ``LoRA-FA, lrj.freeze(a)``: ``lrj.freeze(lora, {"a"})`` with ``lrj.optim.lora_fa``:
   ``make_train_step`` differentiates only ``b`` (``lrj.split`` / ``lrj.join``).
4. ``LoRA-FA, A trainable, no metrics``: variant 2 written as ``bench_lora``'s bare
   ``functional_step`` (no ``grad_norm`` metric), to see whether XLA's dead-code
   elimination alone removes the unused A gradient.

Measured per variant: XLA's FLOPs of the compiled step (``cost_analysis()``; for
``linen-scan`` also of the same step compiled with the scan unrolled, since XLA counts
a loop body once), ``memory_analysis()`` (temp, output, argument, alias bytes), the
number of ``dot_general`` equations in the step's jaxpr (recursing into scan / remat /
pjit bodies; static, so a scan body counts once), how many of them produce a
``[d, r]`` or ``[r, d]`` array from ``[batch, seq, .]`` operands (the factor gradients
``dA = x^T (g B^T)`` and ``dB = (x A)^T g``), the dot ops in the optimized HLO,
and the wall-clock: variants run round-robin, ``time x`` is the median over rounds of
(variant time / baseline time in the same round).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import statistics
import sys
import time
from pathlib import Path

import jax
import optax

import lowrank_jax as lrj
from _report import add_size_flags, markdown_table, memory_bytes, with_sizes, write_json  # benchmarks/_report.py
from _machine import machine  # benchmarks/_machine.py
from bench_lora import (  # benchmarks/bench_lora.py: the same model, input, loss and helpers
    FULL as LORA_FULL,
    Config,
    LinenScanStack,
    LinenStack,
    Variant,
    _cost,
    count_params,
    functional_step,
    interleaved_times,
    make_input,
    mse,
)

RESULTS = Path(__file__).resolve().parent / "results" / "lora_fa.json"
FULL = dataclasses.replace(LORA_FULL)
QUICK = dataclasses.replace(FULL, warmup=1, runs=3)
BASELINE = "LoRA + adamw"
OLD = "LoRA-FA, A trainable"
FROZEN = "LoRA-FA, lrj.freeze(a)"
OLD_BARE = "LoRA-FA, A trainable, no metrics"
LOOP_NOTE = (
    "linen-scan GFLOP: XLA's cost analysis counts a while-loop body once; in parentheses, the same step "
    "compiled with the scan unrolled (unroll=True), i.e. every layer (FLOPs only)."
)


# --------------------------------------------------------------------------- variants


def variants(cfg: Config, x, families=("linen", "linen-scan")) -> list[Variant]:
    out = []
    rng = jax.random.key(3)
    models = {
        "linen": (LinenStack(cfg.d, cfg.layers), None),
        "linen-scan": (LinenScanStack(cfg.d, cfg.layers), LinenScanStack(cfg.d, cfg.layers, unroll=True)),
    }
    for family in families:
        model, unrolled = models[family]
        variables = model.init(jax.random.key(1), x)
        lora = lrj.lora(rank=cfg.rank, alpha=cfg.alpha, targets=r".*/kernel",
                        layouts=lrj.linen.kernel_layouts(model, x))
        fa = lrj.freeze(lora, {"a"})
        lp = lora.init(jax.random.key(2), variables)  # freeze changes no init: the same tree for every variant
        adamw = optax.adamw(cfg.learning_rate)
        fa_opt = lrj.optim.lora_fa(cfg.learning_rate, lora)
        fa_opt_frozen = lrj.optim.lora_fa(cfg.learning_rate, fa)

        def train_step(m, adapter, opt):
            def loss_fn(adapter_params, params, batch, _rng):
                return mse(lrj.linen.apply(m, adapter, params, adapter_params, batch))

            return lrj.make_train_step(loss_fn, opt, adapter=adapter)

        def bare_step(m, adapter, opt):
            step = functional_step(lambda t, params, batch: mse(lrj.linen.apply(m, adapter, params, t, batch)), opt)
            return lambda t, s, params, batch, _rng: step(t, s, params, batch)

        specs = [
            (BASELINE, lora, adamw, train_step, True, count_params(lp)),
            (OLD, lora, fa_opt, train_step, False, count_params(lp)),
            (FROZEN, fa, fa_opt_frozen, train_step, False, count_params(lrj.split(fa, lp)[0])),
            (OLD_BARE, lora, fa_opt, bare_step, False, count_params(lp)),
        ]
        for name, adapter, opt, make, baseline, n in specs:
            twin = make(unrolled, adapter, opt) if unrolled is not None else None
            state = opt.init(lrj.split(adapter, lp)[0])  # optimizer state for the trainable leaves only
            out.append(Variant(family, name, make(model, adapter, opt), (lp, state, variables, x, rng),
                               baseline=baseline, trainable_params=n, unrolled_step=twin))
    return out


# --------------------------------------------------------------------------- measurement


def _sub_jaxprs(value):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def jaxpr_dots(jaxpr, d: int, r: int) -> tuple[int, int]:
    """``(all, factor_grads)``: ``dot_general`` equations in ``jaxpr`` and its sub-jaxprs, and those
    that contract activations (no operand is a ``[d, r]`` or ``[r, d]`` factor) into a ``[d, r]`` or
    ``[r, d]`` result: the gradients of the LoRA factors (``dA = x^T (g B^T)``, ``dB = (x A)^T g``, in
    either orientation, with the tokens flattened or not). Static counts: a scan body counts once."""
    n = n_g = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            n += 1
            shape = tuple(eqn.outvars[0].aval.shape)
            factor = ((d, r), (r, d))
            n_g += shape in factor and not any(tuple(v.aval.shape) in factor for v in eqn.invars)
        for v in eqn.params.values():
            for sub in _sub_jaxprs(v):
                dn, dg = jaxpr_dots(sub, d, r)
                n, n_g = n + dn, n_g + dg
    return n, n_g


_HLO_DOT = re.compile(r"\b(dot|convolution)\(")


def compile_stats(v: Variant, cfg: Config):
    t0 = time.perf_counter()
    compiled = jax.jit(v.step).lower(*v.args).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    dots, grad_dots = jaxpr_dots(jax.make_jaxpr(v.step)(*v.args).jaxpr, cfg.d, cfg.rank)
    stats = {
        "family": v.family,
        "variant": v.name,
        "baseline": v.baseline,
        "trainable_params": v.trainable_params,
        "flops": float(_cost(compiled).get("flops", float("nan"))),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "jaxpr_dot_generals": dots,
        "jaxpr_factor_grad_dots": grad_dots,
        "hlo_dots": len(_HLO_DOT.findall(compiled.as_text())),
        "compile_s": compile_s,
    }
    if v.unrolled_step is not None:
        twin = jax.jit(v.unrolled_step).lower(*v.args).compile()
        stats["flops_unrolled"] = float(_cost(twin).get("flops", float("nan")))
    return compiled, stats


def _loss(out):
    return float(out[2]["loss"] if isinstance(out[2], dict) else out[2])


def run_jax(cfg: Config, families=("linen", "linen-scan")) -> list[dict]:
    vs = variants(cfg, make_input(cfg), families)
    compiled, rows = [], []
    for v in vs:
        c, stats = compile_stats(v, cfg)
        compiled.append(c)
        rows.append(stats)
        print(f"  compiled {v.family:10s} {v.name}", file=sys.stderr, flush=True)
    fns = [lambda c=c, v=v: jax.block_until_ready(c(*v.args)) for c, v in zip(compiled, vs)]
    times = interleaved_times(fns, cfg.warmup, cfg.runs)
    for row, t, c, v in zip(rows, times, compiled, vs):
        row["time_s"] = statistics.median(t)
        row["times_s"] = t
        out = c(*v.args)
        row["loss"] = _loss(out)
    return rows


def add_ratios(rows: list[dict]) -> list[dict]:
    """Adds ``*_ratio`` fields: each row against its family's baseline (LoRA + adamw)."""
    base = {r["family"]: r for r in rows if r["baseline"]}
    for r in rows:
        b = base[r["family"]]
        r["time_ratio"] = statistics.median(t / tb for t, tb in zip(r["times_s"], b["times_s"]))
        r["time_ratio_min"] = min(r["times_s"]) / min(b["times_s"])
        r["flops_ratio"] = r["flops"] / b["flops"]
        r["temp_ratio"] = r["temp_bytes"] / b["temp_bytes"] if b["temp_bytes"] else float("nan")
        r["output_ratio"] = r["output_bytes"] / b["output_bytes"]
        r["mem_ratio"] = memory_bytes(r, "temp+out") / memory_bytes(b, "temp+out")
        r["total_mem_ratio"] = memory_bytes(r, "total") / memory_bytes(b, "total")
        if "flops_unrolled" in r and "flops_unrolled" in b:
            r["flops_unrolled_ratio"] = r["flops_unrolled"] / b["flops_unrolled"]
    return rows


def format_table(rows: list[dict]) -> str:
    header = ("family", "variant", "GFLOP", "FLOPs x", "temp MiB", "temp x", "out MiB", "out x", "temp+out x",
              "total MiB", "total x", "jaxpr dots (dA+dB)", "HLO dots", "median ms", "time x", "min x")
    lines = []
    mib = lambda v: f"{v / 2**20:.1f}"  # noqa: E731
    for r in rows:
        gflop = f"{r['flops'] / 1e9:.2f}"
        ratio = f"{r['flops_ratio']:.3f}"
        if "flops_unrolled" in r:
            gflop += f" ({r['flops_unrolled'] / 1e9:.2f})"
            ratio += f" ({r['flops_unrolled_ratio']:.3f})"
        lines.append((
            r["family"], r["variant"], gflop, ratio, mib(r["temp_bytes"]), f"{r['temp_ratio']:.3f}",
            mib(r["output_bytes"]), f"{r['output_ratio']:.3f}", f"{r['mem_ratio']:.3f}", mib(memory_bytes(r, "total")),
            f"{r['total_mem_ratio']:.3f}", f"{r['jaxpr_dot_generals']} ({r['jaxpr_factor_grad_dots']})",
            str(r["hlo_dots"]), f"{1e3 * r['time_s']:.0f}", f"{r['time_ratio']:.3f}", f"{r['time_ratio_min']:.3f}",
        ))
    return markdown_table(header, lines)


def check_expectations(rows: list[dict]) -> list[str]:
    """The expected orderings (any size), as PASS/FAIL lines."""
    by = {(r["family"], r["variant"]): r for r in rows}
    out = []
    for family in sorted({r["family"] for r in rows}):
        old, frz = by.get((family, OLD)), by.get((family, FROZEN))
        if old is None or frz is None:
            continue
        items = [
            (f"{FROZEN}: flops_ratio", frz["flops_ratio"], "<", 1.0),
            (f"{FROZEN}: flops < {OLD}", frz["flops"] / old["flops"], "<", 1.0),
            (f"{FROZEN}: temp_ratio", frz["temp_ratio"], "<", 1.0),
            # one factor gradient (dB) per layer instead of two (dA, dB)
            (f"{FROZEN}: jaxpr factor-gradient dots vs {OLD}",
             frz["jaxpr_factor_grad_dots"] / old["jaxpr_factor_grad_dots"], "==", 0.5),
        ]
        if "flops_unrolled_ratio" in frz:
            items.insert(1, (f"{FROZEN}: flops_unrolled_ratio", frz["flops_unrolled_ratio"], "<", 1.0))
        for label, value, op, bound in items:
            ok = value < bound if op == "<" else value == bound
            out.append(f"{'PASS' if ok else 'FAIL'}: {family} / {label} = {value:.4f} {op} {bound}")
    return out


def run(cfg: Config, *, out: Path | None = RESULTS, command: str | None = None,
        families=("linen", "linen-scan")) -> dict:
    load_start = os.getloadavg()
    rows = add_ratios(run_jax(cfg, families))
    result = {
        "command": command,
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "config": dataclasses.asdict(cfg) | {"tokens": cfg.tokens, "bias": False, "activation": "relu",
                                            "loss": "mean(y**2)", "baseline_optimizer": "adamw",
                                            "lora_fa_optimizer": "lrj.optim.lora_fa"},
        "machine": machine(),
        "rows": rows,
        "notes": [LOOP_NOTE] if any("flops_unrolled" in r for r in rows) else [],
        "checks": check_expectations(rows),
    }
    write_json(out, result)
    return result


#: The config fields the command line can override.
SIZES = ("d", "layers", "batch", "seq", "rank", "runs", "warmup")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"{QUICK.warmup} warm-up + {QUICK.runs} timed runs")
    p.add_argument("--no-scan", action="store_true", help="skip the nn.scan(nn.remat(...)) family")
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    add_size_flags(p, SIZES)
    a = p.parse_args(argv)
    cfg = QUICK if a.quick else FULL
    cfg = with_sizes(cfg, a, SIZES)
    print(f"config: {cfg}  tokens={cfg.tokens}", file=sys.stderr)
    command = " ".join(["python", "benchmarks/bench_lora_fa.py", *(sys.argv[1:] if argv is None else argv)])
    families = ("linen",) if a.no_scan else ("linen", "linen-scan")
    result = run(cfg, out=a.out, command=command, families=families)
    print(format_table(result["rows"]))
    for line in result["notes"] + result["checks"]:
        print(line)
    if a.out is not None:
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
