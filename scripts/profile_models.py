"""Parameters and GMACs of every registered model, as a markdown table.

    python scripts/profile_models.py

GMACs count convolutions, linear layers and involution's K*K multiply-adds per output element
(see rednet.models.complexity). The official column is the FLOPs figure of the RedNet release.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's rednet

from rednet.models import create_model, list_models  # noqa: E402
from rednet.models.complexity import count_macs, count_params  # noqa: E402

# The official RedNet table: params (M) and FLOPs (G) at 224x224.
OFFICIAL = {"rednet26": (9.23, 1.73), "rednet38": (12.39, 2.22), "rednet50": (15.54, 2.71),
            "rednet101": (25.65, 4.74), "rednet152": (33.99, 6.79)}


def profile(names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        imagenet = create_model(name)
        cifar = create_model(name, num_classes=10, cifar_stem=True)
        rows.append({"model": name, "params_m": count_params(imagenet) / 1e6,
                     "gmacs_224": count_macs(imagenet, (3, 224, 224)) / 1e9,
                     "gmacs_32": count_macs(cifar, (3, 32, 32)) / 1e9,
                     "official": OFFICIAL.get(name)})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | params (M) | GMACs 224² | GMACs 32² (CIFAR stem, 10 classes) | official params (M) / GFLOPs |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        official = "{:.2f} / {:.2f}".format(*r["official"]) if r["official"] else "–"
        lines.append(f"| {r['model']} | {r['params_m']:.2f} | {r['gmacs_224']:.2f} | {r['gmacs_32']:.3f} "
                     f"| {official} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list_models(), help="default: all registered models")
    args = parser.parse_args()
    print(markdown(profile(args.models)))


if __name__ == "__main__":
    main()
