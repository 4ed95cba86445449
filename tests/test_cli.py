"""A user's mistakes, through the real command line: one line on stderr naming the culprit and the
fix, exit status 2, no traceback."""

import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import RunsCommand, run_cli


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.mark.parametrize("args,fragments", [
    (["trainer.foo=1"], ["trainer.foo", "Key 'foo' not in 'TrainerConfig'", "--cfg job"]),
    (["trainer.max_epochs=ten"], ["trainer.max_epochs=ten", "could not be converted to Integer"]),
    (["model=rednet27"], ["model/rednet27", "rednet26"]),
    (["optim.lr=-1"], ["optim.lr=-1.0 must be positive"]),
    (["data.batch_size=0"], ["data.batch_size=0 must be positive"]),
    (["-m", "model=rednet26,resnet27"], ["model/resnet27"]),
    (["data=cifar10", "data.download=false", "data.root=/nonexistent/cifar"],
     ["/nonexistent/cifar", "data.download=true"]),
])
def test_train_rejects_bad_input(tmp_path, args, fragments):
    result = run_cli("train.py", *args, f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/sweep")
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "tensorboard").exists()
    if "data.root=/nonexistent/cifar" in args:  # it fails after Hydra made the run folder: its log says why
        error = next(line for line in result.stderr.splitlines() if line.startswith("error: "))
        assert error in (tmp_path / "run" / "train.log").read_text().splitlines()[-1]


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": RunsCommand(f"touch {marker}")}, tmp_path / "evil.pt")
    result = run_cli("eval.py", f"ckpt={tmp_path}/evil.pt", f"hydra.run.dir={tmp_path}/eval")
    assert_one_line_error(result, "evil.pt", "refusing to load it")
    assert not marker.exists()


