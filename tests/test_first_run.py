"""A new user's first hour: the README's quick start as written, runs that say what they are doing and
how they ended, failed runs that say why in their log and leave no TensorBoard or checkpoint folder."""

import json
import logging
import os
import re
import shlex
import warnings

import pytest

from rednet.engine.trainer import Trainer
from rednet.errors import CheckpointError, ConfigError
from tests.conftest import ROOT, compose_config, run_cli, tiny

TINY = tiny(data="digits", batch_size=32, epochs=2, train_batches=2, val_batches=2)


def summary_of(lines: list[str]) -> dict:
    """The closing summary's numbers and paths, read from the log lines."""
    start = next((i for i, line in enumerate(lines) if line.startswith("finished ")), None)
    assert start is not None, f"no closing summary in: {lines}"
    head = re.fullmatch(r"finished (\d+) epochs in (\d+)m(\d\d)s, (\d+) train img/s: best top-1 ([\d.]+)% at epoch "
                        r"(\d+), final top-1 ([\d.]+)% \(top-5 ([\d.]+)%\)", lines[start])
    assert head, lines[start]
    paths = dict(re.fullmatch(r"  (best checkpoint|metrics|TensorBoard|evaluate it) +(.+)", line).groups()
                 for line in lines[start + 1:])
    return {"epochs": int(head[1]), "best": float(head[5]), "best_epoch": int(head[6]), "final": float(head[7]),
            "top5": float(head[8]), **paths}


def test_start_up_messages_and_closing_summary(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="rednet")
    Trainer(compose_config(TINY), tmp_path).fit()
    lines = [r.getMessage() for r in caplog.records if r.name == "rednet"]
    order = ["building data=digits", "building model=rednet18", "M params", "epoch 1/2:", "epoch 2/2:", "finished"]
    at = [next((i for i, line in enumerate(lines) if fragment in line), None) for fragment in order]
    assert None not in at and at == sorted(at), lines
    summary = summary_of(lines)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["epochs"] == 2 and summary["best_epoch"] == metrics["best"]["epoch"]
    assert summary["best"] == pytest.approx(100 * metrics["best"]["acc1"], abs=0.005)
    assert summary["final"] == pytest.approx(100 * metrics["val"]["acc1"], abs=0.005)
    assert summary["top5"] == pytest.approx(100 * metrics["val"]["acc5"], abs=0.005)
    assert summary["best checkpoint"] == str(tmp_path / "checkpoints/best.pt")
    assert summary["metrics"] == str(tmp_path / "metrics.json")
    assert summary["TensorBoard"] == f"tensorboard --logdir {tmp_path / 'tensorboard'}"
    assert any((tmp_path / "tensorboard").iterdir())
    assert summary["evaluate it"] == f"python eval.py ckpt={tmp_path / 'checkpoints/best.pt'}"


def test_resume_auto_with_nothing_to_resume_leaves_no_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # resume=auto looks under ./outputs
    with pytest.raises(CheckpointError, match="resume=auto found no checkpoints/last.pt"):
        Trainer(compose_config([*TINY, "resume=auto"]), tmp_path / "run")
    assert not (tmp_path / "run/tensorboard").exists() and not (tmp_path / "run/checkpoints").exists()


def test_errors_go_into_the_runs_log(tmp_path, capsys):
    """Hydra's log file (train.log) gets the error line that the console shows, and a bug's traceback."""
    from rednet.cli import _CommandFailed, guarded

    handler = logging.FileHandler(tmp_path / "train.log")
    logging.getLogger().addHandler(handler)
    try:
        def bad_value(cfg):
            raise ConfigError("optim.lr=0 must be positive")

        def ctrl_c(cfg):
            raise KeyboardInterrupt

        def bug(cfg):
            raise RuntimeError("a bug")

        with pytest.raises(SystemExit) as e:
            guarded(bad_value)(None)
        assert e.value.code == 2
        with pytest.raises(SystemExit) as e:
            guarded(ctrl_c)(None)
        assert e.value.code == 130
        with pytest.raises(_CommandFailed) as e:  # its traceback printed by the entry point
            guarded(bug)(None)
        assert isinstance(e.value.__cause__, RuntimeError)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert capsys.readouterr().err.splitlines() == ["error: optim.lr=0 must be positive",
                                                    "error: interrupted by Ctrl-C; nothing was saved"]
    log = (tmp_path / "train.log").read_text()
    assert "error: optim.lr=0 must be positive\nerror: interrupted by Ctrl-C; nothing was saved\n" in log
    assert "error: the run failed with an unexpected error\nTraceback" in log and "RuntimeError: a bug" in log


def test_data_workers_default_to_the_machines_cores():
    from rednet.data import build_datamodule

    cfg = compose_config(["data=fake", "data.num_classes=10", "data.image_size=8"])
    assert cfg.data.num_workers is None and compose_config(["data=digits"]).data.num_workers == 0
    loader = build_datamodule(cfg.data).train_loader(batch_size=4)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert loader.num_workers == min(8, cores)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PyTorch's "... worker processes ... suggested max" warning
        loader.check_worker_number_rationality()


@pytest.mark.slow
def test_readme_quick_start_as_written(tmp_path):
    """`python train.py data=digits`, from the README, in a fresh folder: at least 97% final top-1,
    and a closing summary whose paths exist and whose eval command works."""
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"pip install -e \. && (python train\.py .+)\n", readme)[1]
    assert command == "python train.py data=digits"
    # The timeout only guards against a hang: a loaded machine takes many times the idle minute and a half.
    result = run_cli("train.py", *command.split()[2:], cwd=tmp_path, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split(" - ", 1)[1] for line in result.stdout.splitlines() if "[rednet][INFO] - " in line]
    summary = summary_of(lines)
    assert summary["final"] >= 97.0, summary
    run_dir = tmp_path / summary["best checkpoint"].split("/checkpoints/")[0]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val"]["acc1"] >= 0.97 and summary["final"] == pytest.approx(100 * metrics["val"]["acc1"], abs=0.005)
    assert (tmp_path / summary["metrics"]).is_file() and (tmp_path / summary["best checkpoint"]).is_file()
    evaluated = run_cli(*shlex.split(summary["evaluate it"])[1:], f"hydra.run.dir={tmp_path}/eval", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((tmp_path / "eval/metrics.json").read_text())["acc1"] == pytest.approx(metrics["best"]["acc1"])
