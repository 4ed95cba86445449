"""Command-line entry points: ``python train.py ...`` / ``rednet-train``, ``python eval.py ...`` / ``rednet-eval``
``python export.py ...`` / ``rednet-export``, ``python visualize.py ...`` / ``rednet-visualize`` and
``python pack.py ...`` / ``rednet-pack``.

A user's mistake (a bad override, a missing dataset, a checkpoint that does not fit) ends with one
line on stderr and exit status 2, without a traceback. Hydra's own composition errors span several
lines, so the command line is composed once up front ("preflight") to report them the same way.
"""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import sys
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from rednet.config import SCHEMAS, TrainConfig, check_keys, did_you_mean, register_configs, validate, validate_pack
from rednet.errors import ConfigError, UserError

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
EXIT_USER_ERROR = 2

register_configs()


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line. An error raised in a DataLoader worker arrives wrapped
    in the worker's traceback; its last line is the original message."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1]
        for prefix in (f"{type(error).__module__}.{type(error).__name__}: ", f"{type(error).__name__}: "):
            text = text.removeprefix(prefix)
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    # OmegaConf and Hydra append their internals (full_key, object_type, the search path).
    for noise in (" full_key:", " Config search path:"):
        text = text.split(noise)[0]
    return text


def fail(message: str, exit_code: int = EXIT_USER_ERROR) -> None:
    # One write, so that the lines of several DDP ranks sharing a terminal or log never interleave.
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    sys.exit(exit_code)


def preflight(config_name: str, argv: list[str]) -> None:
    """Composes the command line's config the way Hydra will, and validates its values.

    For a sweep (``-m model=a,b``) every swept value is checked, with the other keys at their first.
    """
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return  # Hydra's own flags (--cfg, --help, --config-name, ...) are Hydra's to handle
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    def values(override) -> list[str] | None:
        """A sweep's values; None for those only Hydra can expand (``glob()`` lists a config group
        through its config loader, ``interval()`` is for other sweepers). Hydra then expands them
        and each job validates its own config."""
        try:
            return list(override.sweep_string_iterator())
        except Exception:  # noqa: BLE001  (Hydra raises plain exceptions for these)
            return None

    args = [a for a in argv if not a.startswith("-")]
    try:
        parsed = [(o, values(o) if o.is_sweep_override() else None)
                  for o in OverridesParser.create().parse_overrides(args)]
        parsed = [(o, swept) for o, swept in parsed if swept is not None or not o.is_sweep_override()]
        first = [o.input_line if swept is None else f"{o.get_key_element()}={swept[0]}" for o, swept in parsed]
        variants = [first]
        for i, (o, swept) in enumerate(parsed):
            for value in (swept or [])[1:]:
                variants.append(first[:i] + [f"{o.get_key_element()}={value}"] + first[i + 1:])
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            for i, overrides in enumerate(variants):
                cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=i == 0)
                if i == 0:
                    multirun = "-m" in argv or "--multirun" in argv
                    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
                    check_run_dir(OmegaConf.select(cfg, key), key)
                if config_name == "pack":
                    validate_pack(cfg)
                elif config_name == "train" or "ckpt" not in cfg or cfg.ckpt is None:
                    validate(cfg)
                else:
                    check_keys(cfg)
    except UserError as e:
        fail(one_line(e))
    except Exception as e:  # Hydra's and OmegaConf's composition errors: an override's fault
        message = one_line(e)
        cause = one_line(e.__cause__) if e.__cause__ is not None else ""
        if cause.startswith("Key '"):  # Hydra's advice to append with '+' would break the schema
            message = message.split(". To append")[0]
            key = re.search(r"'([^']+)'", message)
            hint = did_you_mean(key.group(1), SCHEMAS.get(config_name, TrainConfig)) if key else ""
            message += f": {cause}{hint} (`--cfg job` lists the keys)"
        elif cause:
            message = f"{message} ({cause})"
        fail(message)


def check_run_dir(folder: str | None, key: str) -> None:
    """Fails in one line if the run folder cannot be made. Hydra makes it itself, and fails with two
    chained tracebacks when it cannot. The probe is a uniquely named folder, made and removed in the
    nearest folder that exists, so runs starting together never trip over each other's probe."""
    if not folder:
        return
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, f"{existing} is a file")
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".rednet-write-test-"))
    except OSError as e:
        fail(f"cannot make the run folder {folder} ({e.strerror or e}); choose a folder you can write "
             f"with {key}=path/to/folder")


