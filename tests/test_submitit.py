"""Runs launched by Hydra's submitit launcher: SLURM's variables as torchrun's, DDP with no torchrun,
a sweep's objective from a job, and preemption (SIGUSR2) taking the SIGTERM path: save, requeue, resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist
import yaml

from rednet.integrations.submitit import env_from_submitit
from tests.conftest import CONFIG_DIR, FAST, ROOT, run_cli

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

DIGITS = [*FAST, "data=digits", "model=rednet18", "data.batch_size=32", "trainer.limit_train_batches=4"]
DDP_ENV = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"]


@pytest.fixture
def clean_env(monkeypatch):
    # env_from_submitit writes os.environ itself, which monkeypatch cannot undo: without the full
    # restore, WORLD_SIZE=16 leaks into every later test's subprocesses and they refuse to start.
    saved = dict(os.environ)
    for name in [*DDP_ENV, "SUBMITIT_EXECUTOR"] + [n for n in os.environ if n.startswith(("SLURM_", "SUBMITIT_"))]:
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    monkeypatch.undo()
    os.environ.clear()
    os.environ.update(saved)


def slurm_task(monkeypatch, job_id, procid, localid):
    """The variables SLURM sets for task ``procid`` of a 2-node, 16-task job (srun's, as submitit runs it)."""
    for name, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": job_id, "SLURM_NTASKS": "16",
                        "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": str(procid // 8), "SLURM_PROCID": str(procid),
                        "SLURM_LOCALID": str(localid), "SLURM_JOB_NODELIST": "gpu-node[07-08]"}.items():
        monkeypatch.setenv(name, value)


def test_slurm_variables_become_torchruns(clean_env):
    slurm_task(clean_env, "4242", procid=9, localid=1)
    env_from_submitit()
    assert {k: os.environ[k] for k in DDP_ENV[:4]} == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1",
                                                        "MASTER_ADDR": "gpu-node07"}
    port = os.environ["MASTER_PORT"]
    assert 20000 <= int(port) < 40000
    for name in DDP_ENV:  # rank 0 of the same job, on the first node: the same rendezvous
        clean_env.delenv(name)
    slurm_task(clean_env, "4242", procid=0, localid=0)
    env_from_submitit()
    assert (os.environ["RANK"], os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("0", "gpu-node07", port)
    for name in DDP_ENV:  # another job on the same node: another port
        clean_env.delenv(name)
    slurm_task(clean_env, "4243", procid=0, localid=0)
    env_from_submitit()
    assert os.environ["MASTER_PORT"] != port


def test_torchrun_and_plain_runs_are_left_alone(clean_env):
    slurm_task(clean_env, "4242", procid=3, localid=3)
    clean_env.setenv("RANK", "5")  # torchrun inside a submitit job
    env_from_submitit()
    assert os.environ["RANK"] == "5" and "WORLD_SIZE" not in os.environ
    clean_env.delenv("RANK")
    clean_env.delenv("SUBMITIT_EXECUTOR")  # srun python train.py, without submitit: SLURM alone says nothing
    env_from_submitit()
    assert not any(name in os.environ for name in DDP_ENV)


def test_launcher_configs():
    from hydra import compose, initialize_config_dir

    from rednet.config import register_configs

    register_configs()

    def launcher(name, *overrides):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=[f"hydra/launcher={name}", *overrides],
                          return_hydra_config=True)
        return cfg.hydra.launcher

    one = launcher("submitit_slurm_ddp")
    assert one._target_.endswith("SlurmLauncher")
    assert (one.nodes, one.gpus_per_node, one.tasks_per_node, one.signal_delay_s) == (1, 8, 8, 120)
    assert one.max_num_timeout > 0  # a job at its time limit is requeued
    assert launcher("submitit_slurm_ddp", "hydra.launcher.gpus_per_node=4").tasks_per_node == 4
    many = launcher("submitit_slurm_ddp_multinode")
    assert (many.nodes, many.tasks_per_node, many.gpus_per_node) == (2, 8, 8)
    local = launcher("submitit_local_ddp")
    assert local._target_.endswith("LocalLauncher") and (local.tasks_per_node, local.gpus_per_node) == (2, 0)



def test_a_requeued_job_resumes_from_its_own_run_whatever_resume_said(clean_env, tmp_path):
    from rednet.integrations.submitit import resume_for_job

    run = tmp_path / "run"
    other = str(tmp_path / "other/checkpoints/last.pt")
    for resume in (None, "auto", "if_exists", other):  # not a job: resume is the user's
        assert resume_for_job(resume, run) == resume
    slurm_task(clean_env, "4242", procid=0, localid=0)
    # The job's first start: its folder has no checkpoint yet.
    assert [resume_for_job(r, run) for r in (None, "auto", "if_exists", other)] == ["if_exists", "auto",
                                                                                    "if_exists", other]
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints/last.pt").write_bytes(b"saved before the requeue")
    assert [resume_for_job(r, run) for r in (None, "auto", "if_exists", other)] == ["if_exists"] * 4

