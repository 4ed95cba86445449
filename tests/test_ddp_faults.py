"""Two gloo processes on the CPU that lose a worker or are preempted, and continue to the same result.

Each slow test launches ``torchrun`` with the command a user would run: a fixed run folder and
``resume=if_exists``, the same for the first start and every restart. The reference is the same
command, uninterrupted. Slow: every launch starts two Python processes with torch.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from rednet.engine.trainer import Trainer
from rednet.io import read_checkpoint, save_checkpoint
from scripts.fault_drill import outcome, worker_pids
from tests.conftest import FAST, ROOT, compose_config, run_cli

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

# 2 epochs of 6 steps, a checkpoint every 2 steps; digits' random shifts exercise every rank's generators.
RUN = ["trainer=ddp", "data=digits", "model=rednet18", "data.batch_size=32", "trainer.max_epochs=2",
       "trainer.limit_train_batches=6", "trainer.limit_val_batches=3", "trainer.save_every_n_steps=2",
       "trainer.progress=none", "trainer.device=cpu", "resume=if_exists"]
TIMEOUT = 900


def torchrun(run_dir: Path, *torchrun_args: str, own_store: bool = True) -> subprocess.Popen:
    """The line of docs/scaling.md, "One command for every start"; its output (the log and the
    errors) all on stdout. ``own_store=False``: torchrun's default, which lends its store to the
    workers and keeps it across restarts."""
    env = {k: v for k, v in os.environ.items() if k != "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"}
    if own_store:
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             *torchrun_args, str(ROOT / "train.py"), *RUN, f"hydra.run.dir={run_dir}"],
                            cwd=run_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def wait_until(predicate, proc: subprocess.Popen, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended first (rc={proc.returncode}): {proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def assert_same_run(run_dir: Path, reference) -> None:
    (metrics, weights), (ref_metrics, ref_weights) = outcome(run_dir), reference
    assert metrics == ref_metrics
    for key in ref_weights:
        torch.testing.assert_close(weights[key], ref_weights[key], rtol=0, atol=0, msg=key)


def test_resume_if_exists_continues_its_own_run_folder_or_starts_fresh(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    cfg = compose_config(FAST + ["data=digits", "model=rednet18", "data.batch_size=32", "trainer.max_epochs=2",
                                 "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "resume=if_exists"])
    run = tmp_path / "outputs" / "job-42"
    with caplog.at_level("INFO"):
        first = Trainer(cfg, run)
    assert first.resumed_from is None and first.epoch == 0
    assert f"resume=if_exists: {run} has no checkpoints/last.pt yet, starting the run" in caplog.text
    first.epoch, first.step = 1, 2  # as if it had trained an epoch
    first.save("last.pt")
    # A newer run of the same model and data, which resume=auto would take.
    save_checkpoint({"config": {"model": {"name": "rednet18"}, "data": {"name": "digits"}}},
                    tmp_path / "outputs" / "other" / "checkpoints" / "last.pt")
    again = Trainer(cfg, run)  # the same command, after a restart
    assert again.resumed_from == run / "checkpoints" / "last.pt" and (again.epoch, again.step) == (1, 2)
    assert "run the same command again to continue (resume=if_exists)" in again.resume_hint()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = torchrun(run_dir)
    output, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, output[-3000:]
    return outcome(run_dir)


@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("own_store", [True, False], ids=["own-store", "torchruns-store"])
def test_sigkill_of_a_rank_mid_epoch_restarts_and_ends_like_an_uninterrupted_run(tmp_path, reference, own_store):
    run_dir = tmp_path / "run"
    proc = torchrun(run_dir, "--max-restarts=1", own_store=own_store)
    ckpt = run_dir / "checkpoints" / "last.pt"
    wait_until(lambda: ckpt.exists() and read_checkpoint(ckpt)["step"] >= 4, proc)  # mid-epoch 1
    os.kill(worker_pids(proc.pid)[1], signal.SIGKILL)
    output, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, output[-3000:]
    assert f"resumed from {ckpt}: epoch 0, step " in output  # the restarted group continued that run's last.pt
    assert_same_run(run_dir, reference)


@pytest.mark.slow
@needs_gloo
def test_sigterm_to_the_agent_saves_hints_on_every_rank_and_a_second_launch_finishes_exactly(tmp_path, reference):
    run_dir = tmp_path / "run"
    proc = torchrun(run_dir)
    ckpt = run_dir / "checkpoints" / "last.pt"
    wait_until(ckpt.exists, proc)
    proc.send_signal(signal.SIGTERM)  # what a scheduler's preemption sends to the job
    output, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode != 0
    hints = [line for line in output.splitlines() if line.startswith("error: stopped by SIGTERM")]
    assert len(hints) == 2, output[-3000:]  # every rank, one line each
    assert all(f"saved {ckpt}; run the same command again to continue (resume=if_exists)" in h for h in hints)
    saved = read_checkpoint(ckpt)
    assert saved["epoch"] * 6 + saved["batch_in_epoch"] == saved["step"] < 12  # stopped part-way, at a step

    again = torchrun(run_dir)  # the same command
    output, _ = again.communicate(timeout=TIMEOUT)
    assert again.returncode == 0, output[-3000:]
    assert f"resumed from {ckpt}: epoch {saved['epoch']}, step {saved['step']}" in output
    assert_same_run(run_dir, reference)


@pytest.mark.slow
@needs_gloo
def test_a_kill_of_rank_0_while_it_writes_a_checkpoint_leaves_a_loadable_last_pt(tmp_path, reference):
    run_dir = tmp_path / "run"
    proc = torchrun(run_dir, "--max-restarts=1")
    folder = run_dir / "checkpoints"
    wait_until(lambda: (folder / "last.pt").exists(), proc)
    # The next write's temporary file, named after rank 0's pid: kill it while torch.save fills it.
    writing = []
    wait_until(lambda: writing.extend(p for p in folder.glob(".last.pt.tmp-*")) or writing, proc)
    os.kill(int(writing[0].name.rsplit("-", 1)[1]), signal.SIGKILL)
    read_checkpoint(folder / "last.pt")  # whole, whatever moment the kill hit
    output, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, output[-3000:]
    assert_same_run(run_dir, reference)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lost_process_errors_become_one_line(tmp_path):
    """gloo's errors when another process is gone, as this machine's runs printed them, become one
    LostProcess line; any other RuntimeError passes through untouched."""
    from rednet.engine.distributed import DistInfo, LostProcess, lost_process_errors

    info = DistInfo(rank=0, world_size=2, local_rank=0)
    for message, reason in [
        ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4501",
         "Connection closed by peer [127.0.0.1]:4501"),
        ("Application timeout caused pair closure", "Application timeout caused pair closure"),
    ]:
        with pytest.raises(LostProcess) as raised, lost_process_errors(info, tmp_path / "last.pt"):
            raise RuntimeError(message)
        assert str(raised.value) == f"rank 0 lost another process of the run ({reason}); no checkpoint was written yet"
    with pytest.raises(RuntimeError, match="a bug"), lost_process_errors(info, tmp_path / "last.pt"):
        raise RuntimeError("a bug")


@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP])
def test_a_dead_or_hung_rank_stops_the_others_within_the_timeout(tmp_path, fault):
    # Without torchrun, which would stop the others itself: only the process group's timeout
    # (trainer.ddp_timeout_s) and gloo's own error on a closed connection are left to do it.
    timeout_s = 20
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    ranks = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), *RUN, "trainer.max_epochs=50",
                               f"trainer.ddp_timeout_s={timeout_s}", f"hydra.run.dir={tmp_path / 'run'}"],
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    try:
        wait_until(lambda: (tmp_path / "run" / "checkpoints" / "last.pt").exists(), ranks[0])
        os.kill(ranks[1].pid, fault)
        hit = time.monotonic()
        _, stderr = ranks[0].communicate(timeout=TIMEOUT)
        waited = time.monotonic() - hit
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert ranks[0].returncode == 1, stderr[-3000:]
    # A step and a collective at most; the margin is for this shared, loaded machine.
    assert waited < (5 if fault == signal.SIGKILL else timeout_s) + 60
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert errors[0].startswith("error: rank 0 lost another process of the run (")
    assert "the last checkpoint is" in errors[0] and "resume=if_exists" in errors[0]
    if fault == signal.SIGSTOP:  # gloo says which timeout struck: the collective's or its connection's
        assert "Timed out" in errors[0] or "Application timeout caused pair closure" in errors[0], errors[0]


# A rank's join, alone, in a fresh process: the watchdog ends the process, which must not be pytest.
JOIN = """
import sys, time
import torch
from rednet.engine import distributed
from rednet.errors import UserError
if len(sys.argv) > 2:  # simulate gloo stuck in C++ on a peer that never answers
    from torch.distributed import HashStore
    distributed.rendezvous = lambda *args, **kwargs: iter([(HashStore(), 0, 0)])
    distributed.dist.init_process_group = lambda *args, **kwargs: time.sleep(600)
