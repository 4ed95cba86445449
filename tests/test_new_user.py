"""A new user's fresh trial (issue 26 §4): run folders with spaces, commands that paste as printed, a
second live run into the same folder, logs of every command, --help pages, export's order of checks,
and the intra-op threads sized against the loader workers."""

import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from rednet.errors import ConfigError, DeployError
from tests.conftest import FAST, ROOT, command_config, compose_config, run_cli

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
    from rednet.commands import command_line

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
    from rednet.commands import quote_path_overrides

    assert quote_path_overrides(["data.root=a,b", "ckpt='x y'", "hydra.run.dir=outputs/${now:%H}", "model=a,b"]) == \
        ["data.root=a,b", "ckpt='x y'", "hydra.run.dir=outputs/${now:%H}", "model=a,b"]
    assert quote_path_overrides(["+images=résumé", "out=a=b"]) == ["+images='résumé'", "out='a=b'"]


# -- 3. a second live run into the same folder -------------------------------------------------------

HOLD = """
import sys, time
from pathlib import Path
from rednet.engine.context import lock_run_dir
lock_run_dir(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def live_run(tmp_path):
    """A process that holds tmp_path/run's lock, as a live run does, until the test kills it."""
    run = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert child.stdout.readline().strip() == "held"
    yield run, child
    child.kill()
    child.wait()


def test_a_second_run_into_a_live_runs_folder_is_refused(live_run):
    from rednet.engine.trainer import Trainer

    run, child = live_run
    (run / "train.log").write_text("the live run's log\n")
    with pytest.raises(ConfigError) as info:
        Trainer(compose_config(TINY), run)
    message = str(info.value)
    assert f"run folder {run} is in use by a live run (pid {child.pid} on {socket.gethostname()}" in message, message
    assert "hydra.run.dir=" in message and "\n" not in message
    assert sorted(p.name for p in run.iterdir()) == [".run.lock", "train.log"]  # nothing written there
    assert (run / "train.log").read_text() == "the live run's log\n"
    child.kill()  # the first run dies: its folder is free at once, and resume works as before
    child.wait()
    assert Trainer(compose_config([*TINY, "resume=if_exists"]), run).run_dir == run