def log_to_file(message: str, exc_info=None) -> None:
    """Writes ``message`` to the run's log file (``train.log``) only: the console already shows it."""
    record = logging.LogRecord("rednet", logging.ERROR, __file__, 0, message, None, exc_info)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def guarded(task):
    """Runs ``task(cfg)`` inside Hydra, turning a UserError into one line and exit status 2.

    In a trial of an Optuna sweep the error is logged as one line and raised on to the sweeper,
    which records the trial as failed and goes on with the study (up to
    ``hydra.sweeper.max_failure_rate``); so is a NaN objective, which the sweeper would otherwise
    crash on. A stop by SIGTERM or Ctrl-C still stops the whole sweep.
    """
    def wrapper(cfg: DictConfig):
        from rednet.integrations.submitit import env_from_submitit

        env_from_submitit()
        try:
            result = task(cfg)
            if isinstance(result, float) and math.isnan(result) and _optuna_trial():
                raise UserError(f"optimized_metric {cfg.optimized_metric} is NaN")
            return result
        except UserError as e:
            logging.getLogger("rednet").debug("user error", exc_info=True)
            log_to_file(f"error: {one_line(e)}")
            if _optuna_trial() and e.exit_code == EXIT_USER_ERROR:
                logging.getLogger("rednet").error(f"trial failed: {one_line(e)}")
                raise
            fail(one_line(e), e.exit_code)
        except KeyboardInterrupt:  # Ctrl-C before training started (the trainer handles it from then on)
            message = "interrupted by Ctrl-C; nothing was saved"
            log_to_file(f"error: {message}")
            fail(message, 128 + signal.SIGINT)
        except Exception:  # a bug: Hydra prints its traceback; the run's log keeps it too
            log_to_file("error: the run failed with an unexpected error", exc_info=sys.exc_info())
            raise
        finally:
            from rednet.engine.distributed import cleanup

            cleanup()
    wrapper.__name__ = task.__name__
    return wrapper


def _optuna_trial() -> bool:
    if not HydraConfig.initialized():  # a task called outside Hydra (tests, a notebook)
        return False
    hydra_cfg = HydraConfig.get()
    return hydra_cfg.mode == RunMode.MULTIRUN and hydra_cfg.sweeper._target_.endswith(".OptunaSweeper")


# Command-line choices that need a Hydra plugin from an extra: (override prefix, plugin module, what).
PLUGINS = [("hparams_search=", "hydra_plugins.hydra_optuna_sweeper", "Hydra's Optuna sweeper"),
           ("hydra/sweeper=optuna", "hydra_plugins.hydra_optuna_sweeper", "Hydra's Optuna sweeper"),
           ("hydra/launcher=submitit", "hydra_plugins.hydra_submitit_launcher", "Hydra's submitit launcher")]


def require_plugins(argv: list[str]) -> None:
    """One line naming the extra to install, rather than Hydra's 'Could not find ...' of a plugin's config."""
    import importlib.util

    for arg in argv:
        for prefix, module, what in PLUGINS:
            if arg.lstrip("+~").startswith(prefix) and not arg.endswith("=null"):
                try:
                    found = importlib.util.find_spec(module) is not None
                except ImportError:  # hydra_plugins itself is missing, or the module is blocked
                    found = False
                if not found:
                    fail(f"{arg} needs {what}, which is not installed: pip install -e \".[sweep]\"")


def check_launch(cfg: DictConfig) -> None:
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and cfg.trainer.strategy != "ddp":
        raise ConfigError(f"launched as {world} processes (torchrun) but trainer.strategy={cfg.trainer.strategy}; "
                          f"add trainer=ddp")
    if cfg.trainer.strategy == "ddp" and cfg.data.batch_size % world:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} (the global batch) does not divide across "
                          f"{world} processes; use a multiple of {world}")


def _quiet_other_ranks() -> None:
    """Ranks other than 0 write no Hydra folder or log file and print nothing but errors."""
    if os.environ.get("RANK", "0") != "0":
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none",
                     "hydra.run.dir=."]
        logging.getLogger("rednet").setLevel(logging.ERROR)


@guarded
def _train(cfg: DictConfig) -> float:
    """One training run. It returns ``optimized_metric`` from the run's metrics: a sweeper's objective."""
    validate(cfg)
    check_launch(cfg)
    from rednet.engine.distributed import env_info
    from rednet.engine.trainer import Trainer
    from rednet.integrations import submitit

    run_dir = HydraConfig.get().runtime.output_dir
    if cfg.resume is None and submitit.in_job():  # a requeued job runs again in its run folder
        cfg.resume = "if_exists"
    with submitit.save_before_requeue():
        metrics = Trainer(cfg, run_dir).fit()
    group, key = cfg.optimized_metric.split(".")
    value = metrics.get(group, {}).get(key)
    value = float("nan") if value is None else float(value)  # None: no batch was trained
    if HydraConfig.get().mode == RunMode.MULTIRUN and env_info().is_main:  # what the sweeper got
        logging.getLogger("rednet").info(f"returns optimized_metric {cfg.optimized_metric} = {value!r}")
    return value


