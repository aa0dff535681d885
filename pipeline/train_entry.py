"""``python -m pipeline.train_entry ARGS``: OpenCLIP's own trainer, with Winnow's tiny configs registered.

open_clip_train has no flag for extra model configs, so this registers them and then hands the arguments to
``open_clip_train.main.main`` unchanged. With ``WINNOW_DRAFT_SIDE=N`` set (``pipeline.train`` sets it to twice
the model's input size), JPEGs are decoded with PIL's draft mode: the DCT is scaled down while decoding so
that both sides stay >= N. The trainer's own resize then sees at least twice the pixels it keeps, so the input
tensors are practically unchanged, while decoding a 400 px JPEG for a 32 px model costs a fraction of a full
decode: on a CPU, decoding is what bounds a tiny model's training speed.
"""

import os
import sys

from pipeline.images import open_rgb
from pipeline.models import register


def use_draft_decoding(side: int) -> None:
    """Make webdataset's ``pilrgb`` decoder (what open_clip_train uses) decode JPEGs at reduced scale."""
    from webdataset.autodecode import ImageHandler

    full = ImageHandler.__call__

    def decode(self, key, data):
        if self.imagespec != "pilrgb" or not key.lower().endswith(("jpg", "jpeg")):
            return full(self, key, data)
        return open_rgb(data, side)

    ImageHandler.__call__ = decode


if __name__ == "__main__":
    register()
    if os.environ.get("WINNOW_DRAFT_SIDE"):
        use_draft_decoding(int(os.environ["WINNOW_DRAFT_SIDE"]))
    from open_clip_train.main import main

    main(sys.argv[1:])
