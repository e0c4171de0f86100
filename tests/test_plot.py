"""lowrank_jax.plot (matplotlib PNGs) and lowrank_jax.metrics (metrics.jsonl)."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from lowrank_jax import metrics, plot  # noqa: E402


def _png_size(path):
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_trailing_mean():
    assert plot.trailing_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    with pytest.raises(ValueError, match="window.*0"):
        plot.trailing_mean([1.0], 0)


def test_training_plot_is_deterministic_and_dateless(tmp_path):
    steps = list(range(1, 31))
    loss = [3.0 * math.exp(-s / 10) + 1.0 for s in steps]
    kwargs = dict(smoothed=plot.trailing_mean(loss, 5), eval_steps=[10, 20, 30], eval_loss=[2.0, 1.6, 1.3],
                  lr=[1e-3 * min(1.0, s / 5) for s in steps], title="lora r=8 [q_proj,v_proj]: 50% <jz> + $x_1$")
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    plot.training_plot(a, steps, loss, **kwargs)
    plot.training_plot(b, steps, loss, **kwargs)
    assert a.read_bytes() == b.read_bytes()
    assert _png_size(a) == (800, 480)
    assert b"Software" not in a.read_bytes() and b"Creation" not in a.read_bytes()
    assert not (tmp_path / "a.png.tmp").exists()


def test_training_plot_axes_ticks_and_legend(monkeypatch, tmp_path):
    """The figure itself: labelled axes, a legend of every curve, integer step ticks, the title verbatim."""
    from matplotlib.figure import Figure

    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: saved.append(self))
    monkeypatch.setattr(plot.os, "replace", lambda *a: None)
    title = "a_b $x$ 50%"
    plot.training_plot(tmp_path / "x.png", [1, 2, 3], [3.0, 2.0, 1.5], smoothed=[3.0, 2.5, 2.2],
                       eval_steps=[3], eval_loss=[1.8], lr=[1e-3, 1e-3, 5e-4], title=title)
    fig = saved[0]
    ax, ax_lr = fig.axes
    assert (ax.get_xlabel(), ax.get_ylabel(), ax_lr.get_ylabel()) == ("step", "loss", "learning rate")
    assert ax.get_title() == title and not ax.title.get_parse_math()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["train loss", "train loss, smoothed", "eval loss", "learning rate"]
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks == [1.0, 2.0, 3.0]


def test_training_plot_bad_input(tmp_path):
    with pytest.raises(ValueError, match="`loss` has 2 values, expected 3"):
        plot.training_plot(tmp_path / "x.png", [1, 2, 3], [1.0, 2.0])
    with pytest.raises(ValueError, match="`lr` has 1 values, expected 2"):
        plot.training_plot(tmp_path / "x.png", [1, 2], [1.0, 2.0], lr=[1e-3])
    with pytest.raises(ValueError, match="eval_steps.*eval_loss"):
        plot.training_plot(tmp_path / "x.png", [1, 2], [1.0, 2.0], eval_steps=[2])
    with pytest.raises(ValueError, match="`steps` is empty"):
        plot.training_plot(tmp_path / "x.png", [], [])


def test_line_plot(tmp_path):
    out = tmp_path / "l.png"
    plot.line_plot(out, {"one": [1.0, 2.0, 4.0], "two": [1.0, float("nan"), 2.0]}, [1, 4, 16], log2_x=True,
                   title="ratio", xlabel="batch", ylabel="x")
    assert _png_size(out) == (800, 480)
    with pytest.raises(ValueError, match=r"series\['one'\]. has 2 values, expected 3"):
        plot.line_plot(out, {"one": [1.0, 2.0]}, [1, 2, 3])
    with pytest.raises(ValueError, match="positive xs"):
        plot.line_plot(out, {"one": [1.0, 2.0]}, [0, 2], log2_x=True)
    with pytest.raises(ValueError, match="`series` is empty"):
        plot.line_plot(out, {}, [1])


def _write(log, steps):
    for s in steps:
        log.log_step(s, loss=10.0 - s, lr=1e-3, grad_norm=np.float32(0.5), tokens_per_s=100.0, step_time_s=0.1)


def test_metrics_rows_and_eval(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    with metrics.MetricsLog(path) as log:
        _write(log, [1, 2])
        log.log_eval(2, eval_loss=math.log(4.0))
        log.log_step(3, loss=float("nan"))
    rows = metrics.read_metrics(path)
    assert rows[0] == {"step": 1, "loss": 9.0, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 100.0, "step_time_s": 0.1}
    assert rows[2]["step"] == 2 and rows[2]["eval_loss"] == pytest.approx(math.log(4.0))
    assert rows[2]["eval_perplexity"] == pytest.approx(4.0)
    assert rows[3]["loss"] is None  # non-finite: strict JSON null
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_metrics_resume_truncates_later_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with metrics.MetricsLog(path) as log:
        _write(log, range(1, 7))
        log.log_eval(4, eval_loss=1.0)
        log.log_eval(6, eval_loss=0.9)
    with open(path, "a") as f:
        f.write('{"step": 7, "lo')  # the row in flight when the run was killed
    assert [r["step"] for r in metrics.read_metrics(path)] == [1, 2, 3, 4, 5, 6, 4, 6]
    with metrics.MetricsLog(path, resume_from_step=4) as log:  # the checkpoint of step 4
        assert log.last_step == 4
        with pytest.raises(ValueError, match="step 4 is not after the last logged step 4"):
            log.log_step(4, loss=1.0)
        _write(log, [5, 6])
    rows = metrics.read_metrics(path)
    assert [(r["step"], "loss" in r) for r in rows] == [(1, True), (2, True), (3, True), (4, True), (4, False),
                                                         (5, True), (6, True)]
    with metrics.MetricsLog(path) as log:  # a new run starts an empty log
        assert log.last_step is None
    assert metrics.read_metrics(path) == []


def test_metrics_bad_input(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        metrics.read_metrics(path)
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        metrics.MetricsLog(path, resume_from_step=3)
    with metrics.MetricsLog(tmp_path / "m.jsonl") as log:
        with pytest.raises(ValueError, match="non-negative integer, got -1"):
            log.log_step(-1, loss=1.0)
        with pytest.raises(ValueError, match="metric 'loss' must be a number, got 'x'"):
            log.log_step(1, loss="x")


def test_plot_metrics_from_log(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with metrics.MetricsLog(path) as log:
        _write(log, range(1, 11))
        log.log_eval(10, eval_loss=1.0)
    plot.plot_metrics(path, tmp_path / "loss.png", title="t")
    assert _png_size(tmp_path / "loss.png") == (800, 480)
    with pytest.raises(ValueError, match="no training rows"):
        metrics.MetricsLog(tmp_path / "empty.jsonl").close()
        plot.plot_metrics(tmp_path / "empty.jsonl", tmp_path / "e.png")


def test_import_lowrank_jax_does_not_import_matplotlib():
    code = "import sys, lowrank_jax, lowrank_jax.plot, lowrank_jax.metrics; print('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
