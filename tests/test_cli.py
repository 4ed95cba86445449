"""A user's mistakes, through the real command line: one line on stderr naming the culprit and the
fix, exit status 2, no traceback."""

import os

import pytest
import torch

from tests.conftest import run_cli


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


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    payload = RunsCode()
    payload.marker = tmp_path / "pwned"
    torch.save({"model": payload}, tmp_path / "evil.pt")
    result = run_cli("eval.py", f"ckpt={tmp_path}/evil.pt", f"hydra.run.dir={tmp_path}/eval")
    assert_one_line_error(result, "evil.pt", "refusing to load it")
    assert not payload.marker.exists()


def test_truncated_checkpoint(tmp_path):
    torch.save({"model": {"w": torch.randn(1000)}}, tmp_path / "full.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:1500])
    result = run_cli("eval.py", f"ckpt={tmp_path}/cut.pt", f"hydra.run.dir={tmp_path}/eval")
    assert_one_line_error(result, "cut.pt", "truncated, corrupt or not a PyTorch file", "use another copy")
    (tmp_path / "cut.prev.pt").write_bytes((tmp_path / "full.pt").read_bytes())
    result = run_cli("eval.py", f"ckpt={tmp_path}/cut.pt", f"hydra.run.dir={tmp_path}/eval")
    assert_one_line_error(result, "cut.pt", f"the previous checkpoint is {tmp_path}/cut.prev.pt")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.pt").write_text("hello")
    result = run_cli("eval.py", f"ckpt={tmp_path}/notes.pt", f"hydra.run.dir={tmp_path}/eval")
    assert_one_line_error(result, "notes.pt", "corrupt or not a PyTorch file")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    result = run_cli("eval.py", f"ckpt={tmp_path}/list.pt", f"hydra.run.dir={tmp_path}/eval")
    assert_one_line_error(result, "list.pt", "is not a checkpoint")


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

    state = create_model("rednet50", num_classes=10, cifar_stem=True, in_chans=1).state_dict()
    torch.save({"state_dict": state}, tmp_path / "r50.pth")
    result = run_cli("eval.py", f"ckpt={tmp_path}/r50.pth", "model=rednet26", "data=digits",
                     f"hydra.run.dir={tmp_path}/eval")
    assert_one_line_error(result, f"weights in {tmp_path}/r50.pth do not fit", "unexpected: backbone.layer1.1",
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


def test_glob_sweep_is_left_to_hydra(tmp_path):
    # glob() needs Hydra's config loader to expand, so the preflight cannot enumerate it.
    result = run_cli("train.py", "-m", "model=glob(resnet1*)", "data=digits", "trainer.max_epochs=1",
                     "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "trainer.progress=none",
                     f"hydra.sweep.dir={tmp_path}/sweep", "hydra.sweep.subdir=${hydra.job.num}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "sweep/0/metrics.json").is_file() and not (tmp_path / "sweep/1").exists()
