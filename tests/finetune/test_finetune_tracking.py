"""`needles finetune --report-to`: TensorBoard event files hold the run's own loss curve; bad trackers fail at setup."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from tiny_models import TINY_LORA
from tiny_models import finetune_argv as tiny_finetune_argv

from harness_ext.cli import main as cli_main
from harness_ext.finetune.tracking import RUN_NAME

EVAL_META = {"lengths": [128], "depths": None, "num_samples": 4}


def finetune_argv(model: Path, out: Path, *extra: str) -> list[str]:
    return tiny_finetune_argv(model, out, *TINY_LORA, *extra, num_samples=6, eval_metadata=EVAL_META)


def scalars(logdir: Path, tag: str) -> dict[int, float]:
    """step -> value of one scalar tag in the TensorBoard event files of a folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    events.Reload()
    assert tag in events.Tags()["scalars"], events.Tags()
    return {e.step: e.value for e in events.Scalars(tag)}


def test_tensorboard_events_hold_the_training_log(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli_main(finetune_argv(tiny_llama_dir, out, "--report-to", "tensorboard", "--epochs", "2"))
    assert code == 0, capsys.readouterr().err
    history = json.loads((out / "train_log.json").read_text())
    assert len(history) == 6  # 6 examples / batch 2, two epochs
    logdir = out / "runs" / RUN_NAME
    assert list(logdir.glob("events.out.tfevents.*")), sorted(p.name for p in logdir.iterdir())
    loss = scalars(logdir, "train/loss")
    lr = scalars(logdir, "train/learning_rate")
    assert sorted(loss) == [row["step"] for row in history]
    for row in history:  # event files store float32
        assert loss[row["step"]] == pytest.approx(row["loss"], rel=1e-6, abs=1e-7)
        assert lr[row["step"]] == pytest.approx(row["lr"], rel=1e-6, abs=1e-12)
    assert len({round(v, 4) for v in loss.values()}) > 1  # a curve, not one value repeated
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["hyperparameters"]["report_to"] == ["tensorboard"]


def test_no_tracker_by_default_writes_no_runs_folder(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(finetune_argv(tiny_llama_dir, out, "--max-steps", "1")) == 0, capsys.readouterr().err
    assert not (out / "runs").exists()


@pytest.mark.parametrize(
    "report_to, message, fix",
    [
        (["tensorbord"], "report_to=['tensorbord'] is not `none` or a list of trackers", "any of tensorboard"),
        (["none", "wandb"], "is not `none` or a list of trackers", "--report-to none"),
        (["tensorboard"], "the tensorboard package is not installed", "pip install tensorboard"),
    ],
)
def test_bad_or_missing_tracker_exits_2_before_training(
    report_to, message, fix, tiny_llama_dir, tmp_path, capsys, monkeypatch
):
    if message.startswith("the tensorboard package"):
        # what Python reports for an uninstalled package: importlib.util.find_spec -> None
        monkeypatch.setitem(sys.modules, "tensorboard", None)
        monkeypatch.setitem(sys.modules, "tensorboardX", None)
    out = tmp_path / "run"
    code = cli_main(finetune_argv(tiny_llama_dir, out, "--report-to", *report_to))
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "fix:" in err and fix in err
    assert "trainable" not in err  # refused before the model was set up
    assert not (out / "runs").exists() and not (out / "adapter").exists()
