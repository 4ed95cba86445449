"""Config composition: every model x data pair, the recipes, and values rejected before work starts."""

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from rednet.config import validate
from rednet.errors import ConfigError
from rednet.models import list_models
from tests.conftest import ROOT, compose_config

MODELS = sorted(p.stem for p in (ROOT / "configs/model").glob("*.yaml"))
DATA = sorted(p.stem for p in (ROOT / "configs/data").glob("*.yaml"))


def test_every_model_config_names_a_registered_model():
    assert MODELS == sorted(list_models())
    assert DATA == ["cifar10", "cifar100", "digits", "fake", "imagenet", "shards"]


@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("model", MODELS)
def test_every_model_and_data_pair_composes_and_validates(model, data):
    cfg = compose_config([f"model={model}", f"data={data}"])
    validate(cfg)
    assert cfg.model.name == model and cfg.data.name == data


def test_defaults():
    cfg = compose_config([])
    assert (cfg.model.name, cfg.data.name, cfg.optim.name, cfg.sched.name) == ("rednet26", "cifar10", "sgd", "cosine")
    assert list(cfg.data.std) == [0.2470, 0.2435, 0.2616]
    assert cfg.resume is None


def test_official_imagenet_recipe():
    cfg = compose_config(["experiment=rednet26_imagenet"])
    assert (cfg.model.name, cfg.data.name) == ("rednet26", "imagenet")
    assert (cfg.optim.lr, cfg.optim.base_batch_size, cfg.optim.momentum, cfg.optim.nesterov,
            cfg.optim.weight_decay) == (0.8, 2048, 0.9, True, 1e-4)
    assert (cfg.sched.name, cfg.sched.warmup_epochs, cfg.sched.warmup_ratio) == ("cosine", 5, 0.25)
    assert (cfg.trainer.max_epochs, cfg.trainer.label_smoothing) == (130, 0.1)


def test_digits_recipe_leaves_the_other_groups_to_the_user():
    cfg = compose_config(["data=digits", "optim=adamw", "sched=step"])
    assert (cfg.optim.name, cfg.optim.lr, cfg.sched.name) == ("adamw", 1e-3, "step")
    assert (cfg.model.name, cfg.trainer.max_epochs) == ("rednet18", 16)  # the quick start's own model and length
    assert compose_config(["data=digits", "model=rednet26"]).model.name == "rednet26"  # a model named wins


def test_unknown_key_and_wrong_type_fail_at_composition():
    with pytest.raises(Exception) as error:
        compose_config(["trainer.foo=1"])
    assert "Key 'foo' not in 'TrainerConfig'" in str(error.value.__cause__)
    with pytest.raises(Exception) as error:
        compose_config(["trainer.max_epochs=ten"])
    assert "could not be converted to Integer" in str(error.value.__cause__)
    with pytest.raises((ConfigKeyError, ValidationError)):
        OmegaConf.merge(compose_config([]), {"optim": {"momentun": 0.9}})


@pytest.mark.parametrize("override,message", [
    ("optim.lr=0", "optim.lr=0.0 must be positive"),
    ("optim.lr=-0.1", "optim.lr=-0.1 must be positive"),
    ("trainer.max_epochs=0", "trainer.max_epochs=0 must be positive"),
    ("data.batch_size=-8", "data.batch_size=-8 must be positive"),
    ("model.name=rednet27", "model=rednet27 is not a model; choose one of: rednet18, rednet26"),
    ("data.name=mnist", "data.name=mnist is not valid; choose one of: cifar10, cifar100, digits, fake, imagenet"),
    ("trainer.label_smoothing=1.5", r"trainer.label_smoothing=1.5 must be in \[0, 1\)"),
    ("model.kernel_size=6", "model.kernel_size=6 must be odd and positive"),
    ("model.group_channels=24", "model.group_channels=24 must divide the 32 channels of the stem's involution; "
                                "choose one of: 1, 2, 4, 8, 16, 32"),
    ("model.reduction_ratio=1000", "model.reduction_ratio=1000 leaves the stem's 32-channel kernel generator"),
    ("model.drop_path_rate=1.0", r"model.drop_path_rate=1.0 must be in \[0, 1\)"),
    ("optim.base_batch_size=0", "optim.base_batch_size=0 must be at least 1, or null to turn it off"),
    ("trainer.limit_train_batches=0", "trainer.limit_train_batches=0 must be at least 1"),
    ("trainer.limit_val_batches=-1", "trainer.limit_val_batches=-1 must be at least 1"),
    ("sched.warmup_ratio=-1", r"sched.warmup_ratio=-1.0 must be in \[0, 1\]"),
    ("trainer.ema_decay=1.5", r"trainer.ema_decay=1.5 must be in \[0, 1\)"),
    ("sched.min_lr=-1", "sched.min_lr=-1.0 must not be negative"),
    ("sched.gamma=-1", r"sched.gamma=-1.0 must be in \(0, 1\]"),
    ("sched.milestones=[5,2]", r"sched.milestones=\[5, 2\] must be increasing epochs"),
])
def test_bad_values_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_config([override]))


@pytest.mark.parametrize("override,message", [
    ("trainer.precision=fp8", "trainer.precision=fp8: Invalid value 'fp8', expected one of [auto, fp32, bf16, fp16]"),
    ("trainer.channels_last=ture", "trainer.channels_last=ture: Value 'ture' is not a valid bool (type str); null "
                                   "lets the device decide, true or false chooses"),
    ("trainer.compile=auto", "trainer.compile=auto: Value 'auto' is not a valid bool (type str); null lets the "
                             "device decide, true or false chooses"),
    ("trainer.strategy=fsdp", "trainer.strategy=fsdp: Invalid value 'fsdp', expected one of [single, ddp]"),
])
def test_bad_choices_are_refused_by_the_schema_in_one_line(override, message):
    # Enum and Optional[bool] fields refuse these while Hydra composes; the command line turns
    # the exception into this line (rednet.cli.composition_error).
    from rednet.cli import composition_error

    with pytest.raises(Exception) as error:
        compose_config([override])
    assert composition_error(error.value, "train") == message


def test_involution_settings_are_not_checked_for_resnets():
    validate(compose_config(["model=resnet26", "model.group_channels=24", "model.kernel_size=6"]))


def test_fake_data_class_count_must_be_positive():
    with pytest.raises(ConfigError, match=r"data=fake needs data.num_classes of at least 1, .*\(got -3\)"):
        validate(compose_config(["data=fake", "data.num_classes=-3"]))
