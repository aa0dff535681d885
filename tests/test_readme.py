"""The README's demo figures are the recorded output of `make demo` with today's demo settings: the block between
its markers is exactly what `make readme-figures` renders from `benchmarks/results/demo.json`."""

import json
from dataclasses import asdict

from winnow.workflows import readme
from winnow.workflows.settings import demo_config_path, load


def test_the_readme_block_is_rendered_from_the_recorded_demo_figures():
    recorded = json.loads(readme.RECORDED.read_text())
    text = (readme.ROOT / "README.md").read_text()
    start, end = text.index(readme.BEGIN), text.index(readme.END) + len(readme.END)
    assert text[start:end] == readme.block(recorded)


def test_the_recorded_figures_come_from_the_current_demo_settings():

    recorded = json.loads(readme.RECORDED.read_text())
    assert recorded["settings"] == readme.settings(asdict(load(str(demo_config_path()))))
    assert [c["subset"] for c in recorded["comparison"]][0] == recorded["baseline"] == "no_filter"
