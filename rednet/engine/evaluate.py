"""One evaluation pass, shared by validation during training and by ``eval.py``; and eval.py's
report."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from rednet.data import build_datamodule
from rednet.engine import distributed
from rednet.engine.context import setup_run
from rednet.engine.distributed import DistInfo, all_gather_object, all_reduce_sum
from rednet.engine.feed import DeviceFeed
from rednet.engine.precision import autocast
from rednet.engine.trained import Trained
from rednet.io import atomic_write, write_json
from rednet.metrics import ConfusionMatrix, topk_correct
from rednet.viz.confusion import confusion_figure
from rednet.viz.images import save_figure
from rednet.viz.misclassified import misclassified_figure

log = logging.getLogger("rednet")
MISCLASSIFIED_SHOWN = 16  # eval.py's misclassified.png: the most confident mistakes


@dataclass
class Mistake:
    image: torch.Tensor  # (C, H, W) on the CPU, normalised as the model saw it
    target: int
    pred: int
    confidence: float  # the softmax probability of ``pred``


def most_confident_mistakes(kept: list[Mistake], images: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                            count: int) -> list[Mistake]:
    """The ``count`` most confident of ``kept`` and this batch's mistakes, most confident first."""
    confidence, pred = logits.softmax(1).max(1)
    wrong = (pred != target).nonzero().flatten()
    top = wrong[confidence[wrong].argsort(descending=True)[:count]].tolist()
    # clone(): a view would keep (and, under DDP, send) the whole batch.
    new = [Mistake(images[i].detach().float().cpu().clone(), int(target[i]), int(pred[i]), float(confidence[i]))
           for i in top]
    return sorted(kept + new, key=lambda m: -m.confidence)[:count]


@dataclass
class EvalResult:
    loss: float
    acc1: float
    acc5: float
    count: int
    confusion: ConfusionMatrix
    mistakes: list[Mistake] = field(default_factory=list)  # with keep_mistakes: the most confident ones

    def as_dict(self) -> dict:
        return {"acc1": self.acc1, "acc5": self.acc5, "loss": self.loss, "count": self.count}


@torch.no_grad()
def evaluate(model: nn.Module, batches: DeviceFeed, device: torch.device, dtype: torch.dtype | None,
             class_names: list[str], dist: DistInfo = DistInfo(), limit_batches: int | None = None,
             progress: bool = False, desc: str = "val", keep_mistakes: int = 0) -> EvalResult:
    """Loss (plain cross-entropy), top-1, top-5 and the confusion matrix over ``batches`` (a
    validation loader's, on ``device`` and normalised); with ``keep_mistakes=N``, also the N most
    confident mistakes.

    Under DDP every rank sees a disjoint shard and the counts are summed, so the result equals a
    single-process pass over the same data; the mistakes are gathered from every rank.
    """
    model.eval()
    confusion = ConfusionMatrix(len(class_names), class_names)
    sums = torch.zeros(3, dtype=torch.float64)  # loss sum, top-5 hits, samples
    mistakes: list[Mistake] = []
    for i, (images, target) in enumerate(tqdm(batches, desc=desc, disable=not progress, leave=False)):
        if limit_batches is not None and i >= limit_batches:
            break
        with autocast(device, dtype):
            logits = model(images)
        logits = logits.float()
        sums[0] += float(F.cross_entropy(logits, target, reduction="sum"))
        sums[1] += topk_correct(logits, target, (5,))[0]
        sums[2] += target.numel()
        confusion.update(logits.argmax(1), target)
        if keep_mistakes:
            mistakes = most_confident_mistakes(mistakes, images, logits, target, keep_mistakes)
    if dist.enabled and keep_mistakes:
        # As plain dicts: the gather loads what it receives with weights_only=True.
        gathered = all_gather_object([asdict(m) for m in mistakes], dist)
        mistakes = sorted((Mistake(**m) for rank in gathered for m in rank),
                          key=lambda m: -m.confidence)[:keep_mistakes]
    if dist.enabled:
        packed = torch.cat([sums, confusion.matrix.flatten().double()]).to(device)
        packed = all_reduce_sum(packed, dist).cpu()
        sums, confusion.matrix = packed[:3], packed[3:].round().long().view_as(confusion.matrix)
    count = int(sums[2])
    return EvalResult(loss=float(sums[0]) / max(count, 1), acc1=confusion.accuracy,
                      acc5=float(sums[1]) / max(count, 1), count=count, confusion=confusion, mistakes=mistakes)


