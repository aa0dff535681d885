"""``python -m winnow.pipeline.core.cat URL``: the bytes of a file or object (any fsspec URL) on standard output.

WebDataset reads shards through ``pipe:`` commands; open_clip_train is given ``pipe:python -m winnow.pipeline.core.cat
s3://bucket/shards/{00000000..00000009}.tar`` for shards on an object store, so any filesystem fsspec knows
works without a cloud vendor's command-line tool.
"""

import shutil
import sys

from winnow.pipeline.core import fsio


def main(url: str) -> None:
    with fsio.open_read(url) as src:
        shutil.copyfileobj(src, sys.stdout.buffer, 1 << 22)
    sys.stdout.buffer.flush()


if __name__ == "__main__":
    main(sys.argv[1])
