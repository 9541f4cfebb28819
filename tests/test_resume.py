"""Resumable training: a run interrupted after step k and resumed ends exactly where an uninterrupted run with
the same seed ends (weights, losses, selection history, best metric); a state from other settings is not
resumed silently; a finished run leaves no state behind."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ernie_lab import artifacts, training
from ernie_lab.errors import ConfigError, MissingArtifactError
from ernie_lab.tasks.tnews import TnewsTask
from tests.conftest import SCRIPT_BASE, RecordingRun, isolated_overrides, make_cfg

# 48 examples in batches of 8: 6 steps an epoch, 12 in all; a state every 3 steps and at the epoch end,
# selection every 4 steps and at epoch ends. model=tiny has no dropout, so runs are deterministic.
TINY = [
    "model=tiny", "task.data.limit.train=48", "task.data.limit.eval=16", "task.data.heldout_size=16",
    "train.epochs=2", "train.batch_size=8", "train.learning_rate=3e-3",
    "train.log_every_steps=1", "train.eval_every_steps=4", "train.save_every_steps=3",
]


REAL_PREDICT, REAL_LOSS = training.predict_dygraph, TnewsTask.loss


class Interrupted(Exception):
    pass


class StepLog(RecordingRun):
    """Keeps every logged metric by step (RecordingRun keeps only the latest value)."""

    def __init__(self):
        super().__init__()
        self.by_step: dict[int, dict] = {}
        self.tags = {}

    def log_metrics(self, metrics, step=None):
        super().log_metrics(metrics, step)
        self.by_step.setdefault(step, {}).update(metrics)

    def set_tags(self, tags):
        self.tags.update(tags)


def rounded(obj):
    if isinstance(obj, float):
        return round(obj, 4)
    if isinstance(obj, dict):
        return {k: rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v) for v in obj]
    return obj


def cfg_in(workdir, *extra):
    return make_cfg(isolated_overrides(workdir) + TINY + list(extra))


def train(cfg, monkeypatch, interrupt_at: int | None = None):
    """finetune, recording the weights at every selection pass (the last one sees the final weights); with
    `interrupt_at`, the loss of that step raises, as a crash or a kill in the middle of the step would."""
    seen = {"weights": None, "loss_calls": 0}

    def spy_predict(model, *args):
        seen["weights"] = {k: v.numpy().copy() for k, v in model.state_dict().items()}
        return REAL_PREDICT(model, *args)

    def failing_loss(self, outputs, batch):
        seen["loss_calls"] += 1
        if seen["loss_calls"] == interrupt_at:
            raise Interrupted(f"interrupted in step {interrupt_at}")
        return REAL_LOSS(self, outputs, batch)

    monkeypatch.setattr(training, "predict_dygraph", spy_predict)
    monkeypatch.setattr(TnewsTask, "loss", failing_loss)
    run = StepLog()
    result = training.finetune(cfg, run)
    return result, run, seen["weights"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, one per set of extra overrides, made once."""
    made = {}

    def make(*extra):
        if extra not in made:
            monkeypatch = pytest.MonkeyPatch()
            try:
                workdir = tmp_path_factory.mktemp("reference")
                made[extra] = train(cfg_in(workdir, *extra), monkeypatch)
            finally:
                monkeypatch.undo()
            assert not artifacts.train_state_dir(cfg_in(workdir)).exists()  # a finished run leaves no state
        return made[extra]

    return make


