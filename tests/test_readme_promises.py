"""What the README and docs/ promise and no other test checks, each through the path a user takes.

The promised commands live in README.md and docs/*.md; the tests below find them there, so that a
command keeps working where the text moved it. tests/test_docs_links.py checks the links between them."""

import itertools
import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from rednet.config import register_configs, validate
from rednet.engine.evaluate import evaluate_trained
from rednet.engine.trainer import Trainer
from rednet.errors import CheckpointError
from rednet.models import create_model
from tests.conftest import CONFIG_DIR, FAST, ROOT, command_config, compose_config, tiny
from tests.fakedata import make_cifar, make_imagefolder, write_corrupt_image

TINY = tiny(epochs=1)


def test_eval_takes_single_data_keys_on_top_of_the_checkpoint(tmp_path):
    # "python eval.py ckpt=.../best.pt data.root=/other/copy": the data moved, the rest is the checkpoint's.
    first = make_cifar(tmp_path / "first", n_train=20, n_test=10)
    run = tmp_path / "run"
    Trainer(compose_config(TINY + ["data=cifar10", f"data.root={first}", "data.download=false", "data.batch_size=5",
                                   "trainer.limit_train_batches=1", "trainer.limit_val_batches=1"]), run).fit()
    moved = make_cifar(tmp_path / "moved", n_train=10, n_test=30, seed=1)
    shutil.rmtree(first)
    overrides = [f"ckpt={run}/checkpoints/last.pt", f"data.root={moved}", "trainer.device=cpu"]
    cfg, trained = command_config("eval", overrides)
    assert (cfg.model.name, cfg.data.name, cfg.data.root, cfg.data.batch_size, cfg.data.download) == \
        ("rednet18", "cifar10", moved, 5, False)
    evaluate_trained(cfg, trained, tmp_path / "eval")
    metrics = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert metrics["count"] == 30  # the moved copy's whole test split, not the training run's one batch


def test_resume_refuses_data_whose_classes_are_named_differently(tmp_path):
    root = make_imagefolder(tmp_path / "folder", classes=("cat", "dog", "fox"), n_train=2, n_val=1)
    common = TINY + ["data=imagenet", f"data.root={root}", "data.image_size=16", "data.val_resize=16",
                     "data.batch_size=3"]
    Trainer(compose_config(common), tmp_path / "run").fit()
    for split in ("train", "val"):
        os.rename(os.path.join(root, split, "fox"), os.path.join(root, split, "wolf"))
    last = tmp_path / "run/checkpoints/last.pt"
    with pytest.raises(CheckpointError, match=r"last\.pt was trained on other classes than data=imagenet has: "
                                              r"class 2 is 'fox' there and 'wolf' here"):
        Trainer(compose_config(common + ["trainer.max_epochs=2", f"resume={last}"]), tmp_path / "again")


def test_unreadable_images_are_skipped_in_training(tmp_path, caplog):
    # data.bad_images=skip, end to end: through the real ImageFolder, collate and training loop. With
    # one image per batch, an unreadable image is a batch with nothing in it.
    root = make_imagefolder(tmp_path / "folder", classes=("cat", "dog"), n_train=3, n_val=2, size=(16, 16))
    write_corrupt_image(os.path.join(root, "train", "cat", "cat_bad.jpg"))
    write_corrupt_image(os.path.join(root, "train", "dog", "dog_bad.jpg"), kind="truncated")
    write_corrupt_image(os.path.join(root, "val", "dog", "dog_bad.jpg"))
    cfg = compose_config(TINY + ["data=imagenet", f"data.root={root}", "data.image_size=16", "data.val_resize=16",
                                 "data.batch_size=1", "data.bad_images=skip"])
    with pytest.warns(UserWarning, match="skipping unreadable image") as warned, caplog.at_level("INFO"):
        metrics = Trainer(cfg, tmp_path / "run").fit()
    named = " ".join(str(w.message) for w in warned)
    assert all(f"{split}/{c}/{c}_bad.jpg" in named for split, c in [("train", "cat"), ("train", "dog"), ("val", "dog")])
    assert metrics["step"] == 6  # 8 training batches, 2 of them empty
    assert caplog.text.count("no readable image in batch") == 2
    assert math.isfinite(metrics["train"]["loss"]) and metrics["val"]["count"] == 4  # the 4 readable ones


