import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rednet.config import DataConfig
from rednet.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(ROOT / "configs")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per worker, and for the commands a test starts: most tests wait on a process that
    # imports torch on one core, so a worker per core finishes the suite sooner than threads do.
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (the default in pyproject.toml): a worker per usable core, at most 4; none for
    ``-m slow``, whose tests each start several processes and time signals against them."""
    if (config.option.markexpr or "").strip() == "slow":
        return 0
    return max(1, min(4, len(os.sched_getaffinity(0))))


# Tiny, fast settings for end-to-end runs on the CPU.
FAST = ["trainer.progress=none", "trainer.device=cpu", "data.num_workers=0"]


def tiny(*, data: str | None = None, batch_size: int | None = None, epochs: int | None = None,
         train_batches: int | None = None, val_batches: int | None = None, model: str = "rednet18") -> list[str]:
    """The overrides of a small training run on the CPU: FAST, a RedNet-18, and what each argument
    sets (None keeps the config's value). The one place the suite's small runs are spelled."""
    settings = {"data": data, "data.batch_size": batch_size, "trainer.max_epochs": epochs,
                "trainer.limit_train_batches": train_batches, "trainer.limit_val_batches": val_batches}
    return [*FAST, f"model={model}", *(f"{key}={value}" for key, value in settings.items() if value is not None)]


def compose_config(overrides: list[str], name: str = "train", hydra: bool = False):
    """The config as the command line composes it; with ``hydra=True`` Hydra's own node too."""
    from rednet.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=overrides, return_hydra_config=hydra)


def involution_inputs(b, c, h, w, groups, kernel_size, stride=1, dilation=1, dtype=torch.float32, seed=0):
    """A random input (b, c, h, w) and per-pixel kernels (b, groups, K*K, ho, wo) for it."""
    from rednet.ops import output_size

    gen = torch.Generator().manual_seed(seed)
    ho, wo = output_size(h, kernel_size, stride, dilation), output_size(w, kernel_size, stride, dilation)
    x = torch.randn(b, c, h, w, generator=gen).to(dtype)
    weight = torch.randn(b, groups, kernel_size * kernel_size, ho, wo, generator=gen).to(dtype)
    return x, weight


def assert_all_close(got, want, names, rtol, atol=0.0, atol_scale=0.0, dtype=None):
    """Each tensor of ``got`` against the float64 ``want``: same shape (and ``dtype``), nothing left
    unwritten (NaN), within ``rtol`` and ``atol`` + ``atol_scale`` times the reference's largest value
    (a sum of many terms can cancel to near zero)."""
    for name, g, r in zip(names, got, want):
        assert g.shape == r.shape, name
        assert dtype is None or g.dtype == dtype, name
        assert not g.isnan().any(), f"{name}: unwritten (NaN-poisoned) elements"
        scale = float(r.abs().max()) if r.numel() else 0.0
        torch.testing.assert_close(g.double(), r.double(), rtol=rtol, atol=atol + atol_scale * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


class RunsCommand:
    """Unpickling this runs ``command`` in a shell: what a planted checkpoint or data file would do."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def command_config(name: str, overrides: list[str]):
    """What eval.py, export.py and visualize.py do before their work, in this process: the file that
    ``ckpt=`` names, opened, and the command's config completed from it."""
    from rednet.engine.trained import config_for, open_trained

    ckpt = next(o.split("=", 1)[1] for o in overrides if o.startswith("ckpt="))
    trained = open_trained(ckpt)
    return config_for(compose_config(overrides, name), trained, overrides), trained


def run_cli(script: str, *args: str, cwd: Path | None = None, timeout: int = 300, env: dict | None = None):
    """Runs ``python train.py ...`` or ``python eval.py ...`` as a user would."""
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture
def compose_cfg():
    return compose_config


_DDP_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_ddp_variables_leak():
    """A test that leaves torchrun's variables behind makes every later CLI test think it was
    launched by torchrun; fail the test that leaked, not the innocent ones after it."""
    before = {k: os.environ.get(k) for k in _DDP_VARS}
    yield
    after = {k: os.environ.get(k) for k in _DDP_VARS}
    assert after == before, f"this test leaked torchrun variables into os.environ: {after}"


# Data configs for tests that build datasets directly (tests/test_data.py, tests/test_untrusted_data.py).
CONFIGS = ROOT / "configs" / "data"


def load_data_yaml(path: Path):
    """The data node of a configs/data file; a ``# @package _global_`` file holds it under ``data:``."""
    node = OmegaConf.load(path)
    return node.data if "# @package _global_" in path.read_text() else node


def data_cfg(name: str, **overrides):
    """The schema, then configs/data/<name>.yaml where it exists, then overrides: as Hydra composes them."""
    parts = [OmegaConf.structured(DataConfig)]
    if (CONFIGS / f"{name}.yaml").exists():
        parts.append(load_data_yaml(CONFIGS / f"{name}.yaml"))
    parts.append(OmegaConf.create({"name": name, "num_workers": 0, **overrides}))
    return OmegaConf.merge(*parts)


@contextlib.contextmanager
def raises_one_line(match: str | None):
    """A DataError matching ``match`` whose message is one line: the CLI prints it as one."""
    with pytest.raises(DataError, match=match) as info:
        yield info
    assert "\n" not in str(info.value), str(info.value)


def folder_cfg(root, **overrides):
    return data_cfg("imagenet", root=root, image_size=32, val_resize=36, **overrides)
