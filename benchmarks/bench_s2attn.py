"""S2-Attn vs full causal attention: XLA FLOPs, compiled temp memory and wall time (forward + backward).

Run from the repository root::

    python benchmarks/bench_s2attn.py                    # 2k, 4k, 8k, 16k tokens, ~11 min on 2 shared cores
    python benchmarks/bench_s2attn.py --lengths 2048 4096 --runs 1

It prints a table and writes ``benchmarks/results/s2attn.json`` and the plot
``benchmarks/results/s2attn.png`` (ratio to full attention vs sequence length).

Workload: one attention call on ``q, k, v`` of shape ``[B, T, N, H]`` =
``[1, T, 8, 64]`` (float32, multi-head: K = N), differentiated: the jitted step
is ``grad(sum(attention(q, k, v) * ct), (q, k, v))``, i.e. the forward pass plus
the backward pass of a training step, with ``q, k, v, ct`` all arguments.
Variants at each length T:

* ``full``: ``jax.nn.dot_product_attention(q, k, v, is_causal=True)`` (XLA; the
  default attention of the reference LLaMA model);
* ``s2 no_wrap`` / ``s2 roll``: ``lrj.attention.s2_attention`` with
  ``G = T * group_size_ratio`` (``T/4``, the paper's setting).

Measured: XLA's FLOP count of the compiled step (``cost_analysis()["flops"]``;
also of the forward alone), its temp memory (``memory_analysis()``), whether any array in the optimized
HLO has a trailing ``T x T`` shape (a full score matrix), and the
median wall-clock of ``runs`` calls after ``warmup`` calls, each as a ratio to
``full`` at the same T in the same run (variants run round-robin, one call each
per round; the time ratio is the median of the per-round ratios, so a change in
machine load affects both sides of a ratio alike). S2-Attn's expected ratio is ``G/T``.
Compiling allocates nothing, so FLOPs and memory are reported at every length;
a step is only *run* when its compiled footprint (temp + arguments + outputs)
fits in ``--mem-budget-gb`` (default: half of MemAvailable at start), so full
attention at 16k (T x T scores per head: 8.6 GB per f32 copy) may be reported
from compilation only, with a note.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from lowrank_jax.attention import resolve_group_size, s2_attention  # noqa: E402
from lowrank_jax.plot import line_plot  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "s2attn.json"
PLOT = ROOT / "benchmarks" / "results" / "s2attn.png"
VARIANTS = ("full", "s2 no_wrap", "s2 roll")


@dataclasses.dataclass(frozen=True)
class Config:
    lengths: tuple[int, ...] = (2048, 4096, 8192, 16384)
    batch: int = 1
    heads: int = 8
    kv_heads: int | None = None       # None: = heads (multi-head attention)
    head_dim: int = 64
    group_size_ratio: float = 0.25
    dtype: str = "float32"
    runs: int = 3
    warmup: int = 1
    mem_budget_gb: float | None = None


def mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def attention_fn(variant: str, cfg: Config):
    if variant == "full":
        return functools.partial(jax.nn.dot_product_attention, is_causal=True)
    return functools.partial(s2_attention, group_size_ratio=cfg.group_size_ratio, variant=variant.split()[1])


def make_steps(attn):
    def loss(q, k, v, ct):
        return jnp.sum((attn(q, k, v) * ct).astype(jnp.float32))

    train = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    forward = jax.jit(attn)
    return train, forward


def flops_of(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost["flops"])


def compile_row(variant: str, cfg: Config, seq_len: int, budget: float):
    """Compiles one variant's step; returns ``(row, compiled, shapes)`` (nothing is allocated)."""
    kv = cfg.kv_heads or cfg.heads
    dtype = jnp.dtype(cfg.dtype)
    q_spec = jax.ShapeDtypeStruct((cfg.batch, seq_len, cfg.heads, cfg.head_dim), dtype)
    kv_spec = jax.ShapeDtypeStruct((cfg.batch, seq_len, kv, cfg.head_dim), dtype)
    train, forward = make_steps(attention_fn(variant, cfg))
    t0 = time.perf_counter()
    compiled = train.lower(q_spec, kv_spec, kv_spec, q_spec).compile()
    compile_s = time.perf_counter() - t0
    fwd_compiled = forward.lower(q_spec, kv_spec, kv_spec).compile()
    mem = compiled.memory_analysis()
    row = {
        "seq_len": seq_len, "variant": variant,
        "group_size": None if variant == "full" else resolve_group_size(seq_len, None, cfg.group_size_ratio),
        "flops": flops_of(compiled), "flops_fwd": flops_of(fwd_compiled),
        # does any array of the optimized program have a T x T (score-matrix-sized) trailing shape?
        "full_score_matrix": f"{seq_len},{seq_len}]" in compiled.as_text(),
        "temp_bytes": int(mem.temp_size_in_bytes), "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes), "compile_s": compile_s,
        "time_s": None, "times_s": [], "timed": False,
    }
    row["footprint_bytes"] = row["temp_bytes"] + row["argument_bytes"] + row["output_bytes"]
    if row["footprint_bytes"] > budget:
        row["not_timed_reason"] = (f"compiled footprint {row['footprint_bytes'] / 1e9:.1f} GB exceeds the run budget "
                                   f"{budget / 1e9:.1f} GB: FLOPs and memory from compilation only")
    return row, compiled, (q_spec, kv_spec, kv_spec, q_spec)


