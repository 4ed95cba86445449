"""Inference images/s in ONNX Runtime and in PyTorch, as a markdown table.

    python scripts/bench_onnx.py                      # everything the README shows, in one run
    python scripts/bench_onnx.py --formulations auto  # only the formulation export.py writes

By default it compares RedNet-26 and ResNet-50 at batch 1 and 8, with RedNet-26 exported in every
formulation of the involution (``auto``, export.py's, first). On an idle 2-core CPU that takes
about 5 minutes (most of it the slow formulations and the 8 exports); it prints its wall time.

Every model is exported exactly as ``export.py`` exports it (BatchNorm folded, involutions in
standard operators) and run in ONNX Runtime on the CPU with ``--threads`` intra-op threads; the
PyTorch rows run the same models in eval mode under ``torch.inference_mode`` with as many threads.
Everything runs in this one process, and the timed calls are interleaved (one call of every
configuration per round, ``--repeats`` rounds), so a machine whose load changes affects every row
alike. Images/s is the batch size over the median time of a call. Ratios are against
torchvision's ResNet-50 (``tv_resnet50``) in the same runtime at the same batch size.

``--formulations`` exports RedNet with each of :data:`rednet.deploy.involution.FORMULATIONS`,
to compare the ways of writing involution in ONNX operators.

``--memory-batch N`` also runs every exported file three times at batch N in a fresh process of
its own (ONNX Runtime alone, no PyTorch; Linux) and prints how far that raised the process's peak
resident memory above what the loaded session held: the memory inference at that batch costs,
the input batch included.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's rednet

from rednet.deploy.export import to_onnx  # noqa: E402
from rednet.deploy.involution import DEFAULT, FORMULATIONS  # noqa: E402
from rednet.deploy.runtime import INPUT, OUTPUT, require, session  # noqa: E402
from rednet.models import create_model, list_models  # noqa: E402
from scripts.benchmark import environment  # noqa: E402

REFERENCE = "tv_resnet50"


def build(name: str) -> torch.nn.Module:
    model = torchvision.models.resnet50() if name == REFERENCE else create_model(name)
    return model.eval()


# Run in a fresh interpreter: the peak resident memory batches add to a loaded session. Linux's
# VmHWM, not getrusage's ru_maxrss, which a process inherits across exec from its parent.
PEAK_MEMORY = """
import sys
import numpy as np, onnxruntime as ort

def high_water_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024

path, batch, size, threads = sys.argv[1], *map(int, sys.argv[2:])
options = ort.SessionOptions()
options.intra_op_num_threads = threads
run = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
loaded = high_water_mib()
images = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
for _ in range(3):  # ONNX Runtime plans its memory on the first run and allocates it on the second
    run.run(None, {"images": images})
print(high_water_mib() - loaded)
"""


def batch_memory_mib(model: bytes, batch: int, size: int, threads: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(model)
        out = subprocess.run([sys.executable, "-c", PEAK_MEMORY, str(path), str(batch), str(size), str(threads)],
                             capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


def interleaved_medians(calls: dict, repeats: int, warmup: int) -> dict:
    """The median seconds of each call, timing one call of each per round."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    times = {key: [] for key in calls}
    for _ in range(repeats):
        for key, call in calls.items():
            start = time.perf_counter()
            call()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) for key, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["rednet26", REFERENCE])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--formulations", nargs="+", default=[DEFAULT, *FORMULATIONS],
                        choices=[DEFAULT, *FORMULATIONS],
                        help="involution formulations to export RedNets with")
    parser.add_argument("--no-pytorch", action="store_true", help="leave out the PyTorch rows")
    parser.add_argument("--memory-batch", type=int, default=0,
                        help="also measure the peak memory of one batch of this size, per file")
    args = parser.parse_args()
    unknown = [m for m in args.models if m != REFERENCE and m not in list_models()]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list_models() + [REFERENCE]}")
    if min(args.batch_size + [args.resolution, args.threads, args.repeats]) < 1:
        parser.error("--batch-size, --resolution, --threads and --repeats must be at least 1")
    ort = require("onnxruntime")
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    models = {name: build(name) for name in args.models}
    inputs = {b: torch.randn(b, 3, args.resolution, args.resolution) for b in args.batch_size}
    onnx_calls, torch_calls, files = {}, {}, {}
    for name, model in models.items():
        has_involution = name.startswith("rednet")
        for formulation in args.formulations if has_involution else ["–"]:
            proto = to_onnx(model, 3, args.resolution, formulation if has_involution else DEFAULT)
            files[(name, formulation)] = proto.SerializeToString()
            run = session(files[(name, formulation)], threads=args.threads)
            for b, x in inputs.items():
                feed = {INPUT: x.numpy()}
                onnx_calls[(name, formulation, b)] = lambda run=run, feed=feed: run.run([OUTPUT], feed)
        for b, x in inputs.items():
            def call(model=model, x=x):
                with torch.inference_mode():
                    model(x)
            torch_calls[(name, "–", b)] = call

    onnx_s = interleaved_medians(onnx_calls, args.repeats, args.warmup)
    torch_s = {} if args.no_pytorch else interleaved_medians(torch_calls, args.repeats, args.warmup)

    def cells(medians: dict, key) -> str:
        """images/s and the ratio to the reference at the same batch, as two table cells."""
        if key not in medians:
            return "– | –"
        b = key[-1]
        ref = next((s for k, s in medians.items() if k[0] == REFERENCE and k[-1] == b), None)
        return f"{b / medians[key]:.1f} | " + (f"{ref / medians[key]:.2f}" if ref else "–")

    print(environment(torch.device("cpu")) + f"; onnxruntime {ort.__version__}; {args.threads} threads in both; "
          f"{args.resolution} px, fp32, median of {args.repeats} interleaved calls\n")
    print(f"| model | involution in ONNX | batch | ONNX Runtime img/s | × {REFERENCE} | PyTorch img/s "
          f"| × {REFERENCE} |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for b in args.batch_size:
        for key in [k for k in onnx_s if k[-1] == b]:
            name, formulation, _ = key
            # One PyTorch figure per model: on the row of the first formulation.
            pytorch = cells(torch_s, (name, "–", b)) if formulation in ("–", args.formulations[0]) else "– | –"
            print(f"| {name} | {formulation} | {b} | {cells(onnx_s, key)} | {pytorch} |")
    if args.memory_batch:
        print(f"\n| model | involution in ONNX | peak memory of a batch of {args.memory_batch}, MiB |")
        print("|---|---|---:|")
        for (name, formulation), model in files.items():
            mib = batch_memory_mib(model, args.memory_batch, args.resolution, args.threads)
            print(f"| {name} | {formulation} | {mib:.0f} |")
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
