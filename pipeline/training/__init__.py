"""The training process: open_clip_train with Winnow's configs, seeds, atomic checkpoints and Patch Mixing."""