def test_pretrained_weights_with_drop_head_through_the_config(tmp_path):
    torch.manual_seed(1)
    source = create_model("rednet18", num_classes=5, in_chans=1, cifar_stem=True)
    torch.save({"model": source.state_dict()}, tmp_path / "pretrained.pt")
    common = TINY + ["data=digits", f"model.pretrained={tmp_path}/pretrained.pt"]
    with pytest.raises(CheckpointError, match=r"head\.fc\.weight .*model\.drop_head=true"):
        Trainer(compose_config(common), tmp_path / "refused")
    model = Trainer(compose_config(common + ["model.drop_head=true"]), tmp_path / "run").model
    loaded = model.state_dict()
    for key, value in source.state_dict().items():
        if key.startswith("head."):
            assert loaded[key].shape[0] == 10  # digits' 10 classes: a fresh classifier
        else:
            assert torch.equal(loaded[key], value), key


def test_resume_with_more_epochs_stretches_the_schedule(tmp_path):
    # Cosine over 2 epochs, resumed for 4: the lr continues on the 4-epoch curve, halfway down
    # (the 2-epoch curve would have it at 0).
    common = TINY + ["data=digits", "data.batch_size=32", "trainer.limit_train_batches=3",
                     "trainer.limit_val_batches=1", "sched.warmup_epochs=0", "optim.base_batch_size=null",
                     "optim.lr=0.1"]
    Trainer(compose_config(common + ["trainer.max_epochs=2"]), tmp_path / "run").fit()
    resumed = Trainer(compose_config(common + ["trainer.max_epochs=4", f"resume={tmp_path}/run/checkpoints/last.pt"]),
                      tmp_path / "again")
    assert resumed.step == 6
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 6 / 12)))
    resumed.scheduler.step()
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 7 / 12)))


def test_rednet26_cifar10_recipe_composes_and_trains_a_step(tmp_path):
    root = make_cifar(tmp_path / "cifar", n_train=20, n_test=10)
    cfg = compose_config(FAST + ["experiment=rednet26_cifar10", f"data.root={root}", "data.download=false",
                                 "data.batch_size=4", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
                                 "trainer.limit_val_batches=1"])
    assert (cfg.model.name, cfg.data.name, cfg.optim.name, cfg.optim.lr, cfg.optim.base_batch_size,
            cfg.optim.nesterov, cfg.optim.weight_decay) == ("rednet26", "cifar10", "sgd", 0.1, 128, True, 5e-4)
    assert (cfg.sched.name, cfg.sched.warmup_epochs, cfg.trainer.label_smoothing) == ("cosine", 1, 0.1)
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.1 * 4 / 128)
    assert trainer.optimizer.defaults["nesterov"] and trainer.criterion.label_smoothing == 0.1
    before = trainer.model.head.fc.weight.detach().clone()
    metrics = trainer.fit()
    assert metrics["step"] == 1 and math.isfinite(metrics["train"]["loss"])
    assert not torch.equal(trainer.model.head.fc.weight, before)
    assert trainer.model.backbone.stem[0].conv.stride == (1, 1)  # 32 px: the CIFAR stem


# --- The pages themselves: commands, snippets, the map ------------------------------------------------

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)
# An entry point and its arguments, up to the end of the line, a quote, a comment or a $(...).
ENTRY = re.compile(r"\b(train|eval|export|visualize)\.py((?:[ \t]+(?!\$\()[^\s'\"#]+)*)")
CONFIG_NAME = {"train": "train", "eval": "eval", "export": "export", "visualize": "visualize"}

# Each command a test or a user relies on, and the page it lives on (README.md: the front door).
PROMISED = {
    "README.md": ["pip install -e . && python train.py data=digits",
                  'pip install -e ".[test]" && ruff check . && pytest',
                  "python train.py experiment=rednet26_imagenet data.root=/data/imagenet",
                  "python train.py model=rednet26 data=cifar10",
                  "python eval.py ckpt=", "python export.py ckpt=", "python visualize.py ckpt="],
    "docs/scaling.md": ["torchrun --nproc_per_node=2 train.py trainer=ddp data=digits",
                        "torchrun --standalone --nproc_per_node=8 --max-restarts=3",
                        "srun bash -c 'TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes=$SLURM_NNODES",
                        "hydra.run.dir=outputs/rednet26-in1k resume=if_exists",
                        "python train.py -m hydra/launcher=submitit_local_ddp trainer=ddp data=digits",
                        "torchrun --standalone --nproc_per_node=8 eval.py trainer=ddp ckpt="],
    "docs/configuration.md": ["python train.py -m hparams_search=digits_optuna",
                              "python train.py experiment=rednet26_cifar10"],
    "docs/deploy.md": ['pip install -e ".[deploy]"', "python export.py ckpt=.../best.pt out=deploy/rednet26.onnx",
                       "python eval.py ckpt=outputs/.../checkpoints/model.onnx"],
    "docs/evaluation.md": ["python eval.py ckpt=.../best.pt data.root=/other/copy",
                           "python visualize.py ckpt=rednet26_8xb32_in1k.pth model=rednet26 data=imagenet"],
}


