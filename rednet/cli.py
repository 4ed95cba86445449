"""Command-line entry points: ``python train.py ...`` / ``rednet-train``, ``python eval.py ...`` /
``rednet-eval``, ``python export.py ...`` / ``rednet-export``, ``python visualize.py ...`` /
``rednet-visualize``, ``python predict.py ...`` / ``rednet-predict`` and ``python pack.py ...`` /
``rednet-pack``. Each parses (Hydra composes the config, once) and calls what the command does.

A user's mistake (a bad override, a missing dataset, a checkpoint that does not fit) ends with one
line on stderr and exit status 2, without a traceback: Hydra's and OmegaConf's composition errors
are caught by type and said in one line; :class:`~rednet.errors.UserError` from the command is
printed as its message.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import math
import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, read_write
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

import rednet.deploy.runtime  # noqa: F401  (registers .onnx files with open_trained)
from rednet.commands import quote_path_overrides
from rednet.config import SCHEMAS, TrainConfig, did_you_mean, register_configs, schema_keys, validate, validate_pack
from rednet.data import shards
from rednet.deploy.export import export_checkpoint
from rednet.engine import distributed
from rednet.engine.context import lock_run_dir, unlock_run_dir
from rednet.engine.evaluate import evaluate_trained
from rednet.engine.trained import config_for, open_trained
from rednet.engine.trainer import Trainer
from rednet.errors import ConfigError, UserError
from rednet.integrations import submitit
from rednet.predict import predict_command
from rednet.visualize import visualize_checkpoint

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
EXIT_USER_ERROR = 2

register_configs()
log = logging.getLogger("rednet")


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line. An error raised in a DataLoader worker arrives wrapped
    in the worker's traceback; its last line is the original message."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1]
        for prefix in (f"{type(error).__module__}.{type(error).__name__}: ", f"{type(error).__name__}: "):
            text = text.removeprefix(prefix)
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def fail(message: str, exit_code: int = EXIT_USER_ERROR) -> None:
    # One write, so that the lines of several DDP ranks sharing a terminal or log never interleave.
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    sys.exit(exit_code)


# -- before Hydra: what composition cannot see --------------------------------------------------------

def check_added_keys(config_name: str, argv: list[str]) -> None:
    """Refuses ``+key=value`` and ``++key=value`` for a key the command's schema does not have.
    The schema is a struct config, but Hydra lets ``+`` add keys to it, so a typo such as
    ``+trainer.max_epoch=1`` would otherwise be ignored silently. Config groups (``+experiment=...``)
    and Hydra's own ``hydra.*`` keys are Hydra's to check."""
    schema = SCHEMAS.get(config_name, TrainConfig)
    known = set(schema_keys(schema))
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")])
    except OverrideParseException:
        return  # Hydra says what is wrong with it
    for override in overrides:
        if not override.input_line.startswith("+"):
            continue
        key = override.get_key_element().lstrip("+")
        if key.startswith("hydra") or os.path.isdir(os.path.join(CONFIG_DIR, key)) or key in known:
            continue
        fail(f"{key} is not a config key{did_you_mean(key, schema)} (`--cfg job` lists the keys)")


# Command-line choices that need a Hydra plugin from an extra: (override prefix, plugin module, what).
PLUGINS = [("hparams_search=", "hydra_plugins.hydra_optuna_sweeper", "Hydra's Optuna sweeper"),
           ("hydra/sweeper=optuna", "hydra_plugins.hydra_optuna_sweeper", "Hydra's Optuna sweeper"),
           ("hydra/launcher=submitit", "hydra_plugins.hydra_submitit_launcher", "Hydra's submitit launcher")]


def require_plugins(argv: list[str]) -> None:
    """One line naming the extra to install, rather than Hydra's 'Could not find ...' of a plugin's config."""
    for arg in argv:
        for prefix, module, what in PLUGINS:
            if arg.lstrip("+~").startswith(prefix) and not arg.endswith("=null"):
                try:
                    found = importlib.util.find_spec(module) is not None
                except ImportError:  # hydra_plugins itself is missing, or the module is blocked
                    found = False
                if not found:
                    fail(f"{arg} needs {what}, which is not installed: pip install -e \".[sweep]\"")


def composition_error(error: Exception, config_name: str) -> str | None:
    """One line for an error Hydra or OmegaConf raised while composing the command line's config,
    from the exception's type and attributes; None for an error that is not about the config."""
    cause = error.__cause__
    if isinstance(error, MissingConfigException):  # a group option that does not exist
        choices = f"; choose one of: {', '.join(error.options)}" if error.options else ""
        return f"no config {error.missing_cfg_file}{choices}"
    if isinstance(error, OverrideParseException):
        return f"{one_line(error).split(' See https://')[0]} (in an override; quote a value with spaces or " \
               f"special characters: key='my value')"
    if isinstance(cause, OmegaConfBaseException) and cause.full_key:
        reason = str(cause).splitlines()[0]
        schema = SCHEMAS.get(config_name, TrainConfig)
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
            return f"{cause.full_key}: {reason}{did_you_mean(cause.full_key, schema)} (`--cfg job` lists the keys)"
        if isinstance(cause, ValidationError):
            hint = "; null lets the device decide, true or false chooses" \
                if cause.full_key in ("trainer.channels_last", "trainer.compile") else ""
            return f"{cause.full_key}={cause.value}: {reason}{hint}"
    if isinstance(error, (HydraException, OmegaConfBaseException)):
        return one_line(error) + (f" ({one_line(cause)})" if cause is not None else "")
    return None