@pytest.mark.parametrize(("interrupt_at", "saved_step", "extra"), [
    (5, 3, ()),  # state saved mid-epoch
    (8, 6, ()),  # state saved at the epoch end
    (11, 9, ("model.hidden_dropout_prob=0.1",)),  # dropout: paddle's RNG must continue where it was
])
def test_interrupted_then_resumed_equals_uninterrupted(reference, tmp_path, monkeypatch, interrupt_at, saved_step,
                                                      extra):
    ref_result, ref_run, ref_weights = reference(*extra)
    cfg = cfg_in(tmp_path, *extra)
    state_dir = artifacts.train_state_dir(cfg)
    with pytest.raises(Interrupted):
        train(cfg, monkeypatch, interrupt_at=interrupt_at)
    state = json.loads((state_dir / training.STATE_FILE).read_text())
    assert state["step"] == saved_step and len(state["losses"]) == saved_step
    for s, loss in enumerate(state["losses"], start=1):
        assert loss == pytest.approx(ref_run.by_step[s]["train/loss"], rel=1e-5), s

    result, run, weights = train(cfg_in(tmp_path, *extra), monkeypatch)
    assert run.tags["resumed_from_step"] == saved_step
    assert not state_dir.exists()
    assert weights.keys() == ref_weights.keys()
    for name, value in ref_weights.items():
        np.testing.assert_allclose(weights[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    resumed_losses = {s: m["train/loss"] for s, m in run.by_step.items() if s and "train/loss" in m}
    assert sorted(resumed_losses) == list(range(saved_step + 1, 13))  # it redid exactly the lost steps
    for s, loss in resumed_losses.items():
        assert loss == pytest.approx(ref_run.by_step[s]["train/loss"], rel=1e-5), s
    assert rounded(run.files["selection_history.json"]) == rounded(ref_run.files["selection_history.json"])
    for key in ("loss_first", "loss_last", "metric", "step", "epoch"):
        assert result[key] == pytest.approx(ref_result[key]), key
    assert result["scores"] == pytest.approx(ref_result["scores"])
    assert run.by_step[None]["train/steps"] == 12


def test_resume_true_without_a_state_names_the_directory(tmp_path):
    cfg = cfg_in(tmp_path, "train.resume=true")
    with pytest.raises(MissingArtifactError, match=f"{artifacts.train_state_dir(cfg)} holds no training state"):
        training.finetune(cfg, RecordingRun())


def test_a_state_from_other_settings_is_refused_or_ignored(tmp_path, capsys):
    cfg = cfg_in(tmp_path)
    state_dir = artifacts.train_state_dir(cfg)
    state_dir.mkdir(parents=True)
    settings = training.resume_settings(cfg)
    (state_dir / training.STATE_FILE).write_text(json.dumps({"settings": settings, "step": 3}))
    assert training.find_train_state(state_dir, "auto", settings)["step"] == 3
    assert training.find_train_state(state_dir, False, settings) is None

    other = training.resume_settings(cfg_in(tmp_path, "train.learning_rate=1e-4", "train.log_every_steps=7"))
    assert "train.log_every_steps" not in other  # settings that change nothing computed do not count
    with pytest.raises(ConfigError, match=r"train.learning_rate saved 0.003, now 0.0001"):
        training.find_train_state(state_dir, True, other)
    assert training.find_train_state(state_dir, "auto", other) is None
    assert "not resuming" in capsys.readouterr().out


@pytest.mark.parametrize(("override", "message"), [
    ("train.resume=maybe", "train.resume='maybe' is not valid; choose one of: auto, true, false"),
    ("train.save_every_steps=0", "train.save_every_steps=0 must be at least 1"),
    ("task.max_seq_length=1024", "task.max_seq_length=1024 exceeds model.max_position_embeddings=512"),
])
def test_bad_training_settings(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        training.finetune(cfg_in(tmp_path, override), RecordingRun())


# The entry script as a user runs it, except that the first save of a training state is followed by a pause
# in which the test kills the job.
PAUSE_AFTER_FIRST_SAVE = r"""
import runpy, sys, time
from ernie_lab import training

real_save = training.save_train_state
def save_then_pause(*args, **kwargs):
    real_save(*args, **kwargs)
    print("state saved", flush=True)
    time.sleep(120)
training.save_train_state = save_then_pause
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_train_py_killed_resumes_in_a_new_process(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from ernie_lab.config import PROJECT_ROOT
    from ernie_lab.tracking import find_runs
    from tests.conftest import run_script

    args = [*TINY, "train.eval_every_steps=null", *isolated_overrides(tmp_path)]
    child = subprocess.Popen(
        [sys.executable, "-c", PAUSE_AFTER_FIRST_SAVE, str(PROJECT_ROOT / "train.py"), *SCRIPT_BASE, *args],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    for line in child.stdout:
        if line.strip() == "state saved":
            child.send_signal(signal.SIGKILL)
            break
    assert child.wait(timeout=120) == -signal.SIGKILL
    state_dir = artifacts.train_state_dir(cfg_in(tmp_path))
    assert json.loads((state_dir / training.STATE_FILE).read_text())["step"] == 3

    result = run_script("train.py", *TINY, "train.eval_every_steps=null", "train.resume=true", tmp=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resume from step 3 (epoch 1, batch 3)" in result.stdout
    assert not state_dir.exists()
    tracking = cfg_in(tmp_path).tracking
    runs = {r.info.status: r for r in find_runs(tracking, "tags.stage = 'train'")}
    assert sorted(runs) == ["FINISHED", "RUNNING"]  # nothing can close a run killed with SIGKILL
    assert runs["FINISHED"].data.tags["resumed_from_step"] == "3"
    assert runs["FINISHED"].data.metrics["train/steps"] == 12


# ---- a second phase (model.init=checkpoint) against the checkpoint it starts from ---------------------------
# Phase 2's own selection scores are shifted by a fixed offset, so that the test decides whether it beats phase 1:
# what is tested is the comparison and what ends in the checkpoint, not how well a tiny model learns.

REAL_METRICS = TnewsTask.metrics


def shift_scores(monkeypatch, offset: float) -> None:
    def shifted(self, examples, predictions):
        return {k: v + offset for k, v in REAL_METRICS(self, examples, predictions).items()}

    monkeypatch.setattr(TnewsTask, "metrics", shifted)


@pytest.fixture(scope="module")
def first_phase(tmp_path_factory):
    """A finished phase 1: its checkpoint directory and the training_state.json written there."""
    monkeypatch = pytest.MonkeyPatch()
    try:
        cfg = cfg_in(tmp_path_factory.mktemp("phase1"))
        train(cfg, monkeypatch)
    finally:
        monkeypatch.undo()
    out = artifacts.finetuned_dir(cfg)
    return out, json.loads((out / "training_state.json").read_text())


def second_phase_cfg(workdir, start, *extra):
    # 6 steps: a state at step 3, evaluations at steps 4 and 6
    return cfg_in(workdir, "model.init=checkpoint", f"model.checkpoint_dir={start}", "train.max_steps=6",
                  "train.learning_rate=1e-2", *extra)


@pytest.mark.parametrize("interrupt_at", [None, 5])
def test_a_second_phase_that_never_beats_its_start_publishes_the_start(first_phase, tmp_path, monkeypatch, capsys,
                                                                       interrupt_at):
    start, start_state = first_phase
    cfg = second_phase_cfg(tmp_path, start)
    shift_scores(monkeypatch, -50.0)
    if interrupt_at:  # stopped after its state at step 3 and resumed: the resumed run makes the same comparison
        with pytest.raises(Interrupted):
            train(cfg, monkeypatch, interrupt_at=interrupt_at)
        assert json.loads((artifacts.train_state_dir(cfg) / training.STATE_FILE).read_text())["step"] == 3
    result, run, _ = train(second_phase_cfg(tmp_path, start), monkeypatch)

    out = artifacts.finetuned_dir(cfg)
    assert out != start
    own_best = max(h["accuracy"] for h in result["history"])
    assert [h["step"] for h in result["history"]] == [4, 6] and own_best < start_state["best"]["metric"]
    assert result["metric"] == start_state["best"]["metric"] and result["step"] == start_state["best"]["step"]
    assert result["kept_from"] == str(start)
    assert (out / "model_state.pdparams").read_bytes() == (start / "model_state.pdparams").read_bytes()
    saved = json.loads((out / "training_state.json").read_text())
    assert saved["best"]["kept_from"] == str(start) and saved["model_init"] == "checkpoint"
    assert saved["finished"]["steps"] == 6 and saved["history"] == result["history"]  # this phase's curve
    assert run.metrics["best/accuracy"] == start_state["best"]["metric"]
    assert "kept the starting checkpoint" in capsys.readouterr().out


def test_a_second_phase_that_beats_its_start_keeps_its_own(first_phase, tmp_path, monkeypatch):
    start, start_state = first_phase
    cfg = second_phase_cfg(tmp_path, start)
    shift_scores(monkeypatch, +50.0)
    result, _, _ = train(cfg, monkeypatch)
    assert "kept_from" not in result and result["metric"] > start_state["best"]["metric"]
    assert result["metric"] == max(h["accuracy"] for h in result["history"])
    # at a rate of 1e-2 six steps move the weights: the checkpoint is this phase's, not the start's
    out = artifacts.finetuned_dir(cfg)
    assert (out / "model_state.pdparams").read_bytes() != (start / "model_state.pdparams").read_bytes()


def test_a_start_selected_with_other_task_settings_is_not_compared(first_phase, tmp_path, monkeypatch, capsys):
    start, start_state = first_phase
    shift_scores(monkeypatch, -50.0)
    result, _, _ = train(second_phase_cfg(tmp_path, start, "task.data.heldout_size=24"), monkeypatch)
    assert "kept_from" not in result and result["metric"] < start_state["best"]["metric"]
    assert "not compared with the starting checkpoint" in capsys.readouterr().out
