"""The main job never uses stale or mismatched state (issue 18): one identity per run directory,
every bad input one ``error:`` line before the model loads, and Ctrl-C resume bit-exact."""

import dataclasses
import json
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from lowrank_jax import cli
from lowrank_jax import run_config as rc

WORKER = pathlib.Path(__file__).parent / "finetune_worker.py"
UNWRITABLE = "/proc/lowrank-jax-test/run"  # /proc takes no new directories, not even from root


def fake_run(directory: pathlib.Path, step: int = 60, **options) -> pathlib.Path:
    """A run directory as finetune leaves it, as far as the checks read it: checkpoints/<step>/config/metadata."""
    cfg = rc.FinetuneConfig(output_dir=str(directory), **options)
    cfg.validate()
    config_dir = directory / "checkpoints" / str(step) / "config"
    config_dir.mkdir(parents=True)
    (config_dir / "metadata").write_text(json.dumps({"model": rc.MODEL_NAME, "finetune": dataclasses.asdict(cfg)}))
    return directory


def error_of(argv, capsys) -> str:
    """The one ``error:`` line of a command that must fail with exit status 2."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_a_directory_with_another_run_is_refused(tmp_path, capsys):
    run = fake_run(tmp_path / "run", method="lora")
    line = error_of(["finetune", "--method", "qlora", "--steps", "3", "--output-dir", str(run)], capsys)
    assert line == (f"error: --output-dir '{run}' holds a lora run (checkpoint step 60): --resume continues it, "
                    f"--overwrite replaces it, or choose another --output-dir")


def test_resume_with_other_settings_names_each_field(tmp_path, capsys):
    run = fake_run(tmp_path / "run", method="lora")
    line = error_of(["finetune", "--resume", "--method", "qlora", "--output-dir", str(run)], capsys)
    assert "method 'lora' (now 'qlora')" in line and "rank" not in line
    line = error_of(["finetune", "--resume", "--rank", "16", "--output-dir", str(run)], capsys)
    assert re.search(r"holds a run with other settings: rank 8 \(now 16\); resume with those", line)


def test_resume_with_the_same_identity_and_more_steps_is_accepted(tmp_path):
    run = fake_run(tmp_path / "run", method="lora", steps=60)
    cfg = rc.FinetuneConfig(output_dir=str(run), resume=True, steps=100)
    cfg.validate()
    assert rc.check_run_dir(cfg)[0] == 60


def test_overwrite_clears_only_what_a_run_writes(tmp_path):
    from lowrank_jax import finetune as ft

    run = fake_run(tmp_path / "run")
    (run / "summary.json").write_text("{}")
    (run / "loss.png").write_bytes(b"png")
    (run / "notes.txt").write_text("mine")
    cfg = rc.FinetuneConfig(output_dir=str(run), method="qlora", overwrite=True)
    cfg.validate()
    assert rc.check_run_dir(cfg)[0] == 60  # accepted, and the old run is reported
    ft.clear_run(run)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    assert rc.stored_run(run) is None


def test_the_default_directory_names_the_method():
    for method in ("lora", "qlora", "galore"):
        cfg = rc.FinetuneConfig(method=method)
        cfg.validate()
        assert cfg.output_dir == f"runs/smollm2-{method}"


@pytest.mark.parametrize("method", sorted(rc.FIXED_TARGETS))
def test_targets_are_refused_for_methods_that_fix_them(method, capsys, tmp_path):
    line = error_of(["finetune", "--method", method, "--targets", "qv", "--output-dir", str(tmp_path / "r")], capsys)
    assert line.startswith(f"error: --targets does not apply to --method {method}, which trains {rc.FIXED_TARGETS[method]}")


@pytest.mark.parametrize("argv, message", [
    (["finetune", "--output-dir", "{tmp}/afile"], "error: --output-dir '{tmp}/afile' is a file, not a directory"),
    (["finetune", "--output-dir", "{tmp}/afile/run"], "error: --output-dir '{tmp}/afile/run' cannot be created: '{tmp}/afile' is a file"),
    (["finetune", "--output-dir", UNWRITABLE], f"error: --output-dir '{UNWRITABLE}' cannot be written: No such file or directory"),
    (["finetune", "--corpus", "{tmp}/missing.txt", "--output-dir", "{tmp}/new"],
     "error: --corpus '{tmp}/missing.txt' does not exist: give 'shakespeare' or the path of a UTF-8 text file"),
    (["finetune", "--corpus", "{tmp}", "--output-dir", "{tmp}/new"],
     "error: --corpus '{tmp}' is a directory: give 'shakespeare' or the path of a UTF-8 text file"),
    (["finetune", "--resume", "--overwrite", "--output-dir", "{tmp}/new"],
     "error: --resume continues the run in --output-dir and --overwrite replaces it: give one"),
    (["finetune", "--warmup", "-1", "--output-dir", "{tmp}/new"], "error: --warmup must be a non-negative integer, got -1"),
    (["finetune", "--mesh", "data=3", "--output-dir", "{tmp}/new"], "error: --mesh data=3: mesh data=3 has 3 devices but 1 are available"),
    (["finetune", "--mesh", "data=1,expert=1", "--output-dir", "{tmp}/new"],
     "error: --mesh data=1,expert=1: axis 'expert' is not one the sharding rules use (data, fsdp, tensor)"),
    (["finetune", "--mesh", "data2", "--output-dir", "{tmp}/new"], "error: --mesh: mesh entry 'data2' in 'data2' is not NAME=SIZE with SIZE >= 1"),
    (["finetune", "--remat", "some", "--output-dir", "{tmp}/new"], "error: --remat must be one of none, full, dots, offload, nested, got 'some'"),
    (["finetune", "--num-processes", "2", "--output-dir", "{tmp}/new"],
     "error: --num-processes 2 needs --coordinator HOST:PORT (process 0's address)"),
    (["finetune", "--num-processes", "2", "--process-id", "2", "--coordinator", "127.0.0.1:1", "--output-dir", "{tmp}/new"],
     "error: --process-id must be in [0, 2) for --num-processes 2, got 2"),
    (["finetune", "--num-processes", "3", "--coordinator", "127.0.0.1:1", "--output-dir", "{tmp}/new"],
     "error: --batch 4 is not divisible by --num-processes 3 (each process feeds batch / processes rows)"),
    (["finetune", "--coordinator", "localhost", "--output-dir", "{tmp}/new"],
     "error: --coordinator: coordinator address 'localhost' is not HOST:PORT with 0 < PORT < 65536"),
    (["finetune", "--num-processes", "2", "--process-id", "1", "--coordinator", "127.0.0.1:{port}",
      "--coordinator-timeout", "1", "--output-dir", "{tmp}/new"],
     "error: --coordinator 127.0.0.1:{port}: coordinator 127.0.0.1:{port} unreachable after 1 s"),
    (["generate", "--prompt", ""], "error: --prompt is empty: give the text to continue"),
    (["generate", "--prompt", "a", "--prompts", "{tmp}/p.txt"],
     "error: give --prompt TEXT (repeatable) or --prompts FILE (one prompt per line), not both"),
    (["generate", "--prompts", "{tmp}/missing.txt"], "error: --prompts '{tmp}/missing.txt' is not a file"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "error: --max-new-tokens must be positive, got 0"),
    (["generate", "--prompt", "hi", "--adapter", "{tmp}/none"], "error: {tmp}/none is not a finetune output directory (no checkpoints/ inside)"),
    (["merge", "--adapter", "{tmp}/none", "--output", "{tmp}/merged.bin"], "error: --output must end in .safetensors, got {tmp}/merged.bin"),
    (["merge", "--adapter", "{tmp}/none", "--output", "/proc/lowrank-jax-test/m.safetensors"],
     "error: --output '/proc/lowrank-jax-test/m.safetensors': its directory '/proc/lowrank-jax-test' cannot be written: No such file or directory"),
    (["merge", "--adapter", "{tmp}/none", "--output", "{tmp}/m.safetensors"], "error: {tmp}/none is not a finetune output directory"),
    (["info", "{tmp}/afile"], "error: {tmp}/afile is not a finetune output directory (no checkpoints/ inside)"),
])
def test_each_bad_input_is_one_error_line_before_anything_loads(argv, message, tmp_path, capsys, monkeypatch):
    from lowrank_jax import finetune as ft

    (tmp_path / "afile").write_text("")
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.setattr(ft, "load_model", lambda cfg: pytest.fail("the model was loaded before the input was checked"))
    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        port = str(free.getsockname()[1])
    fill = lambda text: text.replace("{tmp}", str(tmp_path)).replace("{port}", port)  # noqa: E731
    line = error_of([fill(a) for a in argv], capsys)
    assert line == fill(message) or line.startswith(fill(message))
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing left behind
    assert not pathlib.Path("/proc/lowrank-jax-test").exists()


def test_help_is_fast_imports_no_jax_and_every_flag_has_help_and_default():
    code = ("import sys\nfrom lowrank_jax import cli\ntry:\n    cli.main(['finetune', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('JAX' if 'jax' in sys.modules else 'NOJAX')")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - t0
    assert proc.stdout.strip().splitlines()[-1] == "NOJAX", proc.stderr
    assert elapsed < 5.0  # was 5-6 s with jax; about 0.1 s without (a loose bound: CI machines are shared)
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    cli._finetune_parser(sub)
    finetune = sub.choices["finetune"]
    flags = [a for a in finetune._actions if a.option_strings and a.dest not in ("help", "config")]
    assert sorted(a.dest for a in flags) == sorted(f.name for f in dataclasses.fields(rc.FinetuneConfig))
    for action in flags:
        assert action.help, action.option_strings
        if not isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)) and action.dest != "output_dir":
            assert "default" in action.help, action.option_strings
    assert "default runs/smollm2-METHOD" in next(a.help for a in flags if a.dest == "output_dir")
    assert "(default 8; aflora 4, galore 128, vera 256, adalora 12)" in next(a.help for a in flags if a.dest == "rank")


def test_every_method_has_a_recipe():
    from lowrank_jax import finetune as ft

    assert tuple(ft.RECIPES) == rc.METHODS


# ------------------------------------------------------------------ end to end, a tiny model in a subprocess

def run_worker(out_dir, steps, *extra):
    proc = subprocess.run([sys.executable, str(WORKER), str(out_dir), str(steps), *extra], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(out_dir / "final-0.npz"))


@pytest.mark.slow
def test_ctrl_c_saves_the_completed_step_and_resume_is_bit_exact(tmp_path):
    # width 1024: a step is long enough for XLA:CPU to run it asynchronously, so SIGINT lands while
    # the step computes (in float(loss)), where the old handler saved the new state under the old number
    steps, wide = 8, ("--width", "1024")
    straight = run_worker(tmp_path / "straight", steps, *wide)
    run = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, str(WORKER), str(run), str(steps), *wide], stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith(f"step 3/{steps}"):
            time.sleep(0.02)
            proc.send_signal(signal.SIGINT)
            break
    _, rest = proc.communicate(timeout=300)
    assert proc.returncode == 130, "".join(lines) + rest
    saved = re.search(r"interrupted: saved step (\d+)", rest)
    assert saved, rest
    step = int(saved.group(1))
    assert 3 <= step < steps
    stored_step, config = rc.stored_run(run)
    assert stored_step == step and len(config["losses"]) == step  # the step saved is the step completed
    resumed = run_worker(run, steps, "--resume", *wide)
    assert resumed.keys() == straight.keys()
    for name in straight:
        np.testing.assert_array_equal(resumed[name], straight[name], err_msg=name)  # bit for bit


@pytest.mark.slow
def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_directory(tmp_path, monkeypatch):
    from lowrank_jax import finetune as ft

    sys.path.insert(0, str(WORKER.parent))
    import finetune_worker

    def boom(self, step, **metrics):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(ft.Progress, "update", boom)
    cfg = finetune_worker.config(str(tmp_path / "new" / "run"), 3, False)
    with pytest.raises(RuntimeError, match="disk on fire"):
        ft.finetune(cfg, loaded=finetune_worker.tiny_model())
    assert not (tmp_path / "new").exists()


def test_several_adapters_must_be_lora_runs(tmp_path, capsys, monkeypatch):
    from lowrank_jax import finetune as ft

    lora_run, dora_run = fake_run(tmp_path / "a", method="lora"), fake_run(tmp_path / "b", method="dora")
    monkeypatch.setattr(ft, "load_model", lambda cfg: pytest.fail("the model was loaded before the input was checked"))
    line = error_of(["generate", "--prompt", "hi", "--adapter", str(lora_run), "--adapter", str(dora_run)], capsys)
    assert line == (f"error: several --adapter run in one batch as a bank of LoRA adapters (lora, rslora runs); "
                    f"{dora_run} is a dora run: generate with it alone")


# ------------------------------------------------------------------ --model and --data: refused before any load

HF_TINY = pathlib.Path(__file__).parent / "fixtures" / "hf_tiny"


def _copy_tiny(tmp_path, name="llama", **config_changes):
    import shutil

    folder = tmp_path / f"model-{name}"
    shutil.copytree(HF_TINY / name, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_bad_model_and_data_are_one_error_line_before_jax(tmp_path, capsys):
    no_config = tmp_path / "empty-dir"
    no_config.mkdir()
    gpt2 = _copy_tiny(tmp_path, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    no_template = _copy_tiny(tmp_path, "mistral")
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    settings = json.loads((no_template / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(settings))
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
                    + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"prompt": "no completion"}\n')
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello")
    cases = [
        (["--model", str(tmp_path / "nope")], f"error: --model '{tmp_path / 'nope'}' does not exist"),
        (["--model", str(no_config)], f"error: --model '{no_config}' has no config.json: not a transformers checkpoint"),
        (["--model", str(text_file)], f"error: --model '{text_file}' is a file but not a .gguf"),
        (["--model", str(gpt2)], f"error: --model '{gpt2}': config.json: unsupported architecture 'gpt2' "
                                 f"(model_type / architectures ['GPT2LMHeadModel']); supported: llama (LlamaForCausalLM), "
                                 f"mistral (MistralForCausalLM), qwen2 (Qwen2ForCausalLM)"),
        (["--model", str(HF_TINY / "llama"), "--method", "bitfit"], "error: --method bitfit trains biases, and llama has none"),
        (["--data", str(bad)], f"error: --data: {bad}:2:"),
        (["--model", str(no_template), "--data", str(chat)], f"error: --data '{chat}' has 1 chat rows"),
    ]
    for extra, message in cases:
        line = error_of(["finetune", "--output-dir", str(tmp_path / "run"), *extra], capsys)
        assert line.startswith(message), (extra, line)
    assert not (tmp_path / "run").exists()
    code = (f"import sys\nfrom lowrank_jax import cli\nrc = cli.main(['finetune', '--model', {str(gpt2)!r}])\n"
            "print(rc, 'JAX' if 'jax' in sys.modules else 'NOJAX')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["2", "NOJAX"], proc.stderr


def test_a_model_with_biases_accepts_bitfit_and_its_identity_is_its_path(tmp_path):
    cfg = rc.FinetuneConfig(model=str(HF_TINY / "qwen2"), method="bitfit", output_dir=str(tmp_path / "run"))
    cfg.validate()
    assert rc.model_biases(cfg.model) == ("q_proj", "k_proj", "v_proj")
    assert rc.identity(cfg)["model"] == str((HF_TINY / "qwen2").resolve())
    assert rc.model_name(cfg.model) == "qwen2"
    assert rc.identity(rc.FinetuneConfig())["model"] == "SmolLM2-135M-Instruct"
