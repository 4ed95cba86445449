"""Hyper-parameter search with Hydra's Optuna sweeper: the recipes, the objective train.py returns,
failed trials, and the one-line error without the [sweep] extra."""

import json
import re
import subprocess
import sys

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from rednet.config import validate
from rednet.errors import ConfigError
from tests.conftest import ROOT, compose_config, run_cli, tiny

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")

RECIPES = sorted(p.stem for p in (ROOT / "configs/hparams_search").glob("*.yaml"))
TINY = tiny(epochs=1, train_batches=4, val_batches=2)


def test_recipes():
    assert RECIPES == ["cifar10_optuna", "digits_optuna"]
    cfg = compose_config(["hparams_search=digits_optuna"], hydra=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.sampler._target_.endswith("TPESampler")
    assert (sweeper.direction, sweeper.n_trials, sweeper.sampler.seed) == ("maximize", 20, 42)
    assert set(sweeper.params) == {"optim.lr", "optim.weight_decay", "trainer.label_smoothing", "sched.warmup_epochs"}
    assert (cfg.data.name, cfg.optimized_metric) == ("digits", "best.acc1")
    cifar = compose_config(["hparams_search=cifar10_optuna"], hydra=True)
    assert (cifar.experiment, cifar.data.name, cifar.model.name) == ("rednet26_cifar10", "cifar10", "rednet26")
    assert set(cifar.hydra.sweeper.params) == set(sweeper.params)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_value_a_recipe_can_sample_is_valid(recipe):
    """A range's ends and every step of it pass validate(): no trial of a recipe fails by design."""
    params = compose_config([f"hparams_search={recipe}"], hydra=True).hydra.sweeper.params
    cfg = compose_config([f"hparams_search={recipe}"])
    for key, spec in params.items():
        sweep = OverridesParser.create().parse_override(f"{key}={spec}").value()
        if hasattr(sweep, "list"):
            values = sweep.list
        elif hasattr(sweep, "stop"):  # range(start, stop, step): Optuna samples stop too
            values = [sweep.start, sweep.stop - sweep.step, sweep.stop]
        else:
            values = [sweep.start, sweep.end]
        for value in values:
            trial = cfg.copy()
            OmegaConf.update(trial, key, value)  # the schema checks the type
            validate(trial)


def test_optimized_metric_is_checked():
    with pytest.raises(ConfigError, match="optimized_metric=val.acc7 is not a metric of the run; choose one of: "
                                          "best.acc1, val.acc1"):
        validate(compose_config(["optimized_metric=val.acc7"]))
    with pytest.raises(ConfigError, match="optimized_metric=val_ema.acc1 needs the EMA of the weights: add "
                                          "trainer.ema=true"):
        validate(compose_config(["optimized_metric=val_ema.acc1"]))
    validate(compose_config(["optimized_metric=val_ema.loss", "trainer.ema=true"]))


def test_without_the_extra_the_error_is_one_line(tmp_path):
    # The plugins hidden from this process, as on an install without [sweep].
    code = ("import sys; sys.modules['hydra_plugins.hydra_optuna_sweeper'] = None; "
            "sys.modules['hydra_plugins.hydra_submitit_launcher'] = None; "
            "sys.argv[0] = 'train.py'; from rednet.cli import train; train()")
    for arg in ("hparams_search=digits_optuna", "hydra/launcher=submitit_local_ddp"):
        result = run_cli_code(code, "-m", arg, f"hydra.sweep.dir={tmp_path}")
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [
            f"error: {arg} needs Hydra's {'Optuna sweeper' if 'hparams' in arg else 'submitit launcher'}, "
            f"which is not installed: pip install -e \".[sweep]\""]
    assert not any(tmp_path.iterdir())


def run_cli_code(code, *args):
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def trials(sweep_dir):
    """{trial number: (its params, what it returned, its metrics.json or None)} from its folder."""
    found = {}
    for run in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()):
        overrides = yaml.safe_load((run / ".hydra/overrides.yaml").read_text())
        log = (run / "train.log").read_text()
        returned = re.findall(r"returns optimized_metric best\.acc1 = (\S+)", log)
        metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else None
        found[int(run.name)] = (dict(o.split("=", 1) for o in overrides), returned, metrics, log)
    return found


