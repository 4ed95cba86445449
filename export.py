"""Export a checkpoint to ONNX: python export.py ckpt=path/to/best.pt [out=model.onnx]. See README.md."""

from rednet.cli import export

if __name__ == "__main__":
    export()