def code_blocks(page: Path, *languages: str) -> list[str]:
    """The page's fenced blocks in those languages, shell line continuations joined."""
    return [body.replace("\\\n", " ") for lang, body in FENCE.findall(page.read_text()) if lang in languages]


def shell_lines(page: Path) -> list[str]:
    return [" ".join(line.split()) for block in code_blocks(page, "bash") for line in block.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(page, config name, arguments) of every train/eval/export/visualize command in a bash block."""
    found = []
    for page in PAGES:
        for line in shell_lines(page):
            for script, args in ENTRY.findall(line):
                # Shell variables ($SLURM_JOB_ID) take a value; Hydra sees the expanded word.
                found.append((page.relative_to(ROOT).as_posix(), CONFIG_NAME[script],
                              re.sub(r"\$\{?\w+\}?", "1", args).split()))
    return found


def variants(args: list[str]) -> list[list[str]]:
    """The configs a command composes: a sweep (-m a=1,2 b=x,y) composes every combination."""
    overrides = OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-")])
    choices = [[o.input_line] if not o.is_sweep_override() else
               [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in overrides]
    return [list(combination) for combination in itertools.product(*choices)]


def test_the_promised_commands_are_on_their_pages():
    lines = {page.relative_to(ROOT).as_posix(): "\n".join(shell_lines(page)) for page in PAGES}
    missing = [f"{page}: {command}" for page, commands in PROMISED.items() for command in commands
               if command not in lines.get(page, "")]
    assert not missing, "promised commands not found where the tests expect them:\n" + "\n".join(missing)


def test_ci_runs_exactly_the_readme_test_command():
    ci = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line and not line.startswith(("#", "set ",
                                                                                                        "cd "))]
    assert ci == ['pip install -e ".[test]" && ruff check . && pytest']
    assert ci[0] in shell_lines(ROOT / "README.md")


def test_every_documented_command_composes_and_validates():
    """What each command of README.md and docs/ does before any work: Hydra composes its config
    against the schema (unknown keys, wrong types, missing groups), and the values are validated."""
    commands = documented_commands()
    pages = {page for page, _, _ in commands}
    assert {"README.md", "docs/scaling.md", "docs/configuration.md", "docs/deploy.md",
            "docs/evaluation.md"} <= pages, pages
    register_configs()
    failures = []
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for page, name, args in commands:
            for overrides in variants(args):
                try:
                    validate(compose(config_name=name, overrides=overrides, return_hydra_config=True))
                except Exception as e:  # noqa: BLE001  (Hydra's, OmegaConf's and ours: all a broken promise)
                    failures.append(f"{page}: {name}.py {' '.join(args)}: {type(e).__name__}: {e}")
    assert not failures, "\n".join(failures)


def test_python_snippets_import_what_they_use():
    """The snippets' imports name what the package exports (a renamed or moved name breaks them)."""
    for page in PAGES:
        for block in code_blocks(page, "python"):
            imports = "\n".join(line for line in block.splitlines() if line.startswith(("import ", "from ")))
            exec(compile(imports, f"{page.name} snippet", "exec"), {})


def test_the_readme_maps_every_docs_page_and_stays_short():
    readme = (ROOT / "README.md").read_text()
    docs_map = re.search(r"^## Documentation\n(.*?)^## ", readme, re.S | re.M)[1]
    unmapped = [p.name for p in PAGES[1:] if f"](docs/{p.name})" not in docs_map]
    assert not unmapped, f"docs pages the README's map does not link: {unmapped}"
    assert len(readme.splitlines()) <= 250, "the README is the front door; details go to docs/"