def measure_length(cfg: Config, seq_len: int, budget: float) -> list[dict]:
    """All variants at one length: compile each, then time the ones that fit round-robin (one call of each
    variant per round), so each round's ratio to ``full`` is taken under the same machine load."""
    compiled = [compile_row(variant, cfg, seq_len, budget) for variant in VARIANTS]
    runnable = [(row, fn, shapes) for row, fn, shapes in compiled if "not_timed_reason" not in row]
    if runnable:
        shapes = runnable[0][2]
        keys = jax.random.split(jax.random.key(seq_len), len(shapes))
        args = [jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, shapes)]
        for _ in range(cfg.warmup):
            for _, fn, _ in runnable:
                jax.block_until_ready(fn(*args))
        for _ in range(cfg.runs):
            for row, fn, _ in runnable:
                t = time.perf_counter()
                jax.block_until_ready(fn(*args))
                row["times_s"].append(time.perf_counter() - t)
        del args
        gc.collect()
    for row, _, _ in runnable:
        row.update(time_s=statistics.median(row["times_s"]), timed=True)
    return [row for row, _, _ in compiled]


def add_ratios(rows: list[dict]) -> list[dict]:
    """Ratios of each row to ``full`` at the same sequence length."""
    full = {r["seq_len"]: r for r in rows if r["variant"] == "full"}
    for r in rows:
        base = full.get(r["seq_len"])
        if base is None:
            continue
        r["flops_ratio"] = r["flops"] / base["flops"]
        r["flops_fwd_ratio"] = r["flops_fwd"] / base["flops_fwd"]
        r["temp_ratio"] = r["temp_bytes"] / base["temp_bytes"] if base["temp_bytes"] else None
        r["time_ratio"] = None
        if r["timed"] and base["timed"]:  # median over rounds of the per-round ratio (same machine load)
            r["time_ratio"] = statistics.median(a / b for a, b in zip(r["times_s"], base["times_s"]))
        if r["group_size"]:
            r["expected_ratio"] = r["group_size"] / r["seq_len"]
    return rows