def require_ckpt(cfg: DictConfig, script: str) -> None:
    if not cfg.ckpt:
        raise ConfigError(f"{script} needs a checkpoint: ckpt=path/to/best.pt (ours, or an official mmcls file "
                          f"with model=...)")


def checkpoint_and_config(cfg: DictConfig) -> tuple[dict, DictConfig]:
    """The checkpoint ``ckpt=`` names, read once (it can be hundreds of MB), and the validated
    config for it: its model and data, with the command line's on top (:func:`config_for_checkpoint`)."""
    from rednet.engine.checkpoint import read_checkpoint

    ckpt = read_checkpoint(cfg.ckpt)
    return ckpt, validated_config_for(cfg, ckpt.get("config"))


def validated_config_for(cfg: DictConfig, saved: dict | None) -> DictConfig:
    """:func:`config_for_checkpoint` with this command line's overrides, validated."""
    cfg = config_for_checkpoint(cfg, saved, HydraConfig.get().overrides.task)
    validate(cfg)
    return cfg


@guarded
def _evaluate(cfg: DictConfig) -> None:
    from rednet.engine.evaluate import evaluate_checkpoint

    require_ckpt(cfg, "eval.py")
    if str(cfg.ckpt).endswith(".onnx"):  # an exported file, measured through ONNX Runtime
        from rednet.deploy.runtime import evaluate_onnx, read_sidecar, require

        require("onnxruntime")
        info = read_sidecar(cfg.ckpt)
        cfg = validated_config_for(cfg, info["config"])
        evaluate_onnx(cfg, info, HydraConfig.get().runtime.output_dir)
        return
    ckpt, cfg = checkpoint_and_config(cfg)
    check_launch(cfg)
    evaluate_checkpoint(cfg, ckpt, HydraConfig.get().runtime.output_dir)


@guarded
def _export(cfg: DictConfig) -> None:
    from rednet.deploy.export import export_checkpoint

    require_ckpt(cfg, "export.py")
    ckpt, cfg = checkpoint_and_config(cfg)
    export_checkpoint(cfg, ckpt)


@guarded
def _visualize(cfg: DictConfig) -> None:
    from rednet.viz import visualize_checkpoint

    require_ckpt(cfg, "visualize.py")
    ckpt, cfg = checkpoint_and_config(cfg)
    visualize_checkpoint(cfg, ckpt, HydraConfig.get().runtime.output_dir)


@guarded
def _pack(cfg: DictConfig) -> None:
    from rednet.data.shards import pack

    validate_pack(cfg)
    result = pack(cfg.data, cfg.out, cfg.max_side, cfg.quality, cfg.shard_samples)
    logging.getLogger("rednet").info(result.summary())


def config_for_checkpoint(cfg: DictConfig, saved: dict | None, overrides: list[str]) -> DictConfig:
    """eval.py's config: the checkpoint's model and data, with what the command line names on top.

    ``data=imagenet`` replaces the whole data group; ``data.root=...`` replaces one key. Everything
    else (``trainer.*``: device, precision, batch limits, strategy) is eval.py's own, never the
    training run's: a run trained with ``trainer.limit_val_batches=2`` is still evaluated on the
    whole validation set. A file without a config (an official mmcls release) needs ``model=`` on
    the command line.
    """
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    if saved is None:
        if "model" not in keys and not any(k.startswith("experiment") for k in keys):
            raise ConfigError(f"{cfg.ckpt} carries no config (an official or weights-only file); name the model "
                              f"and data, e.g. model=rednet26 data=imagenet data.root=path/to/imagenet")
        return cfg
    trained = OmegaConf.merge(OmegaConf.structured(TrainConfig), saved)
    merged = cfg.copy()
    for group in ("model", "data"):
        if group not in keys:
            merged[group] = trained[group]
    for key in keys:  # the command line's single keys of those groups, on top of the checkpoint's
        if key.split(".")[0] in ("model", "data") and "." in key:
            OmegaConf.update(merged, key, OmegaConf.select(cfg, key), merge=False)
    merged.model.pretrained = None  # the checkpoint holds the weights
    return merged


def _main(task, config_name: str) -> None:
    _quiet_other_ranks()
    require_plugins(sys.argv[1:])
    preflight(config_name, sys.argv[1:])
    hydra.main(config_path=CONFIG_DIR, config_name=config_name, version_base="1.3")(task)()


def train() -> None:
    _main(_train, "train")


def evaluate() -> None:
    _main(_evaluate, "eval")


def export() -> None:
    _main(_export, "export")


def visualize() -> None:
    _main(_visualize, "visualize")


def pack() -> None:
    _main(_pack, "pack")
