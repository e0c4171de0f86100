"""PiSSA init on every SmolLM2-135M linear kernel: exact SVD vs fast randomized SVD (time and error).

Run from the repository root::

    python benchmarks/bench_pissa.py                  # rank 8, niter 2 / 4 / 16; the exact SVD takes minutes per call
    python benchmarks/bench_pissa.py --ranks 8 16 64  # more ranks (the exact SVD costs the same at every rank)
    python benchmarks/bench_pissa.py --quick          # 1 timed run per init
    python benchmarks/bench_pissa.py --tiny           # a small random LLaMA instead of SmolLM2 (smoke test)

It prints a table and writes ``benchmarks/results/pissa.json``.

*Targets.* The main job's: q, k, v, o, gate, up, down of SmolLM2-135M-Instruct's 30
scanned blocks (``lowrank_jax.io.gguf.load_smollm2(scan_layers=True)``; kernels
``[30, in, out]``, so 7 x 30 = 210 matrices: 576 x 576 (q, o), 576 x 192 (k, v),
576 x 1536 (gate, up), 1536 x 576 (down)), with
``lrj.lora(rank, alpha=16, targets=..., layouts=lrj.linen.kernel_layouts(model, ids), init=...)``.

*Time.* Wall-clock of ``adapter.init(key, {"params": params})`` with
``jax.block_until_ready``, called *eagerly*, as ``lowrank-jax finetune`` calls it
(per kernel, one cached jitted program that maps over its 30 layers).
The first call (tracing and compiling every op) is reported separately, then
``runs`` timed calls; the inits of one rank run round-robin (one call each per round),
so each fast/exact ratio is the median over rounds of the ratio within a round.
With ``--jit``, ``jax.jit(adapter.init)`` over the whole tree is also timed (compile
time separately). The offset inits map over the 30 stacked layers with ``lax.map``
(one matrix per SVD/QR): batched QRs of several kernels in one program deadlock in
XLA's CPU runtime on jax 0.10.2 (see ``lrj.linalg.qr``).

*Error.* For each of the 210 matrices ``W`` (float32; computed in float64 on the
host), the relative Frobenius error ``||W - s A B||_F / ||W||_F`` of the exact and
of each fast init, against the Eckart-Young optimum
``sqrt(sum_{i > r} sigma_i^2) / ||W||_F`` (float64 singular values). Reported: the
median and max over matrices of the error, and of the excess
``(fast error - optimal error) / optimal error``.
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
import jax.numpy as jnp
import numpy as np

import lowrank_jax as lrj
from _report import write_json  # benchmarks/_report.py
from _machine import machine  # benchmarks/_machine.py

RESULTS = Path(__file__).resolve().parent / "results" / "pissa.json"
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS = rf".*/({'|'.join(LINEAR_NAMES)})/kernel"


@dataclasses.dataclass(frozen=True)
class Config:
    ranks: tuple[int, ...] = (8,)
    niters: tuple[int, ...] = (2, 4, 16)
    alpha: float = 16.0
    runs: int = 3
    tiny: bool = False
    jit: bool = False
    seed: int = 0


def load_params(cfg: Config):
    """``(description, model, params)``: SmolLM2-135M (GGUF, scanned), or a tiny random scanned LLaMA."""
    from lowrank_jax.models.llama import LlamaConfig, LlamaForCausalLM

    if cfg.tiny:
        config = LlamaConfig.tiny(scan_layers=True, num_hidden_layers=3)
        model = LlamaForCausalLM(config)
        params = model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"]
        return "tiny random LLaMA (LlamaConfig.tiny, 3 scanned layers)", model, params
    from lowrank_jax.io import gguf

    config, params = gguf.load_smollm2(scan_layers=True)
    return "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32)", LlamaForCausalLM(config), params


def init_names(cfg: Config) -> list[str]:
    return ["pissa"] + [f"pissa_niter_{n}" for n in cfg.niters]


def kernels(params) -> dict[str, np.ndarray]:
    """``{path: [L, in, out] float32}`` of the targets."""
    from lowrank_jax import tree as tree_lib

    return {path: np.asarray(leaf) for _, path, leaf in tree_lib.flatten_with_paths({"params": params})
            if re.fullmatch(TARGETS, path)}


def optimal_errors(ws: dict[str, np.ndarray], ranks) -> dict[int, dict[str, list[float]]]:
    """Eckart-Young: ``{rank: {path: [per-layer relative error]}}`` from float64 singular values."""
    out = {r: {} for r in ranks}
    for path, w in ws.items():
        for layer in w:
            sv = np.linalg.svd(layer.astype(np.float64), compute_uv=False)
            total = np.sum(sv ** 2)
            for r in ranks:
                out[r].setdefault(path, []).append(float(np.sqrt(np.sum(sv[r:] ** 2) / total)))
    return out


def errors(ws: dict[str, np.ndarray], lp, scale: float) -> dict[str, list[float]]:
    """``{path: [per-layer ||W - s A B||_F / ||W||_F]}`` in float64."""
    from lowrank_jax import tree as tree_lib

    out = {}
    for keys, leaves in tree_lib.adapter_paths(lp, frozenset("ab")):
        path = tree_lib.path_str(keys)
        a, b = np.asarray(leaves["a"], np.float64), np.asarray(leaves["b"], np.float64)
        w = ws[path].astype(np.float64)
        res = w - scale * np.einsum("lir,lro->lio", a, b)
        out[path] = [float(x) for x in np.linalg.norm(res, axis=(1, 2)) / np.linalg.norm(w, axis=(1, 2))]
    return out


def make_adapter(cfg: Config, layouts, rank: int, init: str):
    return lrj.lora(rank=rank, alpha=cfg.alpha, targets=TARGETS, layouts=layouts, init=init)


def time_eager(cfg: Config, variables, layouts, rank: int) -> tuple[dict, dict]:
    """``(rows by init, adapter params by init)``: first call, then ``runs`` round-robin timed calls."""
    names = init_names(cfg)
    adapters = {n: make_adapter(cfg, layouts, rank, n) for n in names}
    key = jax.random.key(cfg.seed)
    rows, lps = {}, {}
    for n in names:
        t0 = time.perf_counter()
        lps[n] = jax.block_until_ready(adapters[n].init(key, variables))
        rows[n] = {"first_call_s": time.perf_counter() - t0, "times_s": []}
        print(f"  rank {rank} {n}: first call {rows[n]['first_call_s']:.2f} s", file=sys.stderr, flush=True)
    for _ in range(cfg.runs):
        for n in names:
            t0 = time.perf_counter()
            jax.block_until_ready(adapters[n].init(key, variables))
            rows[n]["times_s"].append(time.perf_counter() - t0)
    return rows, lps


def time_jit(cfg: Config, params, layouts, rank: int) -> dict:
    """Per init: compile time, first call and each timed run of ``jax.jit(adapter.init)`` on the whole tree."""
    names = init_names(cfg)
    key = jax.random.key(cfg.seed)
    tree = {"params": params}
    rows, compiled = {}, {}
    for n in names:
        t0 = time.perf_counter()
        compiled[n] = jax.jit(make_adapter(cfg, layouts, rank, n).init).lower(key, tree).compile()
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        jax.block_until_ready(compiled[n](key, tree))
        rows[n] = {"compile_s": compile_s, "first_call_s": time.perf_counter() - t0, "times_s": []}
    for run in range(cfg.runs):
        for n in names:
            t0 = time.perf_counter()
            jax.block_until_ready(compiled[n](key, tree))
            rows[n]["times_s"].append(time.perf_counter() - t0)
        print(f"  rank {rank} jit round {run + 1}/{cfg.runs}", file=sys.stderr, flush=True)
    return rows


def summarise(values: list[float]) -> dict:
    return {"median": float(np.median(values)), "max": float(np.max(values)), "min": float(np.min(values))}


def add_time_ratios(rows: dict) -> None:
    exact = rows["pissa"]
    for r in rows.values():
        r["time_s"] = statistics.median(r["times_s"])
        r["time_ratio"] = statistics.median(t / e for t, e in zip(r["times_s"], exact["times_s"]))
        r["time_ratio_min"] = min(r["times_s"]) / min(exact["times_s"])


def run(cfg: Config, *, out: Path | None = RESULTS, command: str | None = None) -> dict:
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    description, model, params = load_params(cfg)
    layouts = lrj.linen.kernel_layouts(model, jnp.zeros((1, 8), jnp.int32))
    variables = {"params": params}
    ws = kernels(params)
    shapes = {p: list(w.shape) for p, w in ws.items()}
    t0 = time.perf_counter()
    optimal = optimal_errors(ws, cfg.ranks)
    optimal_s = time.perf_counter() - t0
    rows = []
    for rank in cfg.ranks:
        eager, lps = time_eager(cfg, variables, layouts, rank)
        add_time_ratios(eager)
        jitted = time_jit(cfg, params, layouts, rank) if cfg.jit else None
        if jitted:
            add_time_ratios(jitted)
        scale = cfg.alpha / rank
        opt_flat = [e for p in ws for e in optimal[rank][p]]
        for n in init_names(cfg):
            err = errors(ws, lps[n], scale)
            flat = [e for p in ws for e in err[p]]
            excess = [(e - o) / o for e, o in zip(flat, opt_flat)]
            row = {
                "rank": rank, "init": n, "eager": eager[n],
                "error": summarise(flat), "optimal_error": summarise(opt_flat),
                "excess_over_optimal": summarise(excess),
                "per_target_error": err,
                "per_kind_excess_median": {p.split("/")[-2]: float(np.median(
                    [(e - o) / o for e, o in zip(err[p], optimal[rank][p])])) for p in ws},
            }
            if jitted:
                row["jit"] = jitted[n]
            rows.append(row)
    result = {
        "command": command,
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "config": dataclasses.asdict(cfg) | {"model": description, "targets": TARGETS, "matrices": sum(
            w.shape[0] for w in ws.values()), "shapes": shapes},
        "machine": machine(),
        "optimal_per_target": {str(r): optimal[r] for r in cfg.ranks},
        "optimal_svd_s": optimal_s,
        "rows": rows,
        "wall_s": time.perf_counter() - t_start,
    }
    write_json(out, result)
    return result


def format_table(result: dict) -> str:
    jit = any("jit" in r for r in result["rows"])
    header = ["rank", "init", "first call s", "median s", "x exact (min)"]
    if jit:
        header += ["jit compile s", "jit median s", "jit x exact (min)"]
    header += ["rel. error median", "rel. error max", "excess over optimal median", "excess max"]
    lines = []
    for r in result["rows"]:
        e = r["eager"]
        cells = [str(r["rank"]), r["init"], f"{e['first_call_s']:.2f}", f"{e['time_s']:.2f}",
                 f"{e['time_ratio']:.3f} ({e['time_ratio_min']:.3f})"]
        if jit:
            j = r["jit"]
            cells += [f"{j['compile_s']:.2f}", f"{j['time_s']:.2f}", f"{j['time_ratio']:.3f} ({j['time_ratio_min']:.3f})"]
        cells += [f"{r['error']['median']:.6f}", f"{r['error']['max']:.6f}",
                  f"{r['excess_over_optimal']['median']:.2e}", f"{r['excess_over_optimal']['max']:.2e}"]
        lines.append(cells)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    opt = "; ".join(f"rank {r['rank']}: optimal error median {r['optimal_error']['median']:.6f}, max "
                    f"{r['optimal_error']['max']:.6f}" for r in result["rows"] if r["init"] == "pissa")
    return "\n".join([fmt(header), sep, *(fmt(line) for line in lines), "", f"Eckart-Young: {opt}"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 timed run per init")
    p.add_argument("--tiny", action="store_true", help="a small random LLaMA instead of SmolLM2 (no model package)")
    p.add_argument("--jit", action="store_true", help="also time jax.jit(adapter.init) of the whole tree")
    p.add_argument("--ranks", type=int, nargs="+", default=None)
    p.add_argument("--niters", type=int, nargs="+", default=None)
    p.add_argument("--runs", type=int, default=None)
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    a = p.parse_args(argv)
    cfg = Config(tiny=a.tiny, jit=a.jit, runs=1 if a.quick else Config.runs)
    changes = {"ranks": tuple(a.ranks) if a.ranks else None, "niters": tuple(a.niters) if a.niters else None,
               "runs": a.runs}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})
    print(f"config: {cfg}", file=sys.stderr)
    command = " ".join(["python", "benchmarks/bench_pissa.py", *(sys.argv[1:] if argv is None else argv)])
    result = run(cfg, out=a.out, command=command)
    print(f"model: {result['config']['model']}, {result['config']['matrices']} matrices; "
          f"load average {result['load_average']['start'][0]:.2f} -> {result['load_average']['end'][0]:.2f}")
    print(format_table(result))
    if a.out is not None:
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
