"""Classify images: python predict.py ckpt=path/to/best.pt images=path/to/photos. See README.md."""

from rednet.cli import predict

if __name__ == "__main__":
    predict()
