"""Two processes with torchrun and gloo on the CPU: one run folder, and the same top-1 as one process."""

import json
import subprocess
import sys

import pytest
import torch.distributed as dist

from tests.conftest import ROOT, run_cli

# Two torchrun launches and three evaluations, each a fresh process: minutes on a 2-core CPU.
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")]


def torchrun(*args, cwd):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=600)


def test_two_process_training_matches_single_process_eval(tmp_path):
    # The default run folder (outputs/${now:...}) on purpose: the ranks must agree on one.
    result = torchrun(str(ROOT / "train.py"), "trainer=ddp", "data=digits", "model=rednet18", "trainer.max_epochs=2",
                      "data.batch_size=32", "trainer.limit_train_batches=4", "trainer.progress=none", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs
    run = runs[0]
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"best.pt", "last.pt", "last.prev.pt"}
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert result.stdout.count("epoch 2/2") + result.stderr.count("epoch 2/2") == 1  # rank 1 is silent
    trained = json.loads((run / "metrics.json").read_text())
    assert trained["val"]["count"] == 360  # every validation image once, no padding duplicates

    single = run_cli("eval.py", f"ckpt={run}/checkpoints/last.pt", "trainer=cpu", f"hydra.run.dir={tmp_path}/eval1")
    assert single.returncode == 0, single.stderr
    evaluated = json.loads((tmp_path / "eval1" / "metrics.json").read_text())
    assert evaluated["acc1"] == trained["val"]["acc1"] and evaluated["count"] == 360

    both = torchrun(str(ROOT / "eval.py"), f"ckpt={run}/checkpoints/last.pt", "trainer=ddp",
                    f"hydra.run.dir={tmp_path}/eval2", cwd=tmp_path)
    assert both.returncode == 0, both.stderr[-3000:]
    evaluated2 = json.loads((tmp_path / "eval2" / "metrics.json").read_text())
    assert evaluated2["acc1"] == trained["val"]["acc1"] and evaluated2["count"] == 360
