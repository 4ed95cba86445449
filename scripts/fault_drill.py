"""Kill a digits training run at random moments and check that nothing is lost.

    python scripts/fault_drill.py [--runs 20] [--seed 0] [--ddp [--kill rank1|all] [--own-store]]

First an uninterrupted reference run. Then, per drill: start the same run, kill it, check that
``checkpoints/last.pt`` loads, let the run continue until it completes, and compare its final
metrics and weights with the reference. Prints a markdown tally. Exits non-zero if any drill
failed or ended elsewhere than the reference.

One process (default): SIGKILL or SIGTERM, during a training step or while a checkpoint is being
written; the run continues with ``resume=auto`` in a new folder.

``--ddp``: two gloo processes under ``torchrun``, with the README's one command for every start
(a fixed run folder, ``resume=if_exists``). By default (``--kill rank1``) every drill SIGKILLs rank 1
during a step after the first checkpoint, under ``--max-restarts=1``: torchrun restarts the group,
which must come back and continue by itself. ``--kill all`` cycles that, a SIGKILL of rank 0 while
it writes a checkpoint (also restarted), and a SIGTERM to torchrun itself, as from a scheduler's
preemption (then the same command is run again). torchrun lends its store to the workers unless
``--own-store`` (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``); both must survive restarts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rednet.errors import CheckpointError  # noqa: E402
from rednet.io import read_checkpoint  # noqa: E402

# Small enough for minutes on two cores; mid-epoch checkpoints give the kills more to hit.
RUN = ["data=digits", "model=rednet18", "trainer.max_epochs=3", "data.batch_size=64", "trainer.progress=none",
       "trainer.device=cpu", "trainer.save_every_n_steps=7"]
MODES = [("step", signal.SIGKILL), ("step", signal.SIGTERM), ("write", signal.SIGKILL), ("write", signal.SIGTERM)]
# Two ranks of 32 images each; 2 epochs of 12 steps keep a drill near a minute of training. A
# group that cannot connect ends within 2 minutes (ddp_timeout_s), a failed drill instead of a hang.
DDP_RUN = ["trainer=ddp", *RUN, "trainer.max_epochs=2", "trainer.limit_train_batches=12",
           "trainer.save_every_n_steps=4", "trainer.ddp_timeout_s=120", "resume=if_exists"]
# (moment, target, signal): what a lost worker, a crash during a write, and a preemption look like.
DDP_MODES = [("step", "rank 1", signal.SIGKILL), ("write", "rank 0", signal.SIGKILL),
             ("step", "torchrun", signal.SIGTERM)]
TIMEOUT = 900


def start(workdir: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    # cwd=workdir: resume=auto looks under workdir/outputs only, so drills do not see each other.
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *RUN, *extra, f"hydra.run.dir={run_dir}"],
                            cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def start_torchrun(run_dir: Path, *torchrun_args: str, own_store: bool = False) -> subprocess.Popen:
    """The README's one command for every start; its output goes to a log file in the run's parent."""
    env = dict(os.environ)
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    if own_store:  # torchrun's switch: rank 0 hosts a fresh store for each start instead of torchrun
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    with open(run_dir.parent / "torchrun.log", "a") as log:
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 *torchrun_args, str(ROOT / "train.py"), *DDP_RUN, f"hydra.run.dir={run_dir}"],
                                cwd=run_dir.parent, stdout=log, stderr=subprocess.STDOUT, env=env)


def worker_pids(agent_pid: int) -> dict[int, int]:
    """{rank: pid} of the worker processes that torchrun (``agent_pid``) started."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == agent_pid:
                env = dict(v.split("=", 1) for v in (entry / "environ").read_text().split("\0") if "=" in v)
                found[int(env["RANK"])] = int(entry.name)
        except (OSError, KeyError, ValueError):  # gone meanwhile, or not a worker
            continue
    return found


def outcome(run_dir: Path) -> tuple[dict, dict]:
    """The final metrics that must not depend on interruptions, and the final weights."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    weights = read_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
    return {"epoch": metrics["epoch"], "step": metrics["step"], "val": metrics["val"]}, weights


def equal(a: tuple[dict, dict], b: tuple[dict, dict]) -> bool:
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def wait_for(predicate, proc: subprocess.Popen, timeout: float):
    """The predicate's first true value, or False if the process ends or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if found := predicate():
            return found
        time.sleep(0.002)
    return False


def writing(folder: Path) -> list[Path]:
    """The temporary file of a checkpoint being written, named after the writer's pid."""
    return [p for p in folder.glob(".last.pt.tmp-*")] if folder.is_dir() else []


