"""``python -m pipeline.train_entry ARGS``: OpenCLIP's own trainer, with Winnow's tiny configs registered.

open_clip_train has no flag for extra model configs, so this registers them and then hands the arguments to
``open_clip_train.main.main`` unchanged.
"""

import sys

from pipeline.models import register

if __name__ == "__main__":
    register()
    from open_clip_train.main import main

    main(sys.argv[1:])
