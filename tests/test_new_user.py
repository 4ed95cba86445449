"""A new user's fresh trial (issue 26 §4): run folders with spaces, commands that paste as printed, a
second live run into the same folder, logs of every command, --help pages, export's order of checks,
and the intra-op threads sized against the loader workers."""

import sys

import pytest

from rednet.errors import DeployError
from tests.conftest import FAST, command_config, compose_config, run_cli

TINY = ["data=digits", "model=rednet18", "data.batch_size=32", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1", *FAST]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder with checkpoints/best.pt, trained for one batch."""
    from rednet.engine.trainer import Trainer

    run = tmp_path_factory.mktemp("tiny") / "run"
    Trainer(compose_config(TINY), run).fit()
    return run


def test_export_checks_its_output_path_before_the_deploy_extra(tiny_run, tmp_path, monkeypatch):
    from rednet.deploy.export import export_checkpoint

    monkeypatch.setitem(sys.modules, "onnx", None)  # the [deploy] extra is not installed
    (tmp_path / "a_file").write_text("")
    ckpt = f"ckpt={tiny_run}/checkpoints/best.pt"
    cfg, trained = command_config("export", [ckpt, f"out={tmp_path}/a_file/model.onnx"])
    with pytest.raises(DeployError, match=f"^cannot write {tmp_path}/a_file/model.onnx: .*; choose another out="):
        export_checkpoint(cfg, trained)
    cfg, trained = command_config("export", [ckpt, f"out={tmp_path}/model.onnx"])
    with pytest.raises(DeployError, match=r"need the \[deploy\] extra \(onnx is missing\)"):
        export_checkpoint(cfg, trained)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