def drill(index: int, base: Path, reference: tuple[dict, dict], rng: random.Random) -> dict:
    where, sig = MODES[index % len(MODES)]
    workdir = base / f"drill_{index:02d}"
    first = workdir / "outputs" / "first"
    first.mkdir(parents=True)
    ckpt = first / "checkpoints" / "last.pt"
    proc = start(workdir, first)
    record = {"drill": index, "kill": f"{signal.Signals(sig).name} during {where}", "survived": False,
              "equal": False, "note": ""}
    # Kill only once a checkpoint exists: before that there is nothing to lose.
    if not wait_for(ckpt.exists, proc, 600):
        record["note"] = f"run ended before its first checkpoint (rc={proc.poll()})"
        return record
    if where == "write":
        # The next write's temporary file: kill while torch.save is filling it.
        if not wait_for(lambda: writing(ckpt.parent), proc, 600):
            record["note"] = "no checkpoint write to hit before the run ended"
    else:
        time.sleep(rng.uniform(0.0, 8.0))
    if proc.poll() is None:
        proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=TIMEOUT)
    record["rc"] = proc.returncode
    if sig == signal.SIGTERM and proc.returncode not in (0, 128 + signal.SIGTERM):
        record["note"] = f"SIGTERM exit code {proc.returncode}: {stderr.strip().splitlines()[-1:]}"
        return record
    try:
        state = read_checkpoint(ckpt)
    except CheckpointError as e:
        record["note"] = f"last.pt unusable after the kill: {e}"
        return record
    record["killed_at"] = f"epoch {state['epoch']} + {state.get('batch_in_epoch', 0)} steps"
    resumed = workdir / "outputs" / "resumed"
    proc = start(workdir, resumed, "resume=auto")
    _, stderr = proc.communicate(timeout=TIMEOUT)
    if proc.returncode != 0:
        record["note"] = f"resume=auto failed (rc={proc.returncode}): {stderr.strip().splitlines()[-1:]}"
        return record
    return finish(record, resumed, reference)


def ddp_drill(index: int, base: Path, reference: tuple[dict, dict], rng: random.Random, modes: list,
              own_store: bool, window: float) -> dict:
    """One drill; a kill lands within ``window`` seconds of the first last.pt, a fraction of the
    reference run's length, so that it interrupts the run on a fast machine as on a slow one."""
    where, target, sig = modes[index % len(modes)]
    run_dir = base / f"drill_{index:02d}" / "run"
    run_dir.parent.mkdir(parents=True)
    ckpt = run_dir / "checkpoints" / "last.pt"
    record = {"drill": index, "kill": f"{signal.Signals(sig).name} to {target} during {where}", "survived": False,
              "equal": False, "note": ""}
    restarts = [] if target == "torchrun" else ["--max-restarts=1"]
    proc = start_torchrun(run_dir, *restarts, own_store=own_store)
    if not wait_for(ckpt.exists, proc, TIMEOUT):
        record["note"] = f"run ended before its first checkpoint (rc={proc.poll()})"
        return record
    if where == "write":
        # The value the wait saw: a second glob could miss a temporary file renamed in between.
        found = wait_for(lambda: writing(ckpt.parent), proc, TIMEOUT)
        victim = int(found[0].name.rsplit("-", 1)[1]) if found else None
    else:
        time.sleep(rng.uniform(0.0, window))
        victim = proc.pid if target == "torchrun" else worker_pids(proc.pid).get(int(target.split()[-1]))
    if victim is None or proc.poll() is not None:
        record["note"] = "the run ended before the kill"
        return record
    try:
        os.kill(victim, sig)
    except ProcessLookupError:
        record["note"] = "the process to kill was gone"
        return record
    try:
        state = read_checkpoint(ckpt)  # at once: a checkpoint whole at every moment
    except CheckpointError as e:
        record["note"] = f"last.pt unusable after the kill: {e}"
        return record
    record["killed_at"] = f"epoch {state['epoch']} + {state.get('batch_in_epoch', 0)} steps"
    record["rc"] = proc.wait(timeout=TIMEOUT)
    if target == "torchrun":  # preempted: the same command again
        proc = start_torchrun(run_dir, own_store=own_store)
        record["rc"] = proc.wait(timeout=TIMEOUT)
    log = (run_dir.parent / "torchrun.log").read_text()
    if record["rc"] != 0:
        # A worker's own line (rednet's "error: ...", or an exception), not torchrun's summary footer.
        errors = [line.strip() for line in log.splitlines()
                  if line.startswith("error: ") or ("Error: " in line and "ChildFailedError" not in line)]
        record["note"] = f"did not complete (rc={record['rc']}): {errors[-1:]}"
        return record
    if f"resumed from {ckpt}" not in log:  # the run must have come back, not finished before the kill
        record["note"] = "completed without a resume: the kill did not interrupt it"
        return record
    return finish(record, run_dir, reference)


