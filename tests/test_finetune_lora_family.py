"""The main job's issue-16 surface on a tiny LLaMA (tests/finetune_worker.py's): the LoRA-family methods
reachable from the CLI, ``--config FILE``, and ``--data`` JSONL with its masked loss, held-out
evaluations and ``metrics.jsonl``."""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import finetune_worker  # noqa: E402

from lowrank_jax import cli  # noqa: E402
from lowrank_jax import finetune as ft  # noqa: E402
from lowrank_jax import run_config as rc  # noqa: E402
from lowrank_jax import tree as tree_lib  # noqa: E402

STEPS = 6


def leaves(tree, name):
    return {path: np.asarray(leaf) for _, path, leaf in tree_lib.flatten_with_paths(tree) if path.endswith("/" + name)}


def flat(tree):
    return {path: np.asarray(leaf, np.float32) for _, path, leaf in tree_lib.flatten_with_paths(tree)}


@pytest.fixture(scope="module")
def loaded():
    return finetune_worker.tiny_model()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pissa", "olora", "lora_ga", "lora_plus", "lora_fa", "lora_pro", "qdora"])
def test_lora_family_method_trains_saves_and_restores(method, tmp_path, loaded):
    cfg = finetune_worker.config(str(tmp_path / method), STEPS, False, method=method, batch=4, progress=False)
    summary = ft.finetune(cfg, loaded=loaded)
    assert len(summary["losses"]) == STEPS and all(np.isfinite(summary["losses"]))
    assert summary["perplexity_after"] < summary["perplexity_before"]
    recipe, trainable, run_config, _ = ft.restore_adapter(tmp_path / method, loaded=loaded)
    assert run_config["finetune"]["method"] == method
    initial = recipe.trainable  # the recipe is rebuilt from the same seed: its tree is the initial one
    if method == "lora_fa":  # A is never trained
        a0, a1 = leaves(initial, "a"), leaves(trainable, "a")
        assert a0 and all(np.array_equal(a0[p], a1[p]) for p in a0)
    if method in rc.OFFSET_INITS:  # the residual base plus the initial adapter is the original model
        original, rebuilt = flat(loaded[2]), flat(recipe.eval_params(recipe.offset))
        assert sorted(original) == sorted(rebuilt)
        worst = max(float(np.abs(original[p] - rebuilt[p]).max()) for p in original)
        assert worst < 1e-5, worst
        residual = flat(recipe.frozen["params"])
        moved = max(float(np.abs(original[p] - residual[p]).max()) for p in original)
        assert moved > 1e-3  # the frozen base really is W - s A0 B0, not W
    if method == "qdora":
        assert run_config["adapter"]["method"] == "dora"
    jax.clear_caches()


def test_config_file_sets_defaults_and_flags_win(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "_cmd_finetune", lambda args: seen.update(vars(args)) or 0)
    toml = tmp_path / "run.toml"
    toml.write_text('method = "dora"\nrank = 4\nseq_len = 256\ntargets = "qv"\n')
    assert cli.main(["finetune", "--config", str(toml), "--rank", "16"]) == 0
    assert (seen["method"], seen["rank"], seen["seq_len"], seen["targets"]) == ("dora", 16, 256, "qv")
    as_json = tmp_path / "run.json"
    as_json.write_text(json.dumps({"steps": 7, "pack": True}))
    assert cli.main(["finetune", "--config", str(as_json)]) == 0
    assert (seen["steps"], seen["pack"], seen["method"]) == (7, True, "lora")


@pytest.mark.parametrize("text, message", [
    ('rnak = 4\n', "unknown option 'rnak'"),
    ('rank = "four"\n', "rank = 'four' must be int"),
    ('rank = \n', "is not valid TOML"),
])
def test_config_file_errors_are_one_line(tmp_path, capsys, text, message):
    toml = tmp_path / "run.toml"
    toml.write_text(text)
    assert cli.main(["finetune", "--config", str(toml)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_the_loss_is_the_mean_over_masked_targets_only():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((2, 5, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (2, 5)))
    mask = jnp.asarray([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], jnp.float32)
    nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits, -1)), np.asarray(targets)[..., None], -1)[..., 0]
    expected = float((nll * np.asarray(mask)).sum() / 6)
    assert float(ft.cross_entropy(logits, targets, mask)) == pytest.approx(expected, rel=1e-6)
    assert float(ft.cross_entropy(logits, targets)) == pytest.approx(float(nll.mean()), rel=1e-6)


@pytest.mark.slow
def test_jsonl_data_trains_on_completions_with_evaluations_and_metrics(tmp_path, loaded):
    rows = tmp_path / "data.jsonl"
    with open(rows, "w") as f:
        for i in range(40):
            if i % 2:
                f.write(json.dumps({"prompt": f"Count {i}:", "completion": " one two three four"}) + "\n")
            else:
                f.write(json.dumps({"messages": [{"role": "user", "content": f"Say {i}"},
                                                 {"role": "assistant", "content": "five six seven"}]}) + "\n")
    out = tmp_path / "run"
    cfg = finetune_worker.config(str(out), 6, False, data=str(rows), eval_every=3, batch=4, seq_len=64, progress=False)
    summary = ft.finetune(cfg, loaded=loaded)
    assert "36 training rows" in summary["data"] and "4 held-out sequences" in summary["data"]
    assert [e["step"] for e in summary["evals"]] == [0, 3, 6]
    assert summary["evals"][-1]["loss"] < summary["evals"][0]["loss"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]
    assert all(set(m) >= {"loss", "lr", "grad_norm", "tokens_per_s", "step_time_s"} for m in steps)
    assert [m["loss"] for m in steps] == pytest.approx(summary["losses"], rel=1e-6)
    assert [m["step"] for m in metrics if "eval_loss" in m] == [0, 3, 6]
    # the batches hold [tokens, mask] and the mask is 1 exactly on completion / assistant tokens
    data = ft.training_data(cfg, loaded[3])
    batch = data.batch_at(1)
    assert batch.shape == (4, 2, 65)
    tok = loaded[3]
    for tokens, mask in batch:
        trained = tok.decode([int(t) for t, m in zip(tokens, mask) if m])
        assert trained.replace("<|im_end|>", "").strip() in ("one two three four", "five six seven"), trained
    jax.clear_caches()
