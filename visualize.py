"""Draw what the involution kernels attend to: python visualize.py ckpt=path/to/best.pt [images=...]. See README.md."""

from rednet.cli import visualize

if __name__ == "__main__":
    visualize()
