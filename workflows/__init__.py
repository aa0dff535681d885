"""Thin entry points: parse arguments, load the config, call the library. No logic of their own."""