def test_preemption_signal_stops_the_trainer_first_then_requeues(clean_env):
    """In a job, SIGUSR2 goes to the trainer's SIGTERM handler; submitit's requeue runs once the
    trainer has stopped (Interrupted), not before."""
    from rednet.engine.trainer import Interrupted
    from rednet.integrations.submitit import save_before_requeue

    clean_env.setenv("SUBMITIT_EXECUTOR", "local")
    calls = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGUSR2, lambda s, f: calls.append(("requeue", s)))  # what submitit installs
        signal.signal(signal.SIGTERM, lambda s, f: calls.append(("ignored", s)))
        with pytest.raises(Interrupted):
            with save_before_requeue():
                signal.signal(signal.SIGTERM, lambda s, f: calls.append(("trainer stops", s)))  # Trainer.fit
                os.kill(os.getpid(), signal.SIGUSR2)
                time.sleep(0.1)
                assert calls == [("trainer stops", signal.SIGTERM)]
                raise Interrupted("stopped by SIGTERM after epoch 1; saved last.pt", signal.SIGTERM)
        assert calls == [("trainer stops", signal.SIGTERM), ("requeue", signal.SIGUSR2)]
        signal.signal(signal.SIGTERM, lambda s, f: calls.append(("ignored", s)))  # fit() has returned
        with save_before_requeue():  # outside training submitit requeues at once
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.1)
        assert calls[-1] == ("requeue", signal.SIGUSR2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_folder(sweep: Path) -> Path:
    runs = [p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_two_tasks_train_as_torchrun_does(tmp_path):
    """tests/test_distributed.py's run (2 processes, gloo), once under torchrun and once as one
    submitit_local job of 2 tasks: the same metrics."""
    settings = ["trainer=ddp", *DIGITS, "trainer.max_epochs=2"]
    env = {"OMP_NUM_THREADS": "1"}  # what torchrun sets for each of its processes
    torchrun = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(ROOT / "train.py"), *settings, f"hydra.run.dir={tmp_path}/torchrun"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=1800, env={**os.environ, **env})
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    job = run_cli("train.py", "-m", "hydra/launcher=submitit_local_ddp", *settings,
                  f"hydra.sweep.dir={tmp_path}/submitit", cwd=tmp_path, timeout=1800, env=env)
    assert job.returncode == 0, job.stderr[-3000:]
    run = run_folder(tmp_path / "submitit")
    assert "2 process(es)" in (run / "train.log").read_text()
    expected = json.loads((tmp_path / "torchrun/metrics.json").read_text())
    got = json.loads((run / "metrics.json").read_text())
    assert got["val"] == expected["val"] and got["val"]["count"] == 360
    assert got["train"]["loss"] == expected["train"]["loss"] and got["best"] == expected["best"]
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"best.pt", "last.pt", "last.prev.pt"}


@pytest.mark.slow
def test_one_trial_sweep_through_submitit_returns_its_metric(tmp_path):
    result = run_cli("train.py", "-m", "hparams_search=digits_optuna", "hydra.sweeper.n_trials=1",
                     "hydra/launcher=submitit_local", *DIGITS, "trainer.max_epochs=1", "trainer.limit_val_batches=4",
                     f"hydra.sweep.dir={tmp_path}", cwd=tmp_path, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "0/metrics.json").read_text())
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert best["best_value"] == metrics["best"]["acc1"]
    assert f"returns optimized_metric best.acc1 = {metrics['best']['acc1']!r}" in (tmp_path / "0/train.log").read_text()


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the job's processes through /proc")
def test_preempted_job_saves_requeues_and_resumes_to_the_same_result(tmp_path):
    settings = [*DIGITS, "trainer.max_epochs=3", "trainer.limit_val_batches=2"]
    plain = run_cli("train.py", *settings, f"hydra.run.dir={tmp_path}/plain", cwd=tmp_path, timeout=1800)
    assert plain.returncode == 0, plain.stderr[-3000:]

    sweep = tmp_path / "sweep"
    job = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_local", *settings,
                            f"hydra.sweep.dir={sweep}"], cwd=tmp_path, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 1200
        while not list(sweep.glob("*/checkpoints/last.pt")):  # epoch 1 is saved: warn the job in epoch 2
            assert job.poll() is None and time.time() < deadline, job.stdout.read()[-3000:]
            time.sleep(0.2)
        controller = int(next((sweep / ".submitit").iterdir()).name)  # a local job's id is its controller's pid
        for task in children(controller):
            os.kill(task, signal.SIGUSR2)  # what SLURM sends before a time limit or a preemption
        output, _ = job.communicate(timeout=1800)
    finally:
        job.kill()
    assert job.returncode == 0, output[-3000:]
    run = run_folder(sweep)
    log = (run / "train.log").read_text()
    assert "preempted: checkpoints/last.pt is saved; submitit requeues the job" in log
    assert f"resumed from {run}/checkpoints/last.pt" in log
    got = json.loads((run / "metrics.json").read_text())
    expected = json.loads((tmp_path / "plain/metrics.json").read_text())
    assert (got["epoch"], got["step"]) == (3, 12)
    assert got["val"] == expected["val"] and got["best"] == expected["best"]
    assert got["train"]["loss"] == pytest.approx(expected["train"]["loss"], rel=1e-6)