# -- inside Hydra: the commands ---------------------------------------------------------------------

def log_to_file(message: str, exc_info=None) -> None:
    """Writes ``message`` to the run's log file (``train.log``) only: the console already shows it."""
    record = logging.LogRecord("rednet", logging.ERROR, __file__, 0, message, None, exc_info)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


class _CommandFailed(Exception):
    """A bug inside a command: it keeps its traceback, and is never taken for a composition error."""


def guarded(task):
    """Runs ``task(cfg)`` inside Hydra, turning a UserError into one line and exit status 2.

    In a trial of an Optuna sweep the error is logged as one line and raised on to the sweeper,
    which records the trial as failed and goes on with the study (up to
    ``hydra.sweeper.max_failure_rate``); so is a NaN objective, which the sweeper would otherwise
    crash on. A stop by SIGTERM or Ctrl-C still stops the whole sweep.
    """
    def wrapper(cfg: DictConfig):
        submitit.env_from_submitit()
        try:
            with distributed.lost_process_errors():  # a DDP peer lost anywhere in the command: one line
                result = task(cfg)
            if isinstance(result, float) and math.isnan(result) and _optuna_trial():
                raise UserError(f"optimized_metric {cfg.optimized_metric} is NaN")
            return result
        except UserError as e:
            log.debug("user error", exc_info=True)
            log_to_file(f"error: {one_line(e)}")
            if _optuna_trial() and e.exit_code == EXIT_USER_ERROR:
                log.error(f"trial failed: {one_line(e)}")
                raise
            fail(one_line(e), e.exit_code)
        except KeyboardInterrupt:  # Ctrl-C before training started (the trainer handles it from then on)
            message = "interrupted by Ctrl-C; nothing was saved"
            log_to_file(f"error: {message}")
            fail(message, 128 + signal.SIGINT)
        except Exception as e:  # a bug: its traceback is printed; the run's log keeps it too
            log_to_file("error: the run failed with an unexpected error", exc_info=sys.exc_info())
            raise _CommandFailed(f"{type(e).__name__}: {e}") from e
        finally:
            distributed.cleanup()
    wrapper.__name__ = task.__name__
    return wrapper


def _optuna_trial() -> bool:
    if not HydraConfig.initialized():  # a task called outside Hydra (tests, a notebook)
        return False
    hydra_cfg = HydraConfig.get()
    return hydra_cfg.mode == RunMode.MULTIRUN and hydra_cfg.sweeper._target_.endswith(".OptunaSweeper")


def _quiet_other_ranks() -> None:
    """Ranks other than 0 write no Hydra folder or log file and print nothing but errors."""
    if os.environ.get("RANK", "0") != "0":
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none",
                     "hydra.run.dir=."]
        log.setLevel(logging.ERROR)


def _run_dir() -> str:
    return HydraConfig.get().runtime.output_dir


def _trained_and_config(cfg: DictConfig, script: str):
    """The file ``ckpt=`` names, read once (it can be hundreds of MB), and the command's validated
    config for it (:func:`rednet.engine.trained.config_for`)."""
    if not cfg.ckpt:
        raise ConfigError(f"{script} needs a checkpoint: ckpt=path/to/best.pt (ours, or an official mmcls file "
                          f"with model=...)")
    trained = open_trained(cfg.ckpt)
    return trained, config_for(cfg, trained, HydraConfig.get().overrides.task)


