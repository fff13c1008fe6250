"""The browser marks the latents of the task circuit `saelab eval DICT --task T` stored beside
the dictionary, and links their pages and the index to the eval report.

The dictionary reconstructs blocks.2's residual of zoo:tasks-4l-v2 exactly (relu latents
+-q for an orthonormal q: its error node is zero), q the principal directions of the
counterfactual's change there, so a few latents carry the task: the smallest circuit with
faithfulness >= 0.8 is a few latents, and most latents are not in it."""

import json
import os
import re
from pathlib import Path

import pytest
import torch

from saelab.browse import build_site, top_contexts
from saelab.browse.card import circuit_marks
from saelab.cli.app import main
from saelab.models import load_model
from saelab.sae import SAE, WEIGHTS_FILE, SAEConfig
from saelab.tasks import draw_distinct, tokenize

MODEL, HOOK, D = "zoo:tasks-4l-v2", "blocks.2.hook_resid_post", 128


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """(dictionary directory, its eval.json) after `saelab eval DICT --task ioi`."""
    model = load_model(MODEL)
    tok = tokenize(draw_distinct("ioi", 48, 0), model.tokenizer)
    change = model.activations(tok.cf, [HOOK])[HOOK] - model.activations(tok.pos, [HOOK])[HOOK]
    q = torch.linalg.svd(change.flatten(0, 1), full_matrices=True).Vh.T  # columns: directions
    sae = SAE(SAEConfig(d_in=D, n_latents=2 * D, k=0, allocator="relu", hook=HOOK, model=MODEL))
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([q.T, -q.T]))
        sae.W_dec.copy_(torch.cat([q.T, -q.T]))
    path = sae.eval().save(tmp_path_factory.mktemp("c") / "dictionary")
    try:
        main(["eval", str(path), "--task", "ioi", "--tokens", "256"])
    except SystemExit as e:
        assert e.code == 0
    return path, json.loads((path / "eval.json").read_text())


def test_eval_stores_the_circuits_nodes(evaluated):
    path, report = evaluated
    c = report["circuit"]
    nodes = c["circuit_nodes"]
    assert c["nodes_to_08"] is not None and len(nodes) == c["nodes_to_08"] < c["nodes"]
    mags = [abs(s) for _, s in nodes]
    assert mags == sorted(mags, reverse=True) and mags[0] > 0
    assert all(re.fullmatch(rf"{re.escape(HOOK)}/(\d+|error)", n) for n, _ in nodes)
    assert "its nodes" in (path / "eval.md").read_text()


def test_site_marks_and_links_circuit_latents(evaluated, tmp_path):
    path, report = evaluated
    nodes = [n for n, _ in report["circuit"]["circuit_nodes"]]
    ids = [int(n.rsplit("/", 1)[1]) for n in nodes if not n.endswith("error")]
    first, other = ids[0], next(j for j in range(2 * D) if j not in ids)
    site = tmp_path / "site"
    build_site(path, site, tokens=2048, latents=[first, other], progress=False)
    folder = next(p for p in site.iterdir() if p.is_dir())
    page = (folder / f"{first}.html").read_text()
    rank = nodes.index(f"{HOOK}/{first}") + 1
    assert f"in the ioi circuit: node {rank} of {len(nodes)}" in page
    href = re.search(r'class="circuit">.*?<a href="([^"]+)">eval report', page)[1]
    assert Path(os.path.normpath(folder / href)) == (path / "eval.md").resolve()
    assert 'class="circuit"' not in (folder / f"{other}.html").read_text()
    index = (site / "index.html").read_text()
    assert index.count('class="circ"') == 1 and f"ioi #{rank}" in index
    note = re.search(r'class="circuitnote">.*?<a href="([^"]+)">', index)
    assert "1 of these latents" in note[0]
    assert Path(os.path.normpath(site / note[1])) == (path / "eval.md").resolve()


def test_notebook_card_links_the_report(evaluated):
    path, report = evaluated
    name, score = report["circuit"]["circuit_nodes"][0]
    card = top_contexts(path, int(name.rsplit("/", 1)[1]), tokens=1024, progress=False)
    assert (card.circuit.rank, card.circuit.score, card.circuit.task) == (1, score, "ioi")
    assert f'href="{(path / "eval.md").resolve()}"' in card._repr_html_()


def test_marks_ignore_a_stale_or_missing_report(evaluated, tmp_path):
    path, _ = evaluated
    assert circuit_marks(path)
    assert circuit_marks(tmp_path) == {}
    weights = path / WEIGHTS_FILE
    stamp = (path / "eval.json").stat().st_mtime
    os.utime(weights, (stamp + 10, stamp + 10))  # retrained after the eval
    assert circuit_marks(path) == {}
