"""Pack an ImageFolder tree into tar shards: python pack.py data=imagenet data.root=SRC out=DST [max_side=320]."""

from rednet.cli import pack

if __name__ == "__main__":
    pack()
