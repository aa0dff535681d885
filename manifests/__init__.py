"""Data only: run configs and subset recipes (YAML), shipped with the package so `winnow` finds them."""
