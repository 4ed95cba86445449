"""Kill a digits training run at random moments and check that nothing is lost.

    python scripts/fault_drill.py [--runs 20] [--seed 0]

First an uninterrupted reference run. Then, per drill: start the same run, kill it (SIGKILL or
SIGTERM) either during a training step or while a checkpoint is being written, check that
``checkpoints/last.pt`` loads, resume with ``resume=auto`` until the run completes, and compare its
final metrics with the reference. Prints a markdown tally. Exits non-zero if any drill failed.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rednet.engine.checkpoint import read_checkpoint  # noqa: E402
from rednet.errors import CheckpointError  # noqa: E402

# Small enough for minutes on two cores; mid-epoch checkpoints give the kills more to hit.
RUN = ["data=digits", "model=rednet18", "trainer.max_epochs=3", "data.batch_size=64", "trainer.progress=none",
       "trainer.device=cpu", "trainer.save_every_n_steps=7"]
MODES = [("step", signal.SIGKILL), ("step", signal.SIGTERM), ("write", signal.SIGKILL), ("write", signal.SIGTERM)]


def start(workdir: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    # cwd=workdir: resume=auto looks under workdir/outputs only, so drills do not see each other.
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *RUN, *extra, f"hydra.run.dir={run_dir}"],
                            cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def final_metrics(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"epoch": metrics["epoch"], "step": metrics["step"], "val": metrics["val"]}


def wait_for(predicate, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if predicate():
            return True
        time.sleep(0.002)
    return False


def drill(index: int, base: Path, reference: dict, rng: random.Random) -> dict:
    where, sig = MODES[index % len(MODES)]
    workdir = base / f"drill_{index:02d}"
    first = workdir / "outputs" / "first"
    first.mkdir(parents=True)
    ckpt = first / "checkpoints" / "last.pt"
    proc = start(workdir, first)
    record = {"drill": index, "kill": f"{signal.Signals(sig).name} during {where}", "ok": False, "note": ""}
    # Kill only once a checkpoint exists: before that there is nothing to lose.
    if not wait_for(ckpt.exists, proc, 600):
        record["note"] = f"run ended before its first checkpoint (rc={proc.poll()})"
        return record
    if where == "write":
        # The next write's temporary file: kill while torch.save is filling it.
        tmp = ckpt.parent
        hit = wait_for(lambda: any(p.name.startswith(".last.pt.tmp") for p in tmp.iterdir()), proc, 600)
        if not hit:
            record["note"] = "no checkpoint write to hit before the run ended"
    else:
        time.sleep(rng.uniform(0.0, 8.0))
    if proc.poll() is None:
        proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=600)
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
    _, stderr = proc.communicate(timeout=900)
    if proc.returncode != 0:
        record["note"] = f"resume=auto failed (rc={proc.returncode}): {stderr.strip().splitlines()[-1:]}"
        return record
    got = final_metrics(resumed)
    record["ok"] = got == reference
    if not record["ok"]:
        record["note"] = f"final metrics differ: {got['val']} vs {reference['val']}"
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
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
    reference_dir = args.workdir / "reference"
    proc = start(args.workdir, reference_dir)
    _, stderr = proc.communicate(timeout=900)
    if proc.returncode != 0:
        sys.exit(f"the uninterrupted reference run failed: {stderr.strip().splitlines()[-1:]}")
    reference = final_metrics(reference_dir)
    print(f"reference: {reference} ({time.monotonic() - started:.0f} s)", flush=True)

    records = []
    for i in range(args.runs):
        record = drill(i, args.workdir, reference, rng)
        records.append(record)
        print(f"drill {i + 1}/{args.runs}: {record['kill']}, killed at {record.get('killed_at', '-')}, "
              f"rc={record.get('rc')}: {'survived' if record['ok'] else 'FAILED ' + record['note']}", flush=True)
        if not args.keep:
            shutil.rmtree(args.workdir / f"drill_{i:02d}", ignore_errors=True)

    print()
    print("| kill | drills | survived |")
    print("|---|---:|---:|")
    for where, sig in MODES:
        label = f"{signal.Signals(sig).name} during {where}"
        group = [r for r in records if r["kill"] == label]
        print(f"| {label} | {len(group)} | {sum(r['ok'] for r in group)} |")
    survived = sum(r["ok"] for r in records)
    print(f"| **all** | {len(records)} | **{survived}** |")
    print(f"\n{survived}/{len(records)} survived; final val metrics equal the uninterrupted run's "
          f"({time.monotonic() - started:.0f} s in all)")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    sys.exit(0 if survived == len(records) else 1)


if __name__ == "__main__":
    main()