def test_truncated_checkpoint(tmp_path):
    torch.save({"model": {"w": torch.randn(1000)}}, tmp_path / "full.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:1500])
    result = run_cli("eval.py", f"ckpt={tmp_path}/cut.pt", f"hydra.run.dir={tmp_path}/eval")
    assert_one_line_error(result, f"checkpoint {tmp_path}/cut.pt is truncated", "copy it again or use another")
    assert_speaks_plainly(result.stderr.strip())
    (tmp_path / "cut.prev.pt").write_bytes((tmp_path / "full.pt").read_bytes())
    result = run_cli("eval.py", f"ckpt={tmp_path}/cut.pt", f"hydra.run.dir={tmp_path}/eval")
    assert_one_line_error(result, "cut.pt is truncated", f"use the previous checkpoint {tmp_path}/cut.prev.pt")


# The reader's internals that once leaked into these lines.
INTERNALS = ("PytorchStreamReader", "miniz", "zip archive", "KeyError", "IndexError", "EOFError", "RuntimeError",
             "OSError", "Errno", "unpack requires")


def assert_speaks_plainly(message: str) -> None:
    # The length without the paths (pytest's temporary folders vary in length)
    words = " ".join(word for word in message.split() if "/" not in word)
    assert len(words) < 170, (len(words), message)
    assert not [word for word in INTERNALS if word in message], message


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.pt").write_text("hello")
    result = run_cli("eval.py", f"ckpt={tmp_path}/notes.pt", f"hydra.run.dir={tmp_path}/eval")
    assert_one_line_error(result, f"{tmp_path}/notes.pt is not a checkpoint: torch.save did not write it",
                          "checkpoints/best.pt")
    assert_speaks_plainly(result.stderr.strip())
    torch.save([1, 2, 3], tmp_path / "list.pt")
    result = run_cli("eval.py", f"ckpt={tmp_path}/list.pt", f"hydra.run.dir={tmp_path}/eval")
    assert_one_line_error(result, "list.pt", "is not a checkpoint")


def _damaged_files():
    import io

    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.randn(1000)}, "epoch": 3}, buffer)
    whole = buffer.getvalue()
    legacy = io.BytesIO()
    torch.save({"epoch": 3}, legacy, _use_new_zipfile_serialization=False)
    return {"empty": (b"", "is empty (0 bytes)"), "text": (b"hello", "is not a checkpoint"),
            "json": (b'{"epoch": 3}', "is not a checkpoint"), "yaml": (b"epoch: 3\n", "is not a checkpoint"),
            "png": (b"\x89PNG\r\n\x1a\n" + bytes(64), "is not a checkpoint"),
            "zip head": (whole[:97], "is truncated"), "zip half": (whole[:len(whole) // 2], "is truncated"),
            "zip less a byte": (whole[:-1], "is truncated"),
            "legacy cut": (legacy.getvalue()[:20], "is damaged: it cannot be read as a PyTorch file"),
            "legacy first byte": (legacy.getvalue()[:1], "is damaged")}


@pytest.mark.parametrize("kind", list(_damaged_files()))
def test_damaged_checkpoints_are_said_in_the_users_words(tmp_path, kind):
    from rednet.errors import CheckpointError
    from rednet.io import read_checkpoint

    content, said = _damaged_files()[kind]
    (tmp_path / "last.pt").write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(tmp_path / "last.pt")
    message = str(info.value)
    assert f"{tmp_path}/last.pt" in message and said in message and "\n" not in message, message
    assert_speaks_plainly(message)


def test_eval_without_a_checkpoint(tmp_path):
    result = run_cli("eval.py", f"hydra.run.dir={tmp_path}/eval")
    assert_one_line_error(result, "eval.py needs a checkpoint: ckpt=path/to/best.pt")


def test_missing_checkpoint(tmp_path):
    result = run_cli("eval.py", f"ckpt={tmp_path}/nope.pt", f"hydra.run.dir={tmp_path}/eval")
    assert_one_line_error(result, "nope.pt does not exist")


def test_official_checkpoint_needs_a_model_name(tmp_path):
    torch.save({"meta": {}, "state_dict": {"head.fc.weight": torch.zeros(10, 2048)}}, tmp_path / "official.pth")
    result = run_cli("eval.py", f"ckpt={tmp_path}/official.pth", f"hydra.run.dir={tmp_path}/eval")
    assert_one_line_error(result, "carries no config", "model=rednet26 data=imagenet")


def test_checkpoint_of_another_model_and_class_count(tmp_path):
    from rednet.models import create_model

    # RedNet-18 has two blocks in layer1 where RedNet-26 has one.
    state = create_model("rednet18", num_classes=10, cifar_stem=True, in_chans=1).state_dict()
    torch.save({"state_dict": state}, tmp_path / "r18.pth")
    result = run_cli("eval.py", f"ckpt={tmp_path}/r18.pth", "model=rednet26", "data=digits",
                     f"hydra.run.dir={tmp_path}/eval")
    assert_one_line_error(result, f"weights in {tmp_path}/r18.pth do not fit", "unexpected: backbone.layer1.1",
                          "different model")
    state = create_model("rednet26", num_classes=1000).state_dict()
    torch.save({"state_dict": state}, tmp_path / "r26.pth")
    result = run_cli("eval.py", f"ckpt={tmp_path}/r26.pth", "model=rednet26", "data=digits",
                     f"hydra.run.dir={tmp_path}/eval")
    assert_one_line_error(result, "has 1000 classes but data=digits has 10")


def test_global_batch_must_divide_across_ranks(tmp_path):
    # What torchrun would set for rank 0 of 3; the check comes before any process group forms.
    env = {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"}
    result = run_cli("train.py", "data=digits", "trainer=ddp", "data.batch_size=64", f"hydra.run.dir={tmp_path}/run",
                     env=env)
    assert_one_line_error(result, "data.batch_size=64 (the global batch) does not divide across 3 processes")
    result = run_cli("train.py", "data=digits", f"hydra.run.dir={tmp_path}/run", env=env)
    assert_one_line_error(result, "launched as 3 processes (torchrun) but trainer.strategy=single; add trainer=ddp")


@pytest.mark.slow  # three training jobs
def test_glob_sweep_is_left_to_hydra(tmp_path):
    # glob() needs Hydra's config loader to expand: the command line leaves every sweep to Hydra.
    result = run_cli("train.py", "-m", "model=glob(resnet1*)", "data=digits", "trainer.max_epochs=1",
                     "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "trainer.progress=none",
                     f"hydra.sweep.dir={tmp_path}/sweep", "hydra.sweep.subdir=${hydra.job.num}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "sweep/0/metrics.json").is_file() and not (tmp_path / "sweep/1").exists()


def cli_error(capsys, monkeypatch, *args, config="train"):
    """The command line's checks and Hydra's composition, in this process, with a command that does
    nothing once composed: its one line, or None."""
    from hydra.core.global_hydra import GlobalHydra

    from rednet import cli

    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # restored after: _main sets it
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # hydra.job.env_set below sets it in this process
    monkeypatch.setattr(sys, "argv", [f"{config}.py", *args, "hydra/job_logging=none", "hydra/hydra_logging=none"])
    try:
        cli._main(lambda cfg: None, config)
    except SystemExit as e:
        assert e.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]
    finally:
        GlobalHydra.instance().clear()
    return None


@pytest.mark.parametrize("args,fragments", [
    (["+foo=bar"], ["foo is not a config key", "--cfg job"]),
    (["+trainer.max_epoch=1"], ["trainer.max_epoch is not a config key", "did you mean trainer.max_epochs?"]),
    (["++trainer.max_epoch=1"], ["did you mean trainer.max_epochs?"]),
    (["trainer.max_epoch=1"], ["Key 'max_epoch' not in 'TrainerConfig'", "did you mean trainer.max_epochs?"]),
    (["+data.workers=2"], ["did you mean data.num_workers?"]),
    (["-m", "trainer.seed=1,2", "+model.kernel_sz=5,7"], ["did you mean model.kernel_size?"]),
])
def test_unknown_keys_are_rejected_however_spelled(capsys, monkeypatch, tmp_path, args, fragments):
    error = cli_error(capsys, monkeypatch, *args, f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/sweep")
    assert error is not None, f"{args} was accepted"
    for fragment in fragments:
        assert fragment in error, error
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [
    ["+hydra.job.env_set.OMP_NUM_THREADS=1"], ["hydra/job_logging=none"], ["hydra/launcher=basic"],
    ["++trainer.max_epochs=3"], ["experiment=rednet26_cifar10"],
])
def test_hydra_keys_and_config_groups_stay_allowed(capsys, monkeypatch, tmp_path, args):
    assert cli_error(capsys, monkeypatch, *args, f"hydra.run.dir={tmp_path}/run") is None


def test_eval_rejects_unknown_keys_too(capsys, monkeypatch, tmp_path):
    error = cli_error(capsys, monkeypatch, "ckpt=x.pt", "+data.root_dir=/data", f"hydra.run.dir={tmp_path}/e",
                      config="eval")
    assert "data.root_dir is not a config key; did you mean data.root?" in error


def test_export_and_visualize_check_against_their_own_schema(capsys, monkeypatch, tmp_path):
    # Their schemas add keys to the training schema: those are valid there, and suggested.
    assert cli_error(capsys, monkeypatch, "ckpt=x.pt", "out=m.onnx", f"hydra.run.dir={tmp_path}/x",
                     config="export") is None
    error = cli_error(capsys, monkeypatch, "ckpt=x.pt", "+outt=m.onnx", f"hydra.run.dir={tmp_path}/x", config="export")
    assert "outt is not a config key; did you mean out?" in error
    error = cli_error(capsys, monkeypatch, "ckpt=x.pt", "+num_image=2", f"hydra.run.dir={tmp_path}/v",
                      config="visualize")
    assert "num_image is not a config key; did you mean num_images?" in error
    # Spelled without +, Hydra itself refuses the key; the hint comes from the same schema.
    error = cli_error(capsys, monkeypatch, "ckpt=x.pt", "outt=m.onnx", f"hydra.run.dir={tmp_path}/x", config="export")
    assert "Key 'outt' not in 'ExportConfig'; did you mean out?" in error


def test_unwritable_run_folder(capsys, monkeypatch, tmp_path):
    (tmp_path / "afile").write_text("")
    error = cli_error(capsys, monkeypatch, "data=digits", f"hydra.run.dir={tmp_path}/afile/run")
    assert error is not None, "a run folder inside a file was accepted"
    assert f"cannot make the run folder {tmp_path}/afile/run" in error and "hydra.run.dir=" in error
    error = cli_error(capsys, monkeypatch, "-m", "trainer.seed=1,2", f"hydra.sweep.dir={tmp_path}/afile/sweep")
    assert f"{tmp_path}/afile/sweep" in error and "hydra.sweep.dir=" in error
    if Path("/proc/self").is_dir():  # the folder of the report: a place nobody can make folders in
        assert "cannot make the run folder /proc/nope" in cli_error(capsys, monkeypatch, "hydra.run.dir=/proc/nope")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # the probe left nothing
    assert cli_error(capsys, monkeypatch, f"hydra.run.dir={tmp_path}/new/run") is None


def test_checkpoint_path_that_is_a_directory(tmp_path):
    from rednet.errors import CheckpointError
    from rednet.io import read_checkpoint

    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path} is a directory, not a file; pass a checkpoint "
                                              f"file, e.g. a run's checkpoints/best.pt"):
        read_checkpoint(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    for name in ("best.pt", "last.pt"):
        torch.save({"epoch": 1}, tmp_path / "checkpoints" / name)
    with pytest.raises(CheckpointError, match=f"is a directory, not a file; pass the file in it: "
                                              f"{tmp_path}/checkpoints/best.pt "
                                              f"\\(or {tmp_path}/checkpoints/last.pt\\)"):
        read_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=f"pass the file in it: {tmp_path}/checkpoints/best.pt"):
        read_checkpoint(tmp_path / "checkpoints")
