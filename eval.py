"""Evaluate a checkpoint: python eval.py ckpt=path/to/best.pt [data=... model=...]. See README.md."""

from rednet.cli import evaluate

if __name__ == "__main__":
    evaluate()
