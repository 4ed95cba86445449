"""Runs launched by submitit (``python train.py -m hydra/launcher=submitit_slurm_ddp ...``).

Each task of a job is one DDP process; :func:`env_from_submitit` gives it its rank. What is left is
requeueing. submitit asks SLURM to warn a job with SIGUSR2 ``signal_delay_s`` before its time limit,
and on that signal it requeues the job, which then runs the same command again, in the same run
folder. Here the warning takes the path SIGTERM takes: the trainer finishes its step, writes
``checkpoints/last.pt`` and stops; only then does submitit requeue the job; and the job that runs
again resumes from that ``last.pt``: train.py runs a submitit job with ``resume=if_exists`` (a
requeued job whatever ``resume`` says: :func:`resume_for_job`), the one mechanism that torchrun
restarts and requeued sbatch scripts use too (``Trainer.checkpoint_to_resume``). A preemption that
arrives as SIGTERM is the trainer's own path already; the job SLURM requeues after it resumes the
same way.
"""

from __future__ import annotations

import logging
import os
import signal
import zlib
from contextlib import contextmanager
from pathlib import Path

from rednet.engine.checkpointing import Interrupted

log = logging.getLogger("rednet")


def in_job() -> bool:
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def env_from_submitit() -> None:
    """Inside a job that submitit launched (``hydra/launcher=submitit_*``), sets what torchrun would
    have: RANK, WORLD_SIZE and LOCAL_RANK from the job's tasks (SLURM_PROCID, SLURM_NTASKS and
    SLURM_LOCALID on SLURM, read through submitit), MASTER_ADDR (the job's first node) and
    MASTER_PORT (derived from the job id, so that every task agrees and jobs sharing a node do not
    collide). Variables already set win: torchrun inside a job, or a MASTER_PORT of your own.
    """
    if not in_job() or "RANK" in os.environ:
        return
    import submitit

    job = submitit.JobEnvironment()
    os.environ.update(RANK=str(job.global_rank), WORLD_SIZE=str(job.num_tasks), LOCAL_RANK=str(job.local_rank))
    os.environ.setdefault("MASTER_ADDR", job.hostnames[0] if job.num_nodes > 1 else "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(20000 + zlib.crc32(job.job_id.encode()) % 20000))


def resume_for_job(resume: str | None, run_dir: str | Path) -> str | None:
    """What ``resume`` a run in a submitit job takes. A job that has run before in this run folder (a
    requeue: its ``checkpoints/last.pt`` is there) continues from that, whatever ``resume`` said: the
    requeued command is the first one again, and ``resume=auto`` or a path would start over from
    another run's checkpoint. A first start keeps ``resume``; without one it is ``if_exists``."""
    if not in_job():
        return resume
    if resume is None or (Path(run_dir) / "checkpoints" / "last.pt").is_file():
        if resume not in (None, "if_exists"):
            log.info(f"requeued job: resuming from its own {Path(run_dir) / 'checkpoints' / 'last.pt'}, "
                     f"not resume={resume}")
        return "if_exists"
    return resume


@contextmanager
def save_before_requeue():
    """Inside a submitit job, submitit's preemption signal first stops the trainer as SIGTERM does
    (the step ends, ``last.pt`` is written), then lets submitit requeue the job."""
    if not in_job():
        yield
        return
    import submitit

    warning = submitit.JobEnvironment._usr_sig()  # SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise
    requeue = signal.getsignal(warning)  # submitit's: checkpoint the submission, requeue, exit
    ignore = signal.getsignal(signal.SIGTERM)  # submitit's too; the trainer replaces it while it trains
    warned = []

    def on_warning(signum, frame):
        stop = signal.getsignal(signal.SIGTERM)
        if stop == ignore or not callable(stop):  # not training: last.pt is as new as it gets
            requeue(signum, frame)
            return
        warned.append(signum)
        stop(signal.SIGTERM, frame)

    signal.signal(warning, on_warning)
    try:
        yield
    except Interrupted:
        if not warned:
            raise
        log.info("preempted: checkpoints/last.pt is saved; submitit requeues the job, which resumes from it")
        requeue(warned[0], None)  # rank 0 requeues and exits; the other ranks return here
        raise
    finally:
        signal.signal(warning, requeue)
