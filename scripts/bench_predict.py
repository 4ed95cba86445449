"""predict.py's images/s against the model alone, as a markdown table.

    python scripts/bench_predict.py                          # 200 photos, RedNet-26 at 224 px, batch 32
    python scripts/bench_predict.py --images 16 --image-size 64 --batch 8   # a quick check

The target (issue 24): predict.py on 200 photos runs at 0.8x or more of the images/s of the model
alone on preloaded tensors at the same batch size.

Both run in this one process, on the same loaded model (a RedNet-26 checkpoint in the trainer's
format for 1,000 classes, ImageNet's data config: resize to 256, centre crop 224), on the same
device, precision and memory layout predict.py chooses:

- *model alone*: the files decoded, transformed and normalised beforehand, held in memory as
  float32 batches; only the forward passes are timed (under ``torch.no_grad``).
- *predict.py*: what the command does once the checkpoint is loaded: its pass over the files
  (reading, decoding on a background thread, the eval transform, normalising, the model, top-k)
  and writing predictions.csv and predictions.json (:func:`rednet.predict.predict_files`).
  Loading the checkpoint and building the model is a row of its own: it is paid once per run,
  whatever the number of images.

The two are interleaved, ``--repeats`` rounds (which goes first alternates), and each row reports
its fastest round: a machine whose load changes affects both alike. The photographs are the JPEGs of ``tests/photos.py``
(ImageNet-like sizes, 500 x 375 and up, re-encoded from scikit-learn's two sample photographs).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's rednet

from rednet.data.files import find_images  # noqa: E402
from rednet.data.transforms import normalize_batch  # noqa: E402
from rednet.engine.precision import autocast  # noqa: E402
from rednet.engine.trained import config_for, open_trained  # noqa: E402
from rednet.io import save_checkpoint  # noqa: E402
from rednet.models import build_model  # noqa: E402
from rednet.predict import Predictor, compose_predict_config, predict_files  # noqa: E402
from scripts.benchmark import environment  # noqa: E402
from tests.photos import write_photos  # noqa: E402

NUM_CLASSES = 1000


def make_checkpoint(folder: Path, model: str, image_size: int) -> Path:
    keys = [f"model={model}", "data=imagenet", f"data.image_size={image_size}",
            f"data.val_resize={round(image_size * 256 / 224)}", "ckpt=none", "images=[]"]
    cfg = compose_predict_config(keys)
    net = build_model(cfg.model, NUM_CLASSES, 3, image_size)
    path = folder / "best.pt"
    save_checkpoint({"model": net.state_dict(), "class_names": [f"class_{i}" for i in range(NUM_CLASSES)],
                     "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)}, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--model", default="rednet26")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch's intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_photos(tmp / "photos", args.images)
        ckpt = make_checkpoint(tmp, args.model, args.image_size)
        keys = [f"ckpt={ckpt}", f"images={tmp / 'photos'}", f"data.batch_size={args.batch}",
                f"trainer.device={args.device}", "trainer.progress=none"]

        start = time.perf_counter()
        trained = open_trained(ckpt)
        cfg = config_for(compose_predict_config(keys), trained, keys)
        predictor = Predictor.from_config(cfg, trained)
        load_s = time.perf_counter() - start
        files = find_images(str(tmp / "photos"))

        # The model alone: the same inputs, decoded and normalised beforehand.
        images = torch.stack([predictor.load(f)[1] for f in files])
        batches = [normalize_batch(b, predictor.mean, predictor.std).to(predictor.device)
                   for b in images.split(args.batch)]
        if predictor.channels_last:
            batches = [b.contiguous(memory_format=torch.channels_last) for b in batches]

        def model_alone() -> float:
            start = time.perf_counter()
            with torch.no_grad(), autocast(predictor.device, predictor.dtype):
                for batch in batches:
                    predictor.model(batch).float().softmax(1)
            if predictor.device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start

        def predict() -> float:
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                predict_files(cfg, predictor, files, tmp / "run")
            return time.perf_counter() - start

        model_alone()  # warm-up: first-call allocations and kernel choices
        if predictor.device.type == "cuda":
            torch.cuda.synchronize()
        alone_s, predict_s = [], []
        for round_ in range(args.repeats):  # alternating which goes first
            if round_ % 2:
                predict_s.append(predict())
            alone_s.append(model_alone())
            if not round_ % 2:
                predict_s.append(predict())

    count = len(files)
    alone, full = count / min(alone_s), count / min(predict_s)
    print(f"# predict.py vs the model alone: {count} photos, {args.model} at {args.image_size} px, batch "
          f"{args.batch}, device {predictor.device}, precision {predictor.dtype or 'fp32'}, "
          f"channels_last {predictor.channels_last}, best of {args.repeats}\n")
    print(environment(predictor.device) + "\n")
    print("| | images/s | seconds | vs the model alone |")
    print("|---|---:|---:|---:|")
    print(f"| model alone (preloaded tensors) | {alone:.1f} | {min(alone_s):.2f} | 1.00x |")
    print(f"| predict.py (files to predictions.csv/.json) | {full:.1f} | {min(predict_s):.2f} | {full / alone:.2f}x |")
    print(f"| loading the checkpoint (once per run) | | {load_s:.2f} | |")
    verdict = "meets" if full / alone >= 0.8 else "misses"
    print(f"\npredict.py {verdict} the target of 0.8x the model alone ({full / alone:.2f}x)")


if __name__ == "__main__":
    main()