def test_the_command_line_refuses_before_hydra_writes_into_the_folder(live_run, capsys, monkeypatch):
    run, child = live_run
    (run / ".hydra").mkdir()
    (run / ".hydra/config.yaml").write_text("the live run's config\n")
    monkeypatch.setattr(sys, "argv", ["train.py", *TINY, f"hydra.run.dir={run}"])
    with pytest.raises(SystemExit) as exit_:
        from rednet import cli

        cli.train()
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: run folder {run} is in use by a live run (pid {child.pid}")
    assert (run / ".hydra/config.yaml").read_text() == "the live run's config\n"
    assert not (run / "train.log").exists()


def test_a_finished_run_leaves_its_folder_free(tmp_path):
    from rednet.engine import context

    context.lock_run_dir(tmp_path / "run")
    context.lock_run_dir(tmp_path / "run")  # a second context of the same process: the same run
    context.unlock_run_dir(tmp_path / "run")
    assert (tmp_path / "run" / ".run.lock").exists()
    context.unlock_run_dir(tmp_path / "run")
    assert not (tmp_path / "run" / ".run.lock").exists()
    result = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(600)", ""), str(tmp_path / "run")],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert result.stdout.strip() == "held", result.stderr


# -- 9. intra-op threads sized against the loader workers --------------------------------------------

@pytest.mark.parametrize("cores,workers,env,default,threads", [
    (2, 2, {}, 2, 1), (2, 0, {}, 2, None), (16, 4, {}, 16, 12), (16, 4, {}, 8, None), (8, 12, {}, 8, 1),
    (2, 2, {"OMP_NUM_THREADS": "2"}, 2, None), (2, 2, {"MKL_NUM_THREADS": "2"}, 2, None),
])
def test_intra_op_threads_rule(cores, workers, env, default, threads):
    from rednet.engine.context import intra_op_threads

    assert intra_op_threads(cores, workers, env, default) == threads


def test_the_threads_are_set_and_said(monkeypatch, caplog, tmp_path):
    import torch

    from rednet.engine.context import setup_run

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    caplog.set_level(logging.INFO, logger="rednet")
    setup_run(compose_config([*TINY, "data.num_workers=2"]), tmp_path / "run")
    assert set_to == [1]
    assert "intra-op threads: 1 (3 cores less data.num_workers=2 loader workers; set OMP_NUM_THREADS to choose)" in \
        [r.getMessage() for r in caplog.records]


# -- 6. every command logs what it did; 2. the printed "evaluate it" line runs as printed ---------------

def test_eval_and_visualize_log_what_they_did(tiny_run, tmp_path):
    line = next(line for line in tiny_run.lines if line.startswith("  evaluate it"))
    printed = shlex.split(line.split("evaluate it", 1)[1])  # as a shell would split the pasted line
    result = run_cli(*printed[1:], "trainer.limit_val_batches=1", f"hydra.run.dir={tmp_path}/eval")
    assert result.returncode == 0, result.stderr[-2000:]
    logged = (tmp_path / "eval/eval.log").read_text()
    assert f"evaluated {tiny_run}/checkpoints/best.pt on data=digits: " in logged and "top-1" in logged, logged
    assert "| images | top-1 | top-5 | loss |" in logged
    result = run_cli("visualize.py", f"ckpt='{tiny_run}/checkpoints/best.pt'", "num_images=1",
                     f"hydra.run.dir={tmp_path}/vis")
    assert result.returncode == 0, result.stderr[-2000:]
    logged = (tmp_path / "vis/visualize.log").read_text()
    assert "heat-maps and kernels of 1 image(s) at layer1.1" in logged and f"in {tmp_path}/vis" in logged, logged


# -- 7. --help: what the command does, examples, and only the groups it uses ---------------------------

COMMANDS = ["train", "eval", "export", "visualize", "pack", "predict"]


def help_of(name, capsys, monkeypatch) -> str:
    from hydra.core.global_hydra import GlobalHydra

    from rednet import cli

    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--help"])
    try:
        cli._main(lambda cfg: pytest.fail("--help ran the command"), name)
    except SystemExit as e:
        assert e.code in (0, None)
    finally:
        GlobalHydra.instance().clear()
    return capsys.readouterr().out


def groups_used(name) -> dict[str, list[str]]:
    """The config groups in configs/<name>.yaml's defaults, with the options each has on disk."""
    import yaml

    defaults = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())["defaults"]
    groups = [next(iter(d)) for d in defaults if isinstance(d, dict)]
    return {g: sorted(p.stem for p in (ROOT / "configs" / g).glob("*.yaml")) for g in groups}


@pytest.mark.parametrize("name", COMMANDS)
def test_help_says_what_the_command_does(name, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    text = help_of(name, capsys, monkeypatch)
    lines = text.splitlines()
    assert lines[0].startswith(f"{name}.py: "), lines[0]
    examples = lines[lines.index("Examples:") + 1:]
    examples = examples[:examples.index("")]
    assert 2 <= len(examples) <= 4 and all(e.startswith("  python ") for e in examples), examples
    listed = {}
    for line in lines[next(i for i, line in enumerate(lines) if line.startswith("Config groups")) + 1:]:
        if not line.startswith("  "):
            break
        group, options = line.split(None, 1)
        listed[group] = sorted(o.strip() for o in options.split("(")[0].split(","))
    used = groups_used(name)
    if name in ("eval", "export", "visualize", "predict"):  # the groups that matter for a checkpoint
        shown = {"eval": ["model", "data", "trainer"]}.get(name, ["model", "data"])
        used = {g: used[g] for g in shown}
        assert "Required:\n  ckpt=PATH" in text and "optim" not in text and "hparams_search" not in text
    if name == "pack":
        used = {"data": ["imagenet"]}
    assert listed == used, (listed, used)
    assert "???" not in text and "ckpt: null" not in text and "powered by Hydra" not in text
    assert list(tmp_path.iterdir()) == []  # --help makes no run folder


def test_help_through_the_real_command_line(tmp_path):
    result = run_cli("eval.py", "--help", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("eval.py: evaluates a checkpoint"), result.stdout
    assert list(tmp_path.iterdir()) == []
