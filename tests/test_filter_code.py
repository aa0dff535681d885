"""Filters as code: a new score filter over stored arrays is one small class; a filter defined in Python (a
script, a notebook) goes straight into a recipe; cached scores are recomputed when the filter's code or an input
``.npz`` changed, and reused otherwise."""

from __future__ import annotations

import importlib
import sys
import textwrap
from dataclasses import dataclass

import numpy as np
import pandas as pd

from winnow.filters import EmbeddingFilter, code_version
from winnow.pipeline.select.score import score


def metadata(folder, rows: int = 30) -> None:
    """A DataComp-shaped metadata folder of two files with b32 embeddings and a stored score array."""
    rng = np.random.default_rng(0)
    for j, stem in enumerate(["a" * 32, "b" * 32]):
        pd.DataFrame({"uid": [f"{j:016x}{i:016x}" for i in range(rows)], "text": ["a cat"] * rows}).to_parquet(
            folder / f"{stem}.parquet")
        v = rng.normal(size=(rows, 4)).astype(np.float16)
        np.savez(folder / f"{stem}.npz", b32_img=v, b32_txt=v[::-1], b32_aesthetic=np.arange(rows) / rows)


@dataclass
class ImageNorm(EmbeddingFilter):
    """A filter written by a user: the norm of the stored image embedding."""

    key = "image_norm"
    tag: str = "b32"

    def arrays(self):
        return ("img",)

    def score(self, part, embeddings):
        return pd.Series(np.linalg.norm(self.array(embeddings, "img", len(part)), axis=1), index=part.index)


def test_a_filter_defined_in_python_selects_through_the_api(tmp_path):
    import winnow

    metadata(tmp_path)
    with winnow.cluster(scheduler="sync"):
        kept = winnow.subset({"name": "norms", "filters": [ImageNorm(tag="b32")],
                              "select": [{"top_fraction": {"column": "image_norm_b32_score", "fraction": 0.5}}]},
                             pool=str(tmp_path), out=str(tmp_path / "out"), cache=str(tmp_path / "cache"))
    norms = np.concatenate([np.linalg.norm(np.load(tmp_path / f"{s}.npz")["b32_img"].astype(np.float32), axis=1)
                            for s in ("a" * 32, "b" * 32)])
    threshold = np.sort(norms)[::-1][30]  # DataComp's rule: the (n+1)-th largest of 60 rows at 0.5, ties kept
    assert len(kept) == int((norms >= threshold).sum()) == 31


def test_a_score_stored_beside_the_embeddings_is_a_filter(tmp_path):
    metadata(tmp_path)
    found = score(str(tmp_path), [{"key": "stored", "params": {"tag": "b32", "name": "aesthetic"}}], None,
                  cache=str(tmp_path / "cache"), log=lambda m: None)
    values = found.column("stored_b32_aesthetic_score", found.parts[0])
    assert np.allclose(values, np.arange(30) / 30)


def test_cached_scores_follow_the_filters_code_and_the_npz_files(tmp_path, monkeypatch):
    metadata(tmp_path)
    module = tmp_path / "mods" / "my_norm.py"
    module.parent.mkdir()

    def write(scale: float) -> type:
        module.write_text(textwrap.dedent(f"""
            from dataclasses import dataclass
            import numpy as np
            import pandas as pd
            from winnow.filters import EmbeddingFilter

            @dataclass
            class MyNorm(EmbeddingFilter):
                key = "my_norm"
                tag: str = "b32"

                def score(self, part, embeddings):
                    x = self.array(embeddings, "img", len(part))
                    return pd.Series({scale} * np.linalg.norm(x, axis=1), index=part.index)
            """))
        sys.modules.pop("my_norm", None)
        importlib.invalidate_caches()
        return importlib.import_module("my_norm").MyNorm

    monkeypatch.syspath_prepend(str(module.parent))
    said = []

    def run(cls):
        found = score(str(tmp_path), [{"key": "my_norm", "params": {}, "cls": cls}], None,
                      cache=str(tmp_path / "cache"), log=said.append)
        return found.column("my_norm_b32_score", found.parts[0]), found.folders["my_norm_b32_score"]

    first, folder = run(write(1.0))
    again, same = run(write(1.0))
    assert same == folder and np.array_equal(first, again)  # the same code: the cache is reused
    changed = write(2.0)
    doubled, other = run(changed)
    assert other != folder and np.allclose(doubled, 2 * first)  # other code: recomputed, in its own folder
    assert code_version(changed) != code_version(ImageNorm)
    with np.load(tmp_path / f"{'a' * 32}.npz") as z:  # another model's embeddings in one .npz
        arrays = {k: z[k] for k in z.files}
    arrays["b32_img"] = 3 * arrays["b32_img"]
    np.savez(tmp_path / f"{'a' * 32}.npz", **arrays)
    tripled, _ = run(changed)
    assert np.allclose(tripled, 3 * doubled, rtol=1e-2)  # the changed .npz is seen and scored again
