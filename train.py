"""Train a model: python train.py model=rednet26 data=cifar10 [key=value ...]. See README.md."""

from rednet.cli import train

if __name__ == "__main__":
    train()