try:
    distributed.init_distributed(torch.device("cpu"), float(sys.argv[1]))
except UserError as error:
    sys.stderr.write(f"error: {error}\\n")
    sys.exit(error.exit_code)
"""


def join_alone(rank: int, timeout_s: float, port: int, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    """A rank of a 2-process run that joins with no other process there; and how long its join took."""
    env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(ROOT)}
    env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    # Import time is not the join's: the child prints once torch is in, and the clock starts there.
    proc = subprocess.Popen([sys.executable, "-c", "import torch; print(flush=True)\n" + JOIN, str(timeout_s), *extra],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.readline()
    started = time.monotonic()
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), time.monotonic() - started


@needs_gloo
@pytest.mark.parametrize("rank", [1, 0])
def test_a_join_that_cannot_connect_ends_within_the_timeout_with_one_line(rank):
    port = free_port()  # closed: rank 1 finds no store there; rank 0 opens it and nobody comes
    result, took = join_alone(rank, 3, port)
    assert result.returncode == 1, result.stderr[-3000:]
    assert 3 <= took < 3 + 10, took  # the margin: this shared, loaded machine's start-up of the store
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: rank {rank} of 2 waited up to trainer.ddp_timeout_s=3 s "
                                                   f"for "), result.stderr
    waited_for = (f"rank 0's store at 127.0.0.1:{port}" if rank else f"the other 1 process(es) to join its store at "
                  f"127.0.0.1:{port}")
    assert waited_for in lines[0] and "check that all 2 processes were started" in lines[0]


@needs_gloo
def test_a_join_stuck_inside_gloo_is_ended_by_the_watchdog_with_one_line():
    result, took = join_alone(1, 3, free_port(), "stuck")
    assert result.returncode == 1, result.stderr[-3000:]
    assert 3 <= took < 3 + 10, took
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: rank 1 of 2 waited up to trainer.ddp_timeout_s=3 s for "
                                                   "rank 0's store at 127.0.0.1:"), result.stderr
    assert "(no answer within 3 s)" in lines[0]


def test_ddp_without_master_addr_is_one_config_line(tmp_path):
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": str(free_port())}
    result = run_cli("train.py", "trainer=ddp", "data=digits", "model=rednet18", *FAST,
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip() == ("error: launched as 2 processes (WORLD_SIZE) but MASTER_ADDR is not set; start "
                                     "them with torchrun, or set MASTER_ADDR and MASTER_PORT"), result.stderr


def test_lost_process_errors_alone_reads_the_launch_from_the_environment(monkeypatch):
    """Around a whole command (rednet.cli.guarded) it has no DistInfo or checkpoint to go by."""
    from rednet.engine.distributed import LostProcess, lost_process_errors

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LostProcess) as raised, lost_process_errors():
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                           "[127.0.0.1]:4501. This is typically a peer that died")
    assert str(raised.value) == ("rank 1 lost another process of the run (Connection closed by peer "
                                 "[127.0.0.1]:4501); the other processes' output says why they stopped")
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: a gloo error is nobody else's fault
    with pytest.raises(RuntimeError, match="pair.cc"), lost_process_errors():
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")


RANK_OF_A_GROUP = """
import sys, time
import torch
import torch.distributed as dist
from rednet.engine import distributed
time.sleep(float(sys.argv[1]))
distributed.init_distributed(torch.device("cpu"), 30)
dist.all_reduce(torch.ones(1))
print("joined", flush=True)
time.sleep(float(sys.argv[2]))
"""


@pytest.mark.slow
@needs_gloo
def test_a_restarted_group_in_torchruns_shared_store_never_reads_the_previous_starts_addresses():
    """torchrun (without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1) lends its store to the workers and
    keeps it across restarts. The first group joins and dies; the restarted rank 1 comes well
    before rank 0, as it may after a restart. With the first group's keys in its reach it would
    connect to the dead rank 0 and fail within seconds (PyTorch issue 135712)."""
    agent_store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(agent_store.port), "WORLD_SIZE": "2",
           "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "1", "PYTHONPATH": str(ROOT)}

    def group(restart: int, delays: list[float], live: float) -> list[subprocess.Popen]:
        return [subprocess.Popen([sys.executable, "-c", RANK_OF_A_GROUP, str(delay), str(live)], cwd=ROOT,
                                 env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank),
                                      "TORCHELASTIC_RESTART_COUNT": str(restart)},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for rank, delay in enumerate(delays)]

    first = group(0, [0, 0], live=600)
    try:
        assert all(proc.stdout.readline() == "joined\n" for proc in first), [p.communicate() for p in first]
    finally:
        for proc in first:
            proc.kill()
            proc.communicate()
    again = group(1, [8, 0], live=0)  # rank 0 comes 8 s late; gloo gives up on a refused connect in ~4 s
    results = [proc.communicate(timeout=120) for proc in again]
    for proc, (stdout, stderr) in zip(again, results):
        assert proc.returncode == 0 and stdout == "joined\n", stderr[-3000:]


def test_torchruns_shared_store_with_restarts_on_several_nodes_is_one_config_line(monkeypatch):
    """Each node's torchrun counts its own restarts, so the start's keys cannot be told apart there."""
    from rednet.engine.distributed import init_distributed
    from rednet.errors import ConfigError

    for name, value in {"RANK": "1", "WORLD_SIZE": "4", "GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port()), "TORCHELASTIC_USE_AGENT_STORE": "True",
                        "TORCHELASTIC_MAX_RESTARTS": "3"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=r"^torchrun --max-restarts on several nodes .* launch with "
                                          r"TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun \.\.\.$"):
        init_distributed(torch.device("cpu"), 3)