@guarded
def _train(cfg: DictConfig) -> float:
    """One training run. It returns ``optimized_metric`` from the run's metrics: a sweeper's objective."""
    validate(cfg)
    cfg.resume = submitit.resume_for_job(cfg.resume, _run_dir())  # a requeued job continues its own run
    with submitit.save_before_requeue():
        metrics = Trainer(cfg, _run_dir()).fit()
    group, key = cfg.optimized_metric.split(".")
    value = metrics.get(group, {}).get(key)
    value = float("nan") if value is None else float(value)  # None: no batch was trained
    if HydraConfig.get().mode == RunMode.MULTIRUN and distributed.env_info().is_main:  # what the sweeper got
        log.info(f"returns optimized_metric {cfg.optimized_metric} = {value!r}")
    return value


@guarded
def _evaluate(cfg: DictConfig) -> None:
    trained, cfg = _trained_and_config(cfg, "eval.py")
    evaluate_trained(cfg, trained, _run_dir())


@guarded
def _export(cfg: DictConfig) -> None:
    trained, cfg = _trained_and_config(cfg, "export.py")
    export_checkpoint(cfg, trained)


@guarded
def _visualize(cfg: DictConfig) -> None:
    trained, cfg = _trained_and_config(cfg, "visualize.py")
    visualize_checkpoint(cfg, trained, _run_dir())


@guarded
def _pack(cfg: DictConfig) -> None:
    validate_pack(cfg)
    result = shards.pack(cfg.data, cfg.out, cfg.max_side, cfg.quality, cfg.shard_samples)
    log.info(result.summary())


class RunFolderLock(Callback):
    """Takes the run folder's lock (:func:`rednet.engine.context.lock_run_dir`) before Hydra writes
    into the folder (.hydra/config.yaml, the log file), so that a second run into a live run's folder
    is refused before it touches anything there. Set in each command's config as hydra.callbacks."""

    def __init__(self) -> None:
        self.held: Path | None = None

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if not distributed.env_info().is_main:  # the other ranks write nothing there; rank 0 locks for them
            return
        # Resolved once: run_job would resolve ${now:...} again, perhaps a second later.
        run_dir = str(OmegaConf.select(config, "hydra.run.dir"))
        with read_write(config.hydra.run):
            config.hydra.run.dir = run_dir
        try:
            lock_run_dir(Path(run_dir).absolute(), wait_s=5.0 if distributed.restart_count() else 0.0)
        except UserError as e:  # Hydra would take an exception from a callback for a warning
            fail(one_line(e), e.exit_code)
        except OSError:  # a folder that cannot be made: Hydra's attempt next says so (see _main)
            return
        self.held = Path(run_dir).absolute()
        atexit.register(self.release)

    def on_run_end(self, **kwargs) -> None:
        self.release()

    def release(self) -> None:
        if self.held is not None:
            unlock_run_dir(self.held)
            self.held = None


@guarded
def _predict(cfg: DictConfig) -> None:
    trained, cfg = _trained_and_config(cfg, "predict.py")
    predict_command(cfg, trained, _run_dir())


def _main(task, config_name: str) -> None:
    # A path as the user typed it (a non-ASCII letter, a multirun folder's = and ,) needs Hydra's quotes.
    sys.argv[1:] = quote_path_overrides(sys.argv[1:])
    argv = sys.argv[1:]
    _quiet_other_ranks()
    require_plugins(argv)
    check_added_keys(config_name, argv)
    # Hydra then raises its composition errors instead of printing them over several lines.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra.main(config_path=CONFIG_DIR, config_name=config_name, version_base="1.3")(task)()
    except _CommandFailed as e:
        raise e.__cause__ from None
    except Exception as e:
        message = composition_error(e, config_name)
        if message is None and isinstance(e, OSError):  # Hydra could not make the run folder
            key = "hydra.sweep.dir" if "-m" in argv or "--multirun" in argv else "hydra.run.dir"
            message = (f"cannot make the run folder {e.filename or ''} ({e.strerror or e}); choose a folder you "
                       f"can write with {key}=path/to/folder")
        if message is None:
            raise
        fail(message)


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


def predict() -> None:
    _main(_predict, "predict")
