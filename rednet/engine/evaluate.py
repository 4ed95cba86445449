"""One evaluation pass, shared by validation during training and by ``eval.py``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from rednet.engine.distributed import DistInfo, all_gather_object, all_reduce_sum
from rednet.engine.precision import autocast
from rednet.metrics import ConfusionMatrix, to_json, topk_correct

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
def evaluate(model: nn.Module, loader, device: torch.device, dtype: torch.dtype | None, class_names: list[str],
             dist: DistInfo = DistInfo(), channels_last: bool = False, limit_batches: int | None = None,
             progress: bool = False, desc: str = "val", keep_mistakes: int = 0) -> EvalResult:
    """Loss (plain cross-entropy), top-1, top-5 and the confusion matrix over ``loader``; with
    ``keep_mistakes=N``, also the N most confident mistakes.

    Under DDP every rank sees a disjoint shard and the counts are summed, so the result equals a
    single-process pass over the same data; the mistakes are gathered from every rank.
    """
    model.eval()
    confusion = ConfusionMatrix(len(class_names), class_names)
    sums = torch.zeros(3, dtype=torch.float64)  # loss sum, top-5 hits, samples
    mistakes: list[Mistake] = []
    for i, (images, target) in enumerate(tqdm(loader, desc=desc, disable=not progress, leave=False)):
        if limit_batches is not None and i >= limit_batches:
            break
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        target = target.to(device, non_blocking=True)
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


def check_class_names(trained: list[str] | None, data: list[str], what: str, where: str) -> None:
    """A model's output i means the class it was trained on as class i: with other names, or the
    same names in another order, every label would be silently wrong. Official mmcls checkpoints
    carry no names and are not checked."""
    from rednet.errors import CheckpointError

    if trained is None or list(trained) == data:
        return
    if len(trained) != len(data):
        return  # the class-count check gives the clearer message
    i = next(i for i, (a, b) in enumerate(zip(trained, data)) if a != b)
    raise CheckpointError(f"{what} was trained on other classes than {where} has: class {i} is {trained[i]!r} there "
                          f"and {data[i]!r} here; use data with the class folders it was trained on")


def write_misclassified(result: EvalResult, class_names: list[str], data_cfg, run_dir: Path, writer=None) -> Path:
    """``misclassified.png`` (and the TensorBoard image ``eval/misclassified``): the most confident
    mistakes, or a note that there were none."""
    from rednet.viz.images import save_figure
    from rednet.viz.misclassified import misclassified_figure

    if not result.mistakes:
        print(f"no mistakes: all {result.count} images were classified correctly")
    figure = misclassified_figure(result.mistakes, class_names, data_cfg.mean, data_cfg.std, result.count)
    path = save_figure(figure, run_dir / "misclassified.png", close=writer is None)
    if writer is not None:
        writer.add_figure("eval/misclassified", figure, 0, close=True)
    return path


def evaluate_checkpoint(cfg, ckpt: dict, run_dir: str | Path) -> EvalResult:
    """``eval.py``: evaluates ``ckpt`` (the contents of ``cfg.ckpt``) on ``cfg.data``'s validation
    split and writes the report (metrics.json, confusion_matrix.csv/.png, TensorBoard events) into
    ``run_dir``."""
    from rednet.data import build_datamodule
    from rednet.engine import distributed
    from rednet.engine.precision import resolve_auto, resolve_device, resolve_precision
    from rednet.errors import CheckpointError
    from rednet.models import build_model, load_weights
    from rednet.models.weights import state_dict_of

    t = cfg.trainer
    device = resolve_device(t.device, distributed.env_info().local_rank)
    dist = distributed.init_distributed(device, t.ddp_timeout_s) if t.strategy == "ddp" else distributed.DistInfo()
    run_dir = Path(distributed.broadcast_object(str(run_dir), dist))
    dtype = resolve_precision(t.precision, device)
    channels_last = resolve_auto("channels_last", t.channels_last, device)
    with distributed.main_first(dist):
        data = build_datamodule(cfg.data)
    head = state_dict_of(ckpt).get("head.fc.weight")
    if head is not None and head.shape[0] != data.num_classes:
        raise CheckpointError(f"checkpoint {cfg.ckpt} has {head.shape[0]} classes but data={cfg.data.name} has "
                              f"{data.num_classes}; evaluate it on data with the same classes")
    check_class_names(ckpt.get("class_names"), list(data.class_names), f"checkpoint {cfg.ckpt}",
                      f"data={cfg.data.name}")
    model = build_model(cfg.model, data.num_classes, data.in_chans, data.image_size)
    load_weights(model, ckpt, name=str(cfg.ckpt))
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.data.batch_size % dist.world_size:
        raise CheckpointError(f"data.batch_size={cfg.data.batch_size} does not divide across {dist.world_size} "
                              f"processes")
    loader = data.val_loader(cfg.data.batch_size // dist.world_size, dist.rank, dist.world_size)
    result = evaluate(model, loader, device, dtype, list(data.class_names), dist, channels_last,
                      t.limit_val_batches, progress=False, desc="eval", keep_mistakes=MISCLASSIFIED_SHOWN)
    if dist.is_main:
        write_report(result, run_dir, {"checkpoint": str(cfg.ckpt), "model": cfg.model.name, "data": cfg.data.name},
                     cfg.data)
    return result


def write_report(result: EvalResult, run_dir: str | Path, info: dict, data_cfg) -> None:
    """eval.py's report, for a checkpoint and an exported .onnx alike: metrics.json (``info``, the
    totals and per-class metrics), confusion_matrix.csv/.png, misclassified.png (images shown as
    ``data_cfg``'s mean and std de-normalise them) and TensorBoard events in ``run_dir``, and a table
    on stdout. ``info`` names at least the ``checkpoint``, ``model`` and ``data``."""
    from torch.utils.tensorboard import SummaryWriter

    from rednet.viz.images import save_figure

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    report = {**result.as_dict(), **info, "per_class": result.confusion.per_class()}
    (run_dir / "metrics.json").write_text(to_json(report))
    result.confusion.write_csv(run_dir / "confusion_matrix.csv")
    confusion = result.confusion.figure()  # drawn once, for the file and for TensorBoard
    save_figure(confusion, run_dir / "confusion_matrix.png", dpi=110, close=False)
    with SummaryWriter(run_dir / "tensorboard") as writer:
        for key in ("acc1", "acc5", "loss"):
            writer.add_scalar(f"eval/{key}", getattr(result, key), 0)
        writer.add_figure("eval/confusion_matrix", confusion, 0, close=True)
        write_misclassified(result, result.confusion.class_names, data_cfg, run_dir, writer)
    print(format_report(result, f"{info['model']} on {info['data']} ({info['checkpoint']}); report in {run_dir}"))
