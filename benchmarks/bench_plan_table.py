"""The README's memory plan: ``lowrank-jax plan`` for LLaMA-2-7B and 70B, five methods, 8 / 64 / 256 devices.

Each cell is one ``python -m lowrank_jax.plan ... --no-flops --json`` subprocess (the fake device
count is fixed per process): the real train step compiled for the mesh from abstract params,
nothing allocated. Per-device GiB = argument + output + temp - alias of XLA's memory analysis
(bf16 weights, r=16 on every block linear, GaLore rank 128, full remat, batch 1).
Anchors: QLoRA 70B on one device (the QLoRA paper's 65B in under 48 GB), GaLore 7B on one device
(GaLore's 7B pre-training on a 24 GB GPU), at 4096 tokens and at the shorter lengths those papers used.

    python benchmarks/bench_plan_table.py            # about 20 minutes on 2 cores
    python benchmarks/bench_plan_table.py --models llama2-7b --methods lora

Writes ``benchmarks/results/plan_table.json`` after every cell (a crash keeps the cells done).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _report import markdown_table, write_json  # noqa: E402

MESHES = {8: "fsdp=8", 64: "fsdp=16,tensor=4", 256: "fsdp=64,tensor=4"}
ANCHORS = [("llama2-70b", "qlora", 4096), ("llama2-70b", "qlora", 512), ("llama2-7b", "galore", 4096),
           ("llama2-7b", "galore", 256)]


def cell(model: str, method: str, devices: int, mesh: str, seq_len: int) -> dict:
    cmd = [sys.executable, "-m", "lowrank_jax.plan", "--model", model, "--method", method, "--devices", str(devices),
           "--mesh", mesh, "--seq-len", str(seq_len), "--no-flops", "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        return {"model": model, "method": method, "devices": devices, "seq_len": seq_len,
                "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t0
    return out


def gib(row: dict) -> str:
    return f"{row['bytes_per_device']['sum'] / 2**30:.1f}" if "bytes_per_device" in row else "error"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="llama2-7b,llama2-70b")
    parser.add_argument("--methods", default="lora,qlora,dora,galore,full")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "plan_table.json")
    args = parser.parse_args(argv)
    rows, anchors = [], []
    for model in args.models.split(","):
        for method in args.methods.split(","):
            for devices, mesh in MESHES.items():
                rows.append(cell(model, method, devices, mesh, 4096))
                print(f"{model} {method} {devices}: {gib(rows[-1])} GiB", flush=True)
                write_json(args.out, {"cells": rows, "anchors": anchors})
    for model, method, seq_len in ANCHORS:
        anchors.append(cell(model, method, 1, "fsdp=1", seq_len))
        print(f"anchor {model} {method} 1 device seq {seq_len}: {gib(anchors[-1])} GiB", flush=True)
        write_json(args.out, {"cells": rows, "anchors": anchors})
    for model in args.models.split(","):
        lines = [[method] + [gib(next(r for r in rows if r["model"] == model and r["method"] == method
                                      and r["devices"] == d)) for d in MESHES] for method in args.methods.split(",")]
        print(markdown_table([model] + [f"{d} ({m})" for d, m in MESHES.items()], lines))
    print(markdown_table(["anchor", "seq", "GiB on 1 device", "argument", "temp"],
                         [[f"{a['model']} {a['method']}", str(a["seq_len"]), gib(a),
                           f"{a['bytes_per_device']['argument'] / 2**30:.1f}" if "bytes_per_device" in a else "",
                           f"{a['bytes_per_device']['temp'] / 2**30:.1f}" if "bytes_per_device" in a else ""]
                          for a in anchors]))


if __name__ == "__main__":
    main()
