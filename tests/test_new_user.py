"""A new user's fresh trial (issue 26 §4): run folders with spaces, commands that paste as printed, a
second live run into the same folder, logs of every command, --help pages, export's order of checks,
and the intra-op threads sized against the loader workers."""

import logging
import shlex
import shutil
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from rednet.errors import DeployError
from tests.conftest import FAST, command_config, compose_config

TINY = ["data=digits", "model=rednet18", "data.batch_size=32", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1", *FAST]


# A multirun folder's name, with a space too: '=' and ',' mean a sweep to Hydra, the space two words to the shell.
AWKWARD = "0_data=digits,trainer.seed=1 my run"


class TinyRun(type(Path())):
    lines: list[str]

    def __new__(cls, path, lines):
        self = super().__new__(cls, path)
        self.lines = lines
        return self


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder with checkpoints/best.pt, trained for one batch, and the lines it logged."""
    from rednet.engine.trainer import Trainer

    run = tmp_path_factory.mktemp("tiny") / AWKWARD
    handler, logger = Lines(), logging.getLogger("rednet")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        Trainer(compose_config(TINY), run).fit()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return TinyRun(run, handler.lines)


def hydra_reads(word: str):
    override = OverridesParser.create().parse_overrides([word])[0]
    assert not override.is_sweep_override(), word
    return override.key_or_group, override.value()


# -- 2. every printed command pastes as printed ------------------------------------------------------

@pytest.mark.parametrize("folder", ["outputs/my run", "outputs/a=b", "outputs/x,y", f"multirun/2026-12-06/{AWKWARD}",
                                    "outputs/résumé", "it's", 'say "hi"', "back\\slash", "$HOME/run", "dollar'$x",
                                    "trailing\\", " lead", "1.5", "null", "plain/run"])
def test_printed_commands_paste_through_the_shell_and_hydra(folder):
    from rednet.engine.commands import command_line

    path = f"{folder}/checkpoints/best.pt" if folder not in ("1.5", "null") else folder
    printed = command_line("eval.py", {"data.root": folder}, ckpt=path)
    words = shlex.split(printed)
    assert words[:2] == ["python", "eval.py"] and len(words) == 4, printed
    assert hydra_reads(words[2]) == ("data.root", folder), printed
    assert hydra_reads(words[3]) == ("ckpt", path), printed
    if folder == "plain/run":  # nothing is quoted that needs no quotes
        assert printed == "python eval.py data.root=plain/run ckpt=plain/run/checkpoints/best.pt"


def test_the_evaluate_it_line_after_training_pastes(tiny_run):
    line = next(line for line in tiny_run.lines if line.startswith("  evaluate it"))
    words = shlex.split(line.split("evaluate it", 1)[1])
    assert words[:2] == ["python", "eval.py"] and len(words) == 3, line
    assert hydra_reads(words[2]) == ("ckpt", str(tiny_run / "checkpoints/best.pt")), line


def test_export_checks_its_output_path_before_the_deploy_extra(tiny_run, tmp_path, monkeypatch):
    from rednet.deploy.export import export_checkpoint

    monkeypatch.setitem(sys.modules, "onnx", None)  # the [deploy] extra is not installed
    (tmp_path / "a_file").write_text("")
    ckpt = f"ckpt={shutil.copy(tiny_run / 'checkpoints/best.pt', tmp_path.parent / 'plain.pt')}"
    cfg, trained = command_config("export", [ckpt, f"out={tmp_path}/a_file/model.onnx"])
    with pytest.raises(DeployError, match=f"^cannot write {tmp_path}/a_file/model.onnx: .*; choose another out="):
        export_checkpoint(cfg, trained)
    cfg, trained = command_config("export", [ckpt, f"out={tmp_path}/model.onnx"])
    with pytest.raises(DeployError, match=r"need the \[deploy\] extra \(onnx is missing\)"):
        export_checkpoint(cfg, trained)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing written


# -- 1. a run folder with a space, a non-ASCII letter, a multirun folder's = and , --------------------

def composed(monkeypatch, *args, config="train"):
    """The config the real command line composes from ``args``, in this process."""
    from hydra.core.global_hydra import GlobalHydra

    from rednet import cli

    seen = []
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # restored after: _main sets it
    monkeypatch.setattr(sys, "argv", [f"{config}.py", *args, "hydra/job_logging=none", "hydra/hydra_logging=none"])
    try:
        cli._main(seen.append, config)
    finally:
        GlobalHydra.instance().clear()
    return seen[0]


@pytest.mark.parametrize("name", ["my run", "résumé", AWKWARD, " lead"])
def test_run_folders_are_taken_as_typed(monkeypatch, tmp_path, name):
    cfg = composed(monkeypatch, f"hydra.run.dir={tmp_path}/{name}", f"data.root={tmp_path}/{name}/data")
    assert (tmp_path / name).is_dir() and cfg.data.root == f"{tmp_path}/{name}/data"
    cfg = composed(monkeypatch, f"ckpt={tmp_path}/{name}/best.pt", f"hydra.run.dir={tmp_path}/e", config="eval")
    assert cfg.ckpt == f"{tmp_path}/{name}/best.pt"


def test_a_sweep_of_paths_stays_a_sweep():
    from rednet.engine.commands import quote_path_overrides

    assert quote_path_overrides(["data.root=a,b", "ckpt='x y'", "hydra.run.dir=outputs/${now:%H}", "model=a,b"]) == \
        ["data.root=a,b", "ckpt='x y'", "hydra.run.dir=outputs/${now:%H}", "model=a,b"]
    assert quote_path_overrides(["+images=résumé", "out=a=b"]) == ["+images='résumé'", "out='a=b'"]