def format_report(result: EvalResult, title: str, worst: int = 10) -> str:
    """A compact table: the totals, then per class (all of them up to 20 classes, else the worst by F1)."""
    rows = result.confusion.per_class()
    lines = [title, "",
             "| images | top-1 | top-5 | loss |", "|---:|---:|---:|---:|",
             f"| {result.count} | {result.acc1:.4f} | {result.acc5:.4f} | {result.loss:.4f} |", ""]
    shown = rows if len(rows) <= 20 else sorted(rows, key=lambda r: r["f1"])[:worst]
    if len(rows) > 20:
        lines.append(f"{worst} classes with the lowest F1 (all {len(rows)} are in metrics.json):")
    lines += ["| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['class']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['support']} |"
              for r in shown]
    return "\n".join(lines)


def write_misclassified(result: EvalResult, class_names: list[str], data_cfg, run_dir: Path, writer=None) -> Path:
    """``misclassified.png`` (and the TensorBoard image ``eval/misclassified``): the most confident
    mistakes, or a note that there were none."""
    if not result.mistakes:
        print(f"no mistakes: all {result.count} images were classified correctly")
    figure = misclassified_figure(result.mistakes, class_names, data_cfg.mean, data_cfg.std, result.count)
    path = save_figure(figure, run_dir / "misclassified.png", close=writer is None)
    if writer is not None:
        writer.add_figure("eval/misclassified", figure, 0, close=True)
    return path


def evaluate_trained(cfg: DictConfig, trained: Trained, run_dir: str | Path) -> EvalResult:
    """``eval.py``: evaluates ``trained`` (a checkpoint, or an exported file in ONNX Runtime) on
    ``cfg.data``'s validation split and writes the report (metrics.json, confusion_matrix.csv/.png,
    misclassified.png, TensorBoard events) into ``run_dir``. Under DDP each rank evaluates a shard."""
    trained.settle_runtime(cfg)
    ctx = setup_run(cfg, run_dir)
    with distributed.main_first(ctx.dist):
        data = build_datamodule(cfg.data)
    model = trained.model_for(cfg, list(data.class_names), data.in_chans, f"data={cfg.data.name}", "eval.py")
    model.to(ctx.device)
    if ctx.channels_last:
        model.to(memory_format=torch.channels_last)
    batches = DeviceFeed(data.val_loader(ctx.batch_per_rank, ctx.dist.rank, ctx.dist.world_size), ctx.device,
                         data.mean, data.std, channels_last=ctx.channels_last, name=f"data={cfg.data.name}")
    result = evaluate(model, batches, ctx.device, ctx.dtype, list(data.class_names), ctx.dist,
                      cfg.trainer.limit_val_batches, progress=False, desc="eval", keep_mistakes=MISCLASSIFIED_SHOWN)
    if ctx.dist.is_main:
        info = {"checkpoint": str(trained.path), "model": cfg.model.name, "data": cfg.data.name}
        if trained.runtime != "torch":
            info["runtime"] = trained.runtime
        write_report(result, ctx.run_dir, info, cfg.data)
    return result


def write_report(result: EvalResult, run_dir: str | Path, info: dict, data_cfg) -> None:
    """eval.py's report, for a checkpoint and an exported .onnx alike: metrics.json (``info``, the
    totals and per-class metrics), confusion_matrix.csv/.png, misclassified.png (images shown as
    ``data_cfg``'s mean and std de-normalise them) and TensorBoard events in ``run_dir``, and a summary
    line and a table in the log (the console, and eval.log under Hydra). ``info`` names at least the
    ``checkpoint``, ``model`` and ``data``."""
    run_dir = Path(run_dir)
    report = {**result.as_dict(), **info, "per_class": result.confusion.per_class()}
    write_json(run_dir / "metrics.json", report)
    atomic_write(run_dir / "confusion_matrix.csv", result.confusion.csv())
    confusion = confusion_figure(result.confusion)  # drawn once, for the file and for TensorBoard
    save_figure(confusion, run_dir / "confusion_matrix.png", dpi=110, close=False)
    with SummaryWriter(run_dir / "tensorboard") as writer:
        for key in ("acc1", "acc5", "loss"):
            writer.add_scalar(f"eval/{key}", getattr(result, key), 0)
        writer.add_figure("eval/confusion_matrix", confusion, 0, close=True)
        write_misclassified(result, result.confusion.class_names, data_cfg, run_dir, writer)
    # Through the log, not print: Hydra's file handler then keeps it in eval.log, as train.log keeps a run's.
    log.info(f"evaluated {info['checkpoint']} on data={info['data']}: {result.count} images, top-1 "
             f"{100 * result.acc1:.2f}%, top-5 {100 * result.acc5:.2f}%, loss {result.loss:.4f}; report in {run_dir}")
    log.info(format_report(result, f"{info['model']} on {info['data']} ({info['checkpoint']}); report in {run_dir}"))
