"""``winnow datasheet``: a data card for a pool or a subset, in Markdown and HTML, from what the runs recorded.

Its sections follow "Datasheets for Datasets" (Gebru et al., 2021): motivation, composition, collection,
preprocessing, uses, distribution, maintenance. Everything Winnow knows is filled in from the folders' records
(the ingest manifest and ledger, the subset's rules, the dedup run, the embed detectors): sources and dates, the
software version and configuration, counts per ledger state (``opted_out``, ``blocked``, ``nsfw``...), personal
data in captions, faces detected and blurred, each rule's drops, duplicates and evaluation-set copies removed,
the opt-out policy, and what the checks cannot catch. What only the dataset's authors know (why it was made, who
funded it, its intended uses, its licence) is left as marked questions to answer before publishing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pandas as pd

from winnow.pipeline.core import fsio
from winnow.pipeline.core.errors import UserError
from winnow.pipeline.data.ledger import STATES
from winnow.pipeline.data.manifest import read_manifest
from winnow.pipeline.data.pool import ledger
from winnow.workflows import html as h

ASK = "_to be answered by the dataset's authors_"
LIMITS = [
    "Opt-outs are read when the pool is downloaded: a site that opts out later is not removed by this pool's "
    "records; a robots.txt is read once per site and run.",
    "Face detection (OpenCV's frontal-face cascade) misses faces in profile, small (under 20 px), occluded or "
    "turned far from the camera; blurring lowers the exposure of faces, it does not remove it.",
    "The NSFW detector (NudeNet) scores nudity, not violence, gore, hate symbols or other harmful content; the "
    "caption word list misses euphemisms, other languages and misspellings.",
    "Personal data in captions is found by patterns for e-mail addresses, phone, IP and card numbers only; "
    "names, street addresses and other identifying text are not found.",
    "Hash blocklists find only the images their lists name (PDQ: also close copies); they are as complete as "
    "the lists given.",
    "Captions are alt-text from the web: they can be wrong, offensive or copyrighted text.",
]


@dataclass
class Sheet:
    title: str
    sections: list[tuple[str, list]] = field(default_factory=list)  # (heading, [str paragraph | (label, value)])

    def add(self, heading: str, *items) -> None:
        self.sections.append((heading, list(items)))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for heading, items in self.sections:
            out += [f"## {heading}", ""]
            for item in items:
                if isinstance(item, tuple):
                    out.append(f"- **{item[0]}**: {item[1]}")
                elif isinstance(item, pd.DataFrame):
                    out += ["", _md_table(item), ""]
                elif isinstance(item, list):
                    out += ["", *(f"- {x}" for x in item), ""]
                else:
                    out += ["", item, ""]
            out.append("")
        return "\n".join(out).replace("\n\n\n", "\n\n")

    def html(self) -> str:
        sections = []
        for i, (heading, items) in enumerate(self.sections):
            parts, rows = [], []
            for item in items + [None]:
                if isinstance(item, tuple):
                    rows.append((item[0], str(item[1]).replace(ASK, "(to be answered by the dataset's authors)")))
                    continue
                if rows:
                    parts.append(h.table(pd.DataFrame(rows, columns=["", "value"])))
                    rows = []
                if isinstance(item, pd.DataFrame):
                    parts.append(h.table(item))
                elif isinstance(item, list):
                    parts.append("<ul>" + "".join(f"<li>{h.esc(x)}</li>" for x in item) + "</ul>")
                elif isinstance(item, str):
                    parts.append(h.note(h.esc(item).replace(h.esc(ASK), "<em>to be answered by the dataset's "
                                                                            "authors</em>")))
            sections.append((f"s{i}", heading, "\n".join(parts)))
        return h.page(self.title, "A data card after <em>Datasheets for Datasets</em> (Gebru et al., 2021), "
                                  "written by <code>winnow datasheet</code> from the runs' records.", sections)


def _md_table(df: pd.DataFrame) -> str:
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def build(path: str) -> Sheet:
    """The data card of ``path``: a subset folder (``subset.json``) or a pool folder."""
    subset_doc = fsio.read_json(fsio.join(path, "subset.json")) if fsio.exists(fsio.join(path, "subset.json")) \
        else None
    pool = subset_doc["pool"] if subset_doc else path
    pool_doc = read_manifest(pool)
    if pool_doc is None and subset_doc is None:
        raise UserError(f"{path} is neither a subset (no subset.json) nor a finished pool (no _manifest.json); "
                        "pass the output folder of `winnow subset` or `winnow ingest`")
    counts, total = ledger(pool)
    params = (pool_doc or {}).get("params") or {}
    name = subset_doc["recipe"] if subset_doc else os.path.basename(str(pool).rstrip("/"))
    sheet = Sheet(f"Datasheet: {name}")
    sheet.add("Motivation", ("Why it was created", ASK), ("Who created it, and who funded it", ASK))
    kept = subset_doc["kept"] if subset_doc else counts.get("ok", 0)
    sheet.add("Composition",
              ("Instances", f"{kept:,} image-text pairs (images as JPEG in WebDataset tars, captions, a parquet "
                            "row each)"),
              ("Candidate pool", f"{total if total is not None else sum(counts.values()):,} input rows of "
                                 f"{(pool_doc or {}).get('source', 'an existing pool')}"),
              ("Labels", "none: captions are the sites' alt-text"),
              *_personal(pool_doc), *_faces(pool, pool_doc),
              "Every input row ends in one state (the ledger); only state ok rows can be in the dataset:",
              ledger_table(counts))
    sheet.add("Collection process", *_collection(pool_doc, params))
    sheet.add("Preprocessing, cleaning, filtering", *_filtering(subset_doc, pool))
    sheet.add("Uses", ("Intended uses", ASK), ("Uses to avoid", ASK),
              "Known limitations of the cleaning:", LIMITS)
    sheet.add("Distribution", ("Licence and terms", ASK),
              ("Form", "WebDataset tars with a parquet per shard (DataComp's layout); uids as 128-bit hex"))
    sheet.add("Maintenance", ("Maintainer and contact", ASK),
              ("Opt-out requests after publication", ASK + " (a listed image can be removed with ingest.blocklists "
                                                          "and a rerun)"))
    return sheet


def ledger_table(counts: dict[str, int]) -> pd.DataFrame:
    total = sum(counts.values())
    rows = [(state, counts[state], f"{counts[state] / total:.1%}", STATES.get(state, ""))
            for state in [*STATES, *sorted(set(counts) - set(STATES))] if counts.get(state)]
    return pd.DataFrame(rows, columns=["state", "rows", "share", "meaning"])


def _personal(doc: dict | None) -> list:
    personal = dict((doc or {}).get("personal_data") or {})
    if not personal:
        return []
    how = ((doc or {}).get("params") or {}).get("personal_data", "mask")
    kinds = ", ".join(f"{k} {v:,}" for k, v in personal.items() if k != "captions")
    done = {"mask": "masked ([email], [phone], ...)", "flag": "flagged in caption_pii, kept",
            "keep": "kept"}.get(how, how)
    return [("Personal data in captions", f"{personal.get('captions', 0):,} captions ({kinds or 'none'}): {done}")]


def _faces(pool: str, doc: dict | None) -> list:
    out = []
    blurred = (doc or {}).get("faces") or {}
    if blurred:
        out.append(("Faces blurred at download", f"{blurred.get('faces_blurred', 0):,} faces in "
                                                 f"{blurred.get('images_with_faces_blurred', 0):,} images"))
    base = fsio.join(pool, "embeddings")
    for tag in sorted(fsio.listdir(base)) if fsio.exists(base) else []:
        rows = (read_manifest(fsio.join(base, tag)) or {}).get("rows") or {}
        if "faces" in rows:
            out.append((f"Faces detected (embed {tag})", f"{rows['faces']:,} faces in {rows['images_with_faces']:,} "
                                                         "images; blur them with `winnow reshard --blur-faces`"))
        if "nsfw_over_half" in rows:
            out.append((f"NSFW detector (embed {tag})", f"{rows['nsfw_over_half']:,} images score above 0.5"))
    return out


def _collection(doc: dict | None, params: dict) -> list:
    if not doc:
        return ["The pool was not downloaded by Winnow (registered from an existing folder): how it was collected "
                "is not recorded here.", ("How it was collected", ASK)]
    sites = doc.get("sites") or {}
    agent = params.get("user_agent") or (f"Mozilla/5.0 (compatible; {params.get('user_agent_token', 'winnow')}/"
                                         f"{doc.get('code_version', '').split('+')[0]}"
                                         + (f"; +{params['contact_url']}" if params.get("contact_url") else "") + ")")
    lists = params.get("blocklists") or []
    return [
        ("Source", f"the URL list {doc.get('source', '?')}"),
        ("Downloaded", f"{doc.get('started', '?')} to {doc.get('finished', '?')}"),
        ("Software", f"Winnow {doc.get('code_version', '?')} (img2dataset's downloader, Winnow's fetcher)"),
        ("User-Agent", agent),
        ("robots.txt", "obeyed (RFC 9309: a 4xx answer allows all, 5xx or 429 disallows all, no answer leaves "
                       "the site unrequested)" if params.get("robots_txt", True) else "not read"),
        ("Sites' robots.txt", ", ".join(f"{k.removeprefix('robots_')} {v:,}" for k, v in sorted(sites.items())
                                        if k.startswith("robots_")) or "none recorded"),
        ("TDMRep", "obeyed (tdmrep.json and the tdm-reservation header)" if params.get("tdmrep", True)
         else "not read"),
        ("X-Robots-Tag", ", ".join(params.get("disallowed_header_directives") or []) or "not read"),
        ("Politeness", f"at most {params.get('host_concurrency', '?')} requests at once per host and process, "
                       f"{params.get('host_interval', 0):g} s between requests to a host (raised to a site's "
                       f"Crawl-delay up to {params.get('max_crawl_delay', 0):g} s)"),
        ("Hash blocklists", f"{len(lists)} list(s), PDQ within {params.get('pdq_threshold', 31)} bits; "
                            "entries not shown" if lists else "none"),
        ("Limits per URL", f"{params.get('deadline', '?')} s, {params.get('max_bytes', 0):,} bytes, "
                           f"{params.get('max_pixels', 0):,} pixels; private and metadata addresses refused"),
    ]


def _filtering(subset_doc: dict | None, pool: str) -> list:
    if subset_doc is None:
        return ["This is the downloaded pool itself: no filter was applied beyond the ledger's states."]
    steps = subset_doc.get("steps") or []
    rows, before = [], None
    for step in steps:
        rows.append((step["rule"][:140], f"{step['kept']:,}", "" if before is None else f"{before - step['kept']:,}"))
        before = step["kept"]
    out = [("Recipe", f"{subset_doc['recipe']}: {' '.join(str(subset_doc.get('description') or '').split())}"),
           "Each rule in order, the rows it kept and dropped:",
           pd.DataFrame(rows, columns=["rule", "kept", "dropped"])]
    for step in steps:
        if "duplicates.parquet" in step["rule"]:
            folder = os.path.dirname(step["rule"].rsplit("(", 1)[-1].rstrip(")"))
            doc = read_manifest(folder) or {}
            dropped = doc.get("dropped") or {}
            if dropped:
                out.append(("Deduplication", ", ".join(f"{k} {v:,}" for k, v in dropped.items()
                                                        if "@" not in k) + f" (of {doc['rows'].get('images', 0):,} "
                                                                           "images; each group keeps one)"))
                where = (doc.get("params") or {}).get("decontaminate") or []
                out.append(("Decontamination", f"{dropped.get('contaminated', 0):,} copies of evaluation images "
                                                f"({', '.join(map(str, where)) or 'no evaluation set given'})"))
    return out


def write(path: str, out: str | None = None) -> tuple[str, str]:
    """Write ``datasheet.md`` and ``datasheet.html`` into ``out`` (default: ``path`` itself)."""
    sheet = build(path)
    out = out or path
    md, page = fsio.join(out, "datasheet.md"), fsio.join(out, "datasheet.html")
    fsio.write_bytes(md, sheet.markdown().encode())
    fsio.write_bytes(page, sheet.html().encode())
    return md, page
