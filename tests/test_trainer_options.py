"""Every trainer option run through ``Trainer``, its effect checked against an independent computation.

The runs are a few steps of RedNet-18 on digits. What the loop did is observed from outside:
PyTorch's optimizer and gradient hooks, forward hooks on the model, the checkpoint and the metrics
it returns. One fp32 run with label smoothing, gradient clipping and EMA serves the tests of those
three and is the reference that the channels_last and compiled runs must reproduce.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rednet.engine.trainer import Trainer
from rednet.errors import ConfigError
from rednet.io import read_checkpoint
from rednet.models import Involution
from tests.conftest import compose_config, tiny

BATCH, STEPS, SMOOTHING, CLIP, EMA_DECAY = 32, 4, 0.2, 0.05, 0.3
TINY = tiny(data="digits", batch_size=BATCH, epochs=1, val_batches=1)
OPTIONS = [f"trainer.limit_train_batches={STEPS}", f"trainer.label_smoothing={SMOOTHING}",
           f"trainer.grad_clip={CLIP}", "trainer.ema=true", f"trainer.ema_decay={EMA_DECAY}"]


class Recorder:
    """Hooks on a Trainer, before ``fit()``: what each training step saw and did."""

    def __init__(self, trainer, layers=()):
        self.trainer = trainer
        self.initial = {k: v.detach().double() for k, v in trainer.model.named_parameters()}
        self.logits, self.produced, self.stepped, self.after_step, self.outputs = [], [], [], [], {}
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        grads = {}
        for i, p in enumerate(params):  # the gradient as backward left it in .grad
            p.register_post_accumulate_grad_hook(lambda p, i=i: grads.__setitem__(i, p.grad.detach().clone()))

        def before_step(optimizer, args, kwargs):
            self.produced.append(torch.cat([grads[i].flatten() for i in range(len(params))]))
            self.stepped.append(torch.cat([p.grad.detach().flatten() for p in params]))

        trainer.optimizer.register_step_pre_hook(before_step)
        trainer.optimizer.register_step_post_hook(lambda *_: self.after_step.append(
            {k: v.detach().double() for k, v in trainer.model.named_parameters()}))
        trainer.model.register_forward_hook(
            lambda m, args, out: self.logits.append(out.detach()) if m.training else None)
        for name, module in trainer.model.named_modules():
            if isinstance(module, layers):
                module.register_forward_hook(lambda m, args, out, name=name: self.outputs.setdefault(name, []).append(
                    out.detach()) if m.training else None)

    def fit(self):
        self.metrics = self.trainer.fit()
        self.ckpt = read_checkpoint(self.trainer.ckpt_dir / "last.pt")
        return self


def make_trainer(tmp_path, *overrides, name="run"):
    return Trainer(compose_config(TINY + list(overrides)), tmp_path / name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    trainer = make_trainer(tmp_path_factory.mktemp("options"), *OPTIONS)
    # The sampler's order is a function of (seed, epoch): these are the batches fit() trains on.
    trainer.train_loader.sampler.set_epoch(0)
    order = list(trainer.train_loader.sampler)
    targets = [trainer.data.train_set.targets[order[i * BATCH:(i + 1) * BATCH]] for i in range(STEPS)]
    return Recorder(trainer).fit(), targets


def test_label_smoothing_is_the_loss_that_is_trained(reference):
    run, targets = reference
    assert len(run.logits) == STEPS
    hits = sum(int((logits.argmax(1) == t).sum()) for logits, t in zip(run.logits, targets))
    assert run.metrics["train"]["acc1"] == hits / (STEPS * BATCH)  # the batches are the ones reconstructed
    smoothed = sum(F.cross_entropy(out.double(), t, label_smoothing=SMOOTHING).item()
                   for out, t in zip(run.logits, targets))
    plain = sum(F.cross_entropy(out.double(), t).item() for out, t in zip(run.logits, targets))
    assert run.metrics["train"]["loss"] == pytest.approx(smoothed / STEPS, rel=1e-5)
    assert run.metrics["train"]["loss"] != pytest.approx(plain / STEPS, rel=1e-4)


def test_grad_clip_rescales_the_gradient_to_the_limit(reference):
    run, _ = reference
    assert len(run.produced) == STEPS
    for produced, stepped in zip(run.produced, run.stepped):
        norm = torch.linalg.vector_norm(produced.double()).item()
        assert norm > 2 * CLIP  # the clip acted
        torch.testing.assert_close(stepped.double(), produced.double() * CLIP / norm, rtol=1e-4, atol=1e-9)
        assert torch.linalg.vector_norm(stepped.double()).item() == pytest.approx(CLIP, rel=1e-4)


def test_ema_follows_the_weights_with_its_warmup(reference):
    run, _ = reference
    # rednet/engine/ema.py: decay_n = min(decay, (1 + n) / (10 + n)) at the n-th update; with
    # decay 0.3 updates 1 and 2 are in the warm-up and 3 and 4 at the decay itself.
    expected = dict(run.initial)
    for n, weights in enumerate(run.after_step, start=1):
        d = min(EMA_DECAY, (1 + n) / (10 + n))
        expected = {k: d * expected[k] + (1 - d) * weights[k] for k in expected}
    ema, model = run.ckpt["ema"], run.ckpt["model"]
    assert len(run.after_step) == STEPS and int(ema["updates"]) == STEPS
    for k, v in expected.items():
        torch.testing.assert_close(ema[f"module.{k}"].double(), v, rtol=1e-5, atol=1e-8, msg=lambda m: f"{k}: {m}")
    assert not torch.allclose(ema["module.head.fc.weight"], model["head.fc.weight"])  # it trails the weights
    for k, v in model.items():  # buffers (BatchNorm statistics) are the model's own
        if k not in run.initial:
            assert torch.equal(ema[f"module.{k}"], v), k
    assert "val_ema" in run.metrics


def assert_same_training(run, reference, rtol, grad_rtol=None):
    """The same losses, and the same gradient at every step, as the reference run.

    ``grad_rtol`` compares each step's gradient by its relative norm instead of element by element:
    another summation order (channels_last's kernels, more threads) moves a pre-activation of a few
    1e-6 across ReLU's kink now and then, which changes the gradients behind that one unit by
    about 1% of their norm, while a real layout mistake changes them completely.
    """
    assert run.metrics["train"]["loss"] == pytest.approx(reference.metrics["train"]["loss"], rel=rtol)
    assert run.metrics["val"]["loss"] == pytest.approx(reference.metrics["val"]["loss"], rel=rtol)
    assert len(run.produced) == len(reference.produced) == STEPS
    for got, want in zip(run.produced, reference.produced):
        if grad_rtol is None:
            torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item())
        else:
            assert (torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want)).item() < grad_rtol


def test_channels_last_is_the_layout_and_trains_like_nchw(tmp_path, reference):
    trainer = make_trainer(tmp_path, *OPTIONS, "trainer.channels_last=true")
    run = Recorder(trainer, (nn.Conv2d, Involution)).fit()
    weights = [p for p in trainer.model.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    # (1x1 kernels and single input channels are both layouts at once.)
    assert all(not p.is_contiguous() for p in weights if p.shape[1] > 1 and p.shape[-1] > 1)
    # Every conv and involution output is channels_last (maps of 1x1 are both layouts at once).
    outputs = [out for outs in run.outputs.values() for out in outs]
    assert len(run.outputs) == sum(isinstance(m, (nn.Conv2d, Involution)) for m in trainer.model.modules())
    assert all(out.is_contiguous(memory_format=torch.channels_last) for out in outputs)
    assert not run.outputs["backbone.stem.0.conv"][0].is_contiguous()
    assert_same_training(run, reference[0], rtol=1e-3, grad_rtol=3e-2)


@pytest.mark.slow  # Inductor compiles a RedNet
def test_compile_trains_like_eager(tmp_path, reference, monkeypatch):
    from torch._dynamo.testing import CompileCounterWithBackend

    # aot_eager runs Dynamo and AOTAutograd (the joint forward/backward graph) without Inductor's
    # code generation; the counter shows that the trainer's model really went through torch.compile.
    counter = CompileCounterWithBackend("aot_eager")
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: compile_(model, **{**kwargs, "backend": counter}))
    try:
        run = Recorder(make_trainer(tmp_path, *OPTIONS, "trainer.compile=true")).fit()
    finally:
        torch._dynamo.reset()
    assert counter.frame_count >= 1
    assert_same_training(run, reference[0], rtol=1e-5)


def test_bf16_autocast_on_the_cpu(tmp_path):
    # Batch 8 and one step: without AVX512-BF16 PyTorch's CPU convolutions in bf16 are slow.
    trainer = make_trainer(tmp_path, "trainer.precision=bf16", "data.batch_size=8", "trainer.limit_train_batches=1")
    run = Recorder(trainer, (nn.Conv2d, nn.Linear, Involution)).fit()
    assert len(run.outputs) == sum(isinstance(m, (nn.Conv2d, nn.Linear, Involution)) for m in trainer.model.modules())
    assert {out.dtype for outs in run.outputs.values() for out in outs} == {torch.bfloat16}
    assert math.isfinite(run.metrics["train"]["loss"]) and math.isfinite(run.metrics["val"]["loss"])
    assert torch.isfinite(run.produced[0]).all()
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}  # the weights stay fp32
    assert not trainer.scaler.is_enabled()  # bf16 has fp32's range: no loss scaling


@pytest.mark.slow  # fp16 on the CPU is emulated
def test_fp16_autocast_scales_the_loss_and_unscales_before_the_step(tmp_path):
    with torch.autocast("cpu", dtype=torch.float16):
        if nn.Linear(2, 2)(torch.ones(1, 2)).dtype != torch.float16:
            pytest.skip("this PyTorch has no float16 autocast on the CPU")
    # Batch 4: with the initial scale of 2^16 the first 4 steps overflow, then steps are taken.
    steps = 6
    trainer = make_trainer(tmp_path, "trainer.precision=fp16", "data.batch_size=4",
                           f"trainer.limit_train_batches={steps}")
    run = Recorder(trainer, (nn.Conv2d, nn.Linear, Involution))
    scales = []
    trainer.model.register_forward_hook(
        lambda m, args, out: scales.append(trainer.scaler.get_scale()) if m.training else None)
    run.fit()
    assert {out.dtype for outs in run.outputs.values() for out in outs} == {torch.float16}
    assert math.isfinite(run.metrics["train"]["loss"]) and math.isfinite(run.metrics["val"]["loss"])

    # GradScaler's contract: backward sees loss * scale; a step whose gradient overflowed is
    # skipped and halves the scale; a step that is taken sees the gradient divided by the scale.
    assert scales[0] == 2.0**16 and len(scales) == steps
    after = scales[1:] + [run.ckpt["scaler"]["scale"]]  # the scale each step left for the next
    skipped = [i for i in range(steps) if after[i] != scales[i]]
    assert all(after[i] == scales[i] / 2 for i in skipped)
    taken = [scales[i] for i in range(steps) if i not in skipped]
    assert len(run.produced) == len(taken) > 0
    for produced, stepped, scale in zip(run.produced, run.stepped, taken):
        assert torch.isfinite(produced).all()
        torch.testing.assert_close(stepped, produced / scale, rtol=1e-6, atol=0)


def test_sync_batchnorm_on_the_cpu_is_refused_before_training(tmp_path):
    # PyTorch's SyncBatchNorm runs only on GPUs: on the CPU, two gloo processes raised a ValueError
    # in the first training step. (Where it does run, it needs two GPUs to be observed.)
    with pytest.raises(ConfigError, match="trainer.sync_batchnorm=true needs CUDA"):
        make_trainer(tmp_path, "trainer=ddp", "trainer.device=cpu", "trainer.sync_batchnorm=true")