def check_expectations(rows: list[dict]) -> list[str]:
    """S2-Attn's FLOPs and temp memory near G/T of full attention (within +-0.05 for FLOPs, +0.1 for memory)."""
    out = []
    for r in rows:
        if r["variant"] == "full" or "flops_ratio" not in r:
            continue
        g_t = r["expected_ratio"]
        ok = abs(r["flops_ratio"] - g_t) <= 0.05
        out.append(f"{'PASS' if ok else 'FAIL'}: T={r['seq_len']} {r['variant']}: flops_ratio = "
                   f"{r['flops_ratio']:.3f}, G/T = {g_t:.3f}")
        if r["temp_ratio"] is not None:
            ok = r["temp_ratio"] <= g_t + 0.1
            out.append(f"{'PASS' if ok else 'FAIL'}: T={r['seq_len']} {r['variant']}: temp_ratio = "
                       f"{r['temp_ratio']:.3f} <= G/T + 0.1")
    return out


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def format_table(rows: list[dict]) -> str:
    lines = ["| T | G | variant | GFLOP fwd+bwd (ratio) | GFLOP fwd (ratio) | temp MB (ratio) | time s (ratio) "
             "| T x T array |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['seq_len']} | {r['group_size'] or '-'} | {r['variant']} | {r['flops'] / 1e9:.1f} "
            f"({_fmt(r.get('flops_ratio'), '.3f')}) | {r['flops_fwd'] / 1e9:.1f} ({_fmt(r.get('flops_fwd_ratio'), '.3f')}) "
            f"| {r['temp_bytes'] / 1e6:.0f} ({_fmt(r.get('temp_ratio'), '.3f')}) "
            f"| {_fmt(r['time_s'], '.3f') if r['timed'] else 'not run'} ({_fmt(r.get('time_ratio'), '.3f')}) "
            f"| {'yes' if r['full_score_matrix'] else 'no'} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    lengths = sorted({r["seq_len"] for r in rows})
    by = {(r["seq_len"], r["variant"]): r for r in rows}

    def series(variant, field):
        return [by[(t, variant)].get(field) if by[(t, variant)].get(field) is not None else float("nan")
                for t in lengths]

    # the roll variant's ratios are within 0.02 of no_wrap's (see the table); the plot has four colours
    line_plot(path, {
        "full attention": [1.0] * len(lengths),
        "S2-Attn FLOPs (XLA)": series("s2 no_wrap", "flops_ratio"),
        "S2-Attn temp memory": series("s2 no_wrap", "temp_ratio"),
        "S2-Attn wall time": series("s2 no_wrap", "time_ratio"),
    }, [t / 1024 for t in lengths], title="S2-Attn (no_wrap, G = T/4) vs full causal attention, forward + backward",
        xlabel="tokens (k)", ylabel="ratio to full attention", log2_x=True)


def run(cfg: Config, *, out: Path | None, plot_path: Path | None, command: str) -> dict:
    avail = mem_available_bytes()
    budget = cfg.mem_budget_gb * 1e9 if cfg.mem_budget_gb is not None else (avail / 2 if avail else 8e9)
    rows, notes = [], []
    load_start = os.getloadavg()
    for t in cfg.lengths:
        for row in measure_length(cfg, t, budget):
            rows.append(row)
            print(f"T={t} {row['variant']}: {row['flops'] / 1e9:.1f} GFLOP, temp {row['temp_bytes'] / 1e6:.0f} MB, "
                  f"time {_fmt(row['time_s'], '.3f')} s", file=sys.stderr, flush=True)
            if not row["timed"]:
                notes.append(f"T={t} {row['variant']}: not run ({row['not_timed_reason']})")
    rows = add_ratios(rows)
    checks = check_expectations(rows)
    result = {
        "command": command,
        "config": dataclasses.asdict(cfg),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
                    "backend": jax.default_backend(), "mem_available_bytes": avail, "run_budget_bytes": budget,
                    "load_average_start": load_start, "load_average_end": os.getloadavg()},
        "rows": rows, "checks": checks, "notes": notes,
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    if plot_path is not None:
        plot(rows, plot_path)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=list(Config.lengths))
    p.add_argument("--batch", type=int, default=Config.batch)
    p.add_argument("--heads", type=int, default=Config.heads)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=Config.head_dim)
    p.add_argument("--group-size-ratio", type=float, default=Config.group_size_ratio)
    p.add_argument("--dtype", default=Config.dtype, choices=["float32", "bfloat16"])
    p.add_argument("--runs", type=int, default=Config.runs)
    p.add_argument("--warmup", type=int, default=Config.warmup)
    p.add_argument("--mem-budget-gb", type=float, default=None,
                   help="run a step only if its compiled footprint fits (default: half of MemAvailable)")
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    p.add_argument("--plot", type=Path, default=PLOT, help="PNG output path")
    a = p.parse_args(argv)
    cfg = Config(lengths=tuple(a.lengths), batch=a.batch, heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim,
                 group_size_ratio=a.group_size_ratio, dtype=a.dtype, runs=a.runs, warmup=a.warmup,
                 mem_budget_gb=a.mem_budget_gb)
    print(f"config: {cfg}", file=sys.stderr)
    command = " ".join(["python", "benchmarks/bench_s2attn.py", *(sys.argv[1:] if argv is None else argv)])
    result = run(cfg, out=a.out, plot_path=a.plot, command=command)
    print(format_table(result["rows"]))
    for line in result["notes"] + result["checks"]:
        print(line)
    for path in (a.out, a.plot):
        if path is not None:
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
