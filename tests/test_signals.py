"""Ctrl-C, as a user presses it, through the real command line: the first saves and stops, a second
stops at once. Either way the run ends in one line that says what was saved, with no traceback."""

import re
import signal
import subprocess
import sys
import time

import pytest

from rednet.io import read_checkpoint
from tests.conftest import ROOT

RUN = ["data=digits", "trainer.limit_val_batches=1", "trainer.progress=none", "trainer.device=cpu"]
# Batches of 512 make a training step last a second or more, so that both signals land inside one step.
SLOW_STEPS = ["model=rednet26", "data.batch_size=512"]


def start(tmp_path, *extra):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *RUN, *extra, "hydra.run.dir=run"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_until(stream, fragment: str) -> None:
    for line in stream:
        if fragment in line:
            return
    raise AssertionError(f"the run ended before printing {fragment!r}")


def press_ctrl_c_twice(proc) -> tuple[int, str]:
    proc.send_signal(signal.SIGINT)
    # The second press must come after the first was handled: the run says so at once.
    read_until(proc.stderr, "press Ctrl-C again to stop at once")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    return proc.returncode, errors[0]


def test_first_ctrl_c_saves_and_stops(tmp_path):
    proc = start(tmp_path, "model=rednet18", "trainer.max_epochs=1")
    try:
        read_until(proc.stdout, "M params")  # training starts
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    last = tmp_path / "run/checkpoints/last.pt"
    assert f"SIGINT: finishing this step, then saving {last}; press Ctrl-C again" in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    match = re.fullmatch(rf"error: stopped by SIGINT at epoch 1, step (\d+); saved {re.escape(str(last))}; continue "
                         rf"with resume=auto \(or resume={re.escape(str(last))}\)", errors[0])
    assert match, errors[0]
    assert read_checkpoint(last)["step"] == int(match[1]) >= 1  # the step under way was finished, then saved
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.pt"]


@pytest.mark.slow  # RedNet-26 steps at batch 512, slow on purpose
def test_second_ctrl_c_before_the_first_checkpoint(tmp_path):
    proc = start(tmp_path, *SLOW_STEPS, "trainer.max_epochs=1")
    try:
        read_until(proc.stdout, "M params")  # training starts
        _, error = press_ctrl_c_twice(proc)
    finally:
        proc.kill()
    assert re.fullmatch(r"error: stopped at once by a second SIGINT at step 0 \(epoch 1\), before the first "
                        r"checkpoint: nothing was saved", error), error
    assert not (tmp_path / "run/checkpoints").exists()
    assert "stopped at once by a second SIGINT" in (tmp_path / "run/train.log").read_text()


@pytest.mark.slow
def test_second_ctrl_c_after_a_checkpoint(tmp_path):
    proc = start(tmp_path, *SLOW_STEPS, "trainer.max_epochs=3", "trainer.limit_train_batches=2")
    best = tmp_path / "run/checkpoints/best.pt"
    try:
        deadline = time.monotonic() + 1200
        while not best.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # best.pt is written right after last.pt: epoch 1 is saved
        assert best.exists(), "epoch 1 did not finish"
        _, error = press_ctrl_c_twice(proc)
    finally:
        proc.kill()
    last = tmp_path / "run/checkpoints/last.pt"
    match = re.fullmatch(rf"error: stopped at once by a second SIGINT at step (\d+) \(epoch 2\); saved: "
                         rf"{re.escape(str(last))} \(step (\d+), after epoch 1\); not saved: (.*); continue from it "
                         rf"with resume=auto", error)
    assert match, error
    assert read_checkpoint(last)["step"] == int(match[2]) == 2  # two batches an epoch
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.pt", "last.pt"]  # no half-written file