def finish(record: dict, run_dir: Path, reference: tuple[dict, dict]) -> dict:
    record["survived"] = True
    got = outcome(run_dir)
    record["equal"] = equal(got, reference)
    if not record["equal"]:
        record["note"] = f"final metrics or weights differ: {got[0]['val']} vs {reference[0]['val']}"
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ddp", action="store_true", help="two gloo processes under torchrun (see above)")
    parser.add_argument("--kill", choices=["rank1", "all"], default="rank1",
                        help="--ddp: SIGKILL rank 1 in every drill (default), or cycle all three faults")
    parser.add_argument("--own-store", action="store_true",
                        help="--ddp: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (default: torchrun lends its store)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="a new or empty folder for the runs (default: a fresh temporary folder); "
                             "removed at the end unless --keep")
    parser.add_argument("--keep", action="store_true", help="keep the runs' folders")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    # Never under the checkout's outputs/, where resume=auto would later find the drill's runs,
    # and never a folder with someone's files in it: the drill deletes its workdir when done.
    if args.workdir is None:
        args.workdir = Path(tempfile.mkdtemp(prefix="rednet-fault-drill-"))
    elif args.workdir.exists() and (not args.workdir.is_dir() or any(args.workdir.iterdir())):
        parser.error(f"--workdir {args.workdir} exists and is not an empty folder; give a new one")
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"working in {args.workdir}", flush=True)

    started = time.monotonic()
    reference_dir = args.workdir / "reference" / "run"
    reference_dir.parent.mkdir()
    modes = DDP_MODES if args.kill == "all" else DDP_MODES[:1]
    proc = start_torchrun(reference_dir, own_store=args.own_store) if args.ddp else start(args.workdir, reference_dir)
    if proc.wait(timeout=TIMEOUT) != 0:
        sys.exit(f"the uninterrupted reference run failed (rc={proc.returncode}); see {reference_dir.parent}")
    reference = outcome(reference_dir)
    reference_s = time.monotonic() - started
    print(f"reference: {reference[0]} ({reference_s:.0f} s)", flush=True)
    # The first last.pt comes at a sixth of the run's steps: a kill within a quarter of the run's
    # time after it lands before the end, with the start-up both share.
    window = min(8.0, reference_s / 4)

    records = []
    for i in range(args.runs):
        record = (ddp_drill(i, args.workdir, reference, rng, modes, args.own_store, window) if args.ddp
                  else drill(i, args.workdir, reference, rng))
        records.append(record)
        verdict = "equal" if record["equal"] else "survived, NOT EQUAL" if record["survived"] else "FAILED"
        print(f"drill {i + 1}/{args.runs}: {record['kill']}, killed at {record.get('killed_at', '-')}, "
              f"rc={record.get('rc')}: {verdict} {record['note']}", flush=True)
        if not args.keep:
            shutil.rmtree(args.workdir / f"drill_{i:02d}", ignore_errors=True)

    print()
    print("| kill | drills | survived | equal to the uninterrupted run |")
    print("|---|---:|---:|---:|")
    labels = [f"{signal.Signals(s).name} to {t} during {w}" for w, t, s in modes] if args.ddp else \
        [f"{signal.Signals(s).name} during {w}" for w, s in MODES]
    for label in labels:
        group = [r for r in records if r["kill"] == label]
        print(f"| {label} | {len(group)} | {sum(r['survived'] for r in group)} | {sum(r['equal'] for r in group)} |")
    equal_runs = sum(r["equal"] for r in records)
    print(f"| **all** | {len(records)} | {sum(r['survived'] for r in records)} | **{equal_runs}** |")
    how = ("two processes, torchrun" + (" with its own store" if args.own_store else "")) if args.ddp else "one process"
    print(f"\n{equal_runs}/{len(records)} ended with the uninterrupted run's final val metrics and weights "
          f"({how}; {time.monotonic() - started:.0f} s in all)")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    sys.exit(0 if equal_runs == len(records) else 1)


if __name__ == "__main__":
    main()
