"""`build_site`: the static feature browser of one dictionary or one run of several.

Layout of the output directory (open index.html from disk; nothing is fetched):

    index.html               every latent of every dictionary, a section per hook
    HOOK/LATENT.html         one page per latent
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

from saelab import __version__
from saelab.browse import html
from saelab.browse.card import EVAL_MD, build_cards, circuit_marks, probe_labels
from saelab.browse.collect import collect, find_dictionaries, load_dictionaries
from saelab.browse.stats import StatsConfig
from saelab.checks import check_device, check_field_types, check_number, doc_field
from saelab.data.tokens import TokenData
from saelab.errors import SaelabError
from saelab.storage.files import check_output_dir, write_text

INDEX = "index.html"


def parse_latents(spec: str | None) -> list[int] | None:
    """'0-99,512' -> [0..99, 512] (sorted, unique); None or 'all' -> None (every latent)."""
    if spec is None or spec.strip() == "all":
        return None
    out: set[int] = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m[2] is not None and int(m[2]) < int(m[1])):
            raise SaelabError(f"bad latent spec {spec!r}: use ids and ranges like 0-99,512 (or all)")
        out.update(range(int(m[1]), int(m[2] or m[1]) + 1))
    return sorted(out)


@dataclass(frozen=True)
class BrowseConfig:
    """`saelab browse`: `build_site`'s settings as specs (each documented once: `saelab browse
    --help` shows the same text); `top_k` and `samples` are the StatsConfig the site keeps."""

    tokens: int = doc_field(262_144, "Held-out tokens to gather contexts from (whole rows until "
                            "at least this many).")
    latents: str | None = doc_field(None, "Latents to include, e.g. 0-99,512.", "all")
    out: str | None = doc_field(None, "Output directory for the site.", "DICTIONARY/browse",
                                path=True)
    data: str | None = doc_field(None, "Token data whose held-out split is read: builtin:stdlib, "
                                 "a .txt/.jsonl file or directory, or hf:NAME.",
                                 "the dictionary's training data")
    model: str | None = doc_field(None, "Model spec.", "the one cfg.json names")
    top_k: int = doc_field(StatsConfig.top_k, "Top-activating contexts per latent.")
    samples: int = doc_field(StatsConfig.samples, "Sampled activations per latent, shown split "
                             "at their quantiles.")
    batch_rows: int = doc_field(32, "Rows per forward pass.")
    device: str = doc_field("cpu", "Torch device.")
    overwrite: bool = doc_field(False, "Allow writing into a non-empty --out directory.")

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("tokens", "top_k", "samples", "batch_rows"):
            check_number(name, getattr(self, name), 1)
        check_device(self.device)

    def out_dir(self, dictionary: str | Path) -> Path:
        """Where the site goes: `out`, else the dictionary's `browse` folder."""
        return Path(self.out) if self.out else Path(dictionary) / "browse"

    def settings(self) -> dict:
        """`build_site`'s keywords (all but where the site goes)."""
        return {"tokens": self.tokens, "latents": self.latents, "data": self.data,
                "model": self.model, "cfg": StatsConfig(top_k=self.top_k, samples=self.samples),
                "batch_rows": self.batch_rows, "device": self.device, "overwrite": self.overwrite}


def section_dir(name: str) -> str:
    """A file-system-safe directory name for a dictionary's section."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def build_site(
    dictionary: str | Path,
    out: str | Path,
    tokens: int = BrowseConfig.tokens,
    latents: str | list[int] | None = None,
    data: TokenData | str | None = None,
    model: str | None = None,
    cfg: StatsConfig | None = None,
    batch_rows: int = BrowseConfig.batch_rows,
    device: str = BrowseConfig.device,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write the browser for `dictionary` (a dictionary directory, or a run directory with one
    per hook) into `out`, from `tokens` held-out tokens; returns a summary.

    Args:
        latents: which latents get statistics and pages: a spec ('0-99,512') or a list; None: all.
        data: data spec or `TokenData` whose held-out split is read (default: the one cfg.json
            names, else builtin:stdlib; rows of its context length).
        model: model spec (default: the one the dictionaries' cfg.json names).
        cfg: contexts kept per latent (default `StatsConfig()`).
    """
    if tokens < 1 or batch_rows < 1:
        raise SaelabError(f"tokens and batch_rows must be positive, got {tokens} and {batch_rows}")
    wanted = parse_latents(latents) if isinstance(latents, str) or latents is None else sorted(set(latents))
    paths = find_dictionaries(dictionary)
    out = check_output_dir(Path(out), overwrite)
    start = time.perf_counter()
    dicts, hooked, token_data = load_dictionaries([str(p) for p in paths], wanted, cfg or StatsConfig(),
                                                  model, data, device)
    for d in dicts:  # a file where a section's folder goes: refused before the long pass
        check_output_dir(out / section_dir(d.name), overwrite=True)
    seen = collect(dicts, hooked, token_data, tokens, batch_rows, progress)
    seconds = time.perf_counter() - start

    sections, pages = [], 0
    for d, path in zip(dicts, paths, strict=True):
        folder = section_dir(d.name)
        (out / folder).mkdir(parents=True, exist_ok=True)
        labels, marks = probe_labels(path), circuit_marks(path)
        cards = [replace(c, label=labels.get(c.latent), circuit=marks.get(c.latent))
                 for c in build_cards(d.stats, d.sae, hooked)]
        report = path / EVAL_MD  # what a circuit mark links to, relative so the site can move
        page_report, index_report = (os.path.relpath(report, out / folder), os.path.relpath(report, out))
        present = set(d.stats.latents)

        def href(j: int, present: set = present) -> str | None:
            """A neighbour's page, beside this one, when the site has it."""
            return f"{j}.html" if j in present else None

        for card in cards:
            write_text(out / folder / f"{card.latent}.html",
                       html.latent_page(card, f"../{INDEX}", href, page_report))
            pages += 1
        c = d.sae.cfg
        meta = {"allocator": c.allocator, "latents": f"{c.n_latents:,}", "k": c.k, "d_in": c.d_in,
                "shown": f"{len(cards):,}", "dead": sum(card.dead for card in cards)}

        def page(j: int, folder: str = folder) -> str:
            return f"{folder}/{j}.html"

        sections.append(html.index_section(d.name, cards, page, meta, index_report))
    meta = {"model": hooked.spec, "data": f"{token_data.spec} ({token_data.split})",
            "tokens": f"{seen:,}", "dictionary": str(dictionary), "saelab": __version__}
    write_text(out / INDEX, html.index_page("saelab feature browser", sections, meta))
    return {"site": str(out / INDEX), "dictionaries": [d.name for d in dicts], "tokens": seen,
            "pages": pages, "pass_seconds": round(seconds, 2),
            "tokens_per_s": round(seen / max(seconds, 1e-9)),
            "total_seconds": round(time.perf_counter() - start, 2)}