@pytest.mark.slow
def test_three_trials_return_their_metrics_and_the_results_name_the_best(tmp_path):
    result = run_cli("train.py", "-m", "hparams_search=digits_optuna", "hydra.sweeper.n_trials=3", *TINY,
                     f"hydra.sweep.dir={tmp_path}", timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = trials(tmp_path)
    assert sorted(runs) == [0, 1, 2]
    values = []
    for _params, returned, metrics, _ in runs.values():
        assert returned == [repr(metrics["best"]["acc1"])]  # what the sweeper got is in metrics.json
        values.append(float(returned[0]))
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(values)
    first_best = values.index(max(values))  # Optuna keeps the first of equal values
    params = runs[first_best][0]
    assert {k: str(v) for k, v in best["best_params"].items()} == {k: params[k] for k in best["best_params"]}
    assert set(best["best_params"]) == {"optim.lr", "optim.weight_decay", "trainer.label_smoothing",
                                        "sched.warmup_epochs"}


@pytest.mark.slow
def test_failed_trials_are_reported_and_the_study_goes_on(tmp_path):
    """A NaN loss (lr 1e30) and a sampled value the config rejects (label smoothing 1.5) fail their
    trials, before the good one; the good one is the best. Optuna's random sampler with seed 0
    proposes exactly those three (Optuna 2.10); the grid sampler cannot be used here: the sweeper
    crashes when the last point of a grid fails."""
    (tmp_path / "configs/hparams_search").mkdir(parents=True)
    (tmp_path / "configs/hparams_search/failing.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n  - override /hydra/sweeper: optuna\n  - override /hydra/sweeper/sampler: random\n"
        "hydra:\n  sweeper:\n    sampler:\n      seed: 0\n"
        "    direction: maximize\n    n_trials: 3\n    max_failure_rate: 1.0\n"
        "    params:\n      optim.lr: choice(0.05, 1.0e30)\n      trainer.label_smoothing: choice(0.1, 1.5)\n")
    sweep = tmp_path / "sweep"
    result = run_cli("train.py", "-m", "hparams_search=failing", f"hydra.searchpath=[file://{tmp_path}/configs]",
                     "data=digits", *TINY, "trainer.limit_train_batches=3", f"hydra.sweep.dir={sweep}",
                     "hydra.sweep.subdir=${hydra.job.num}", timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = trials(sweep)
    outcome = {(p["optim.lr"], p["trainer.label_smoothing"]): (n, returned, metrics, log)
               for n, (p, returned, metrics, log) in runs.items()}
    assert sorted(outcome) == [("0.05", "0.1"), ("1e+30", "0.1"), ("1e+30", "1.5")]
    good = outcome[("0.05", "0.1")]
    assert good[0] == 2  # after the two failures
    assert good[1] == [repr(good[2]["best"]["acc1"])]
    assert re.search(r"trial failed: loss is (nan|inf) at step \d", outcome[("1e+30", "0.1")][3])
    assert "trial failed: trainer.label_smoothing=1.5 must be in [0, 1)" in outcome[("1e+30", "1.5")][3]
    assert outcome[("1e+30", "0.1")][2] is None and outcome[("1e+30", "1.5")][2] is None  # no metrics.json
    assert "Failed experiment: trainer.label_smoothing=1.5 must be in [0, 1)" in result.stdout
    assert re.search(r"Failed experiment: loss is (nan|inf) at step \d", result.stdout)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_params"] == {"optim.lr": 0.05, "trainer.label_smoothing": 0.1}
    assert best["best_value"] == good[2]["best"]["acc1"]
