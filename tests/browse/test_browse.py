"""The feature browser end to end: site contents against an independent dense computation, in a
real headless Chromium (skipped with a reason when Debian's chromium is not installed), the
notebook card, several dictionaries of one run, escaping, and bad input."""

import html as htmlmod
from pathlib import Path

import pytest
import torch
from test_end_to_end import run_cli

from saelab.browse import build_site, top_contexts
from saelab.browse.card import Context, LatentCard
from saelab.browse.html import card_html, show_token
from saelab.data.activations import positions_to_keep
from saelab.data.heldout import heldout_rows
from saelab.data.tokens import TokenData
from saelab.sae import SAE, SAEConfig

HOOK = "blocks.1.hook_resid_post"
TOKENS = 2048
DEAD = 5  # a latent that can never fire
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _sae(hook=HOOK, d_in=128, n=64, k=4, seed=0) -> SAE:
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d_in, n_latents=n, k=k, hook=hook, model="zoo:pystdlib-4l"))
    with torch.no_grad():
        sae.W_dec.normal_()
        sae.normalize_decoder()
        sae.W_enc.copy_(sae.W_dec)
        sae.b_enc[DEAD] = -1e6
    return sae


def _dense_codes(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """Reference TopK codes, dense: relu of the k largest pre-activations per token."""
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    z = torch.zeros_like(pre)
    top = pre.topk(sae.cfg.k, dim=1)
    return z.scatter(1, top.indices, top.values.relu())


@pytest.fixture(scope="module")
def site(zoo_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("browse")
    sae = _sae()
    sae.save(root / "sae")
    summary = build_site(root / "sae", root / "site", tokens=TOKENS, model=zoo_model, progress=False)
    return root, sae, summary


@pytest.fixture(scope="module")
def reference(site, zoo_model):
    """Per latent: (max activation, its position, the token there, count), computed densely."""
    _, sae, _ = site
    tok = zoo_model.tokenizer
    rows = heldout_rows(tok, TokenData(split="heldout", context_length=128), TOKENS)
    keep = positions_to_keep(rows, tok)
    x = zoo_model.activations(rows, [HOOK])[HOOK]
    z = torch.zeros(*rows.shape, sae.cfg.n_latents)
    with torch.no_grad():
        z[keep] = _dense_codes(sae, x[keep])
    flat = z.flatten(0, 1)
    best = flat.max(0)
    return {"max": best.values, "pos": best.indices, "count": (flat > 0).sum(0),
            "token": rows.flatten()[best.indices], "tokens": int(keep.sum()), "tokenizer": tok}


def test_site_matches_dense_reference(site, reference):
    root, sae, summary = site
    assert summary["tokens"] == reference["tokens"]
    assert summary["pages"] == sae.cfg.n_latents
    page_dir = root / "site" / HOOK
    for j in (0, 7, 33):
        text = (page_dir / f"{j}.html").read_text()
        count = int(reference["count"][j])
        assert f"({count:,} of {reference['tokens']:,} tokens)" in text
        assert f'data-pos="{int(reference["pos"][j])}"' in text
    dead = (page_dir / f"{DEAD}.html").read_text()
    assert "never active over these" in dead
    assert 'class="deadlist">Dead latents (' in (root / "site" / "index.html").read_text()


def test_top_contexts_notebook(site, reference, zoo_model):
    _, sae, _ = site
    card = top_contexts(sae, 7, tokens=TOKENS, n=5, model=zoo_model, progress=False)
    assert card.top[0].activation == pytest.approx(reference["max"][7].item(), rel=1e-5)
    assert card.top[0].position == int(reference["pos"][7])
    acts = [c.activation for c in card.top]
    assert acts == sorted(acts, reverse=True) and len(acts) == 5
    rows = card.table
    assert rows[0]["kind"] == "top" and rows[0]["activation"] == card.top[0].activation
    assert {r["kind"] for r in rows[5:]} <= {label for label, _ in card.bands}
    centre = card.top[0].tokens[card.top[0].center]
    assert centre == reference["tokenizer"].decode([int(reference["token"][7])])
    page = card._repr_html_()
    assert "<style>" in page and f'data-pos="{card.top[0].position}"' in page


def test_escaping():
    nasty = ['<script>alert("x")</script>', "&amp;", "\n", "'"]
    ctx = Context(nasty, [0.0, 1.0, 2.0, 0.5], 2, 2.0, 9)
    card = LatentCard(latent=3, hook="h<b>", window=10, count=3, max=2.0, mean=1.0, histogram=[(0.0, 2.0, 3)],
                      top=[ctx], bands=[("quantile 0-100%", [ctx])], promoted=[("<i>", 1.0)],
                      suppressed=[('"', -1.0)], effect_note="<note>", neighbours=[(1, 0.5)])
    page = card_html(card, lambda j: f"{j}.html?a=<x>")
    assert "<script>" not in page and "<i>" not in page and "<note>" not in page and "h<b>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert show_token("\n") == "↵" and show_token("a\x01") == "a\\x01"


def test_run_directory_via_cli(tmp_path, monkeypatch, capsys):
    """Three dictionaries of one run (one per hook): one site, a section each, from the CLI."""
    run = tmp_path / "run"
    _sae(HOOK).save(run / HOOK)
    _sae("blocks.0.mlp.hook_post", d_in=512, seed=1).save(run / "blocks.0.mlp.hook_post")
    _sae("blocks.0.attn.hook_q", seed=2).save(run / "blocks.0.attn.hook_q")
    args = ["browse", str(run), "--tokens", "300", "--latents", "0-3", "--out", str(tmp_path / "site")]
    code, cap = run_cli(args, monkeypatch, capsys)
    assert code == 0, cap.err
    assert "tok/s" in cap.out and "latent pages" in cap.out
    for hook in (HOOK, "blocks.0.mlp.hook_post", "blocks.0.attn.hook_q"):
        assert hook in cap.out
    index = (tmp_path / "site" / "index.html").read_text()
    assert index.count("<section") == 3 and index.count('<tr class="lat') == 12
    assert "through the MLP&#x27;s W_out" in (tmp_path / "site/blocks.0.mlp.hook_post/0.html").read_text()
    assert "no linear path" in (tmp_path / "site/blocks.0.attn.hook_q/2.html").read_text()
    assert not (tmp_path / "site" / HOOK / "4.html").exists()


def test_mlp_effect_is_the_models_own_linear_map(zoo_model):
    """The MLP hook's output direction equals what the model writes to hook_mlp_out when the
    neuron activations move along the decoder row (measured by patching the model)."""
    from saelab.browse.collect import output_directions

    W_dec = torch.randn(3, 512)
    dirs = output_directions(zoo_model, "blocks.0.mlp.hook_post", W_dec)
    tokens = torch.tensor([[256, 10, 20, 30]])
    outs = {}

    def grab(name):
        def fn(x, hook):
            outs[name] = x.detach().clone()
        return fn

    for name, shift in (("base", None), ("moved", W_dec[1])):
        hooks = [("blocks.0.hook_mlp_out", grab(name))]
        if shift is not None:
            hooks.insert(0, ("blocks.0.mlp.hook_post", lambda x, hook, s=shift: x + s))
        zoo_model.model.run_with_hooks(tokens, fwd_hooks=hooks, return_type=None)
    torch.testing.assert_close(outs["moved"][0, 2] - outs["base"][0, 2], dirs[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("args, message", [
    (["--latents", "3-1"], "bad latent spec"),
    (["--latents", "999"], "latent 999 does not exist"),
    (["--tokens", "0"], "tokens must be >= 1, got 0"),
])
def test_cli_bad_input_writes_nothing(site, tmp_path, args, message, monkeypatch, capsys):
    root, _, _ = site
    out = tmp_path / "out"
    code, cap = run_cli(["browse", str(root / "sae"), "--out", str(out), *args], monkeypatch, capsys)
    assert code == 2 and message in cap.err and cap.err.count("\n") == 1
    assert not out.exists()


# --- in a real browser -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
        pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {DRIVER}); "
                    "apt-get install -y chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the dev extra)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--window-size=1200,1400",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def _visible_ids(driver) -> list[int]:
    return [int(tr.get_attribute("data-id")) for tr in driver.find_elements("css selector", "tr.lat")
            if tr.is_displayed()]


def test_index_in_browser(site, reference, browser, tmp_path):
    root, sae, _ = site
    browser.get((root / "site" / "index.html").as_uri())
    assert _visible_ids(browser) == list(range(sae.cfg.n_latents))
    box = browser.find_element("id", "q")
    box.send_keys("33")
    assert _visible_ids(browser) == [33]
    assert browser.find_element("id", "count").text == "1 shown"
    box.clear()
    box.send_keys("x")  # clear() fires no input event; typing does
    box.send_keys("\b")
    assert len(_visible_ids(browser)) == sae.cfg.n_latents

    # by token text: a piece of a latent's top context (as displayed) finds it, and every row
    # shown contains it (a digits-only query would be a latent id)
    snippet = browser.find_element("css selector", 'tr.lat[data-id="7"] td.snip').get_attribute("textContent")
    token = next(snippet[i - 3:i] for i in range(len(snippet), 2, -1)
                 if not snippet[i - 3:i].strip().lstrip("#").isdigit() and snippet[i - 3:i].strip())
    box.send_keys(token)
    shown = _visible_ids(browser)
    assert 7 in shown
    for tr in browser.find_elements("css selector", "tr.lat"):
        if tr.is_displayed():
            assert token.lower() in tr.get_attribute("data-tokens")
    box.clear()
    box.send_keys("x\b")

    from selenium.webdriver.support.select import Select

    Select(browser.find_element("id", "show")).select_by_value("dead")
    dead = set((reference["count"] == 0).nonzero().flatten().tolist())
    assert DEAD in dead and set(_visible_ids(browser)) == dead
    Select(browser.find_element("id", "show")).select_by_value("all")

    # sorting by max activation (descending on the second click)
    header = browser.find_elements("css selector", "table.lat th")[2]
    header.click()
    header.click()
    order = _visible_ids(browser)
    assert order[0] == int(reference["max"].argmax())
    browser.save_screenshot(str(tmp_path / "index.png"))
    assert (tmp_path / "index.png").stat().st_size > 10_000


def test_latent_page_in_browser(site, reference, browser, tmp_path):
    root, _, _ = site
    browser.get((root / "site" / "index.html").as_uri())
    browser.find_element("css selector", 'tr.lat[data-id="7"] a').click()
    assert browser.current_url.endswith(f"{HOOK}/7.html")
    first = browser.find_element("css selector", ".top .ctx")
    assert float(first.get_attribute("data-act")) == pytest.approx(reference["max"][7].item(), rel=1e-5)
    assert int(first.get_attribute("data-pos")) == int(reference["pos"][7])
    marked = first.find_element("css selector", ".mx")
    expected = htmlmod.unescape(show_token(reference["tokenizer"].decode([int(reference["token"][7])])))
    assert marked.get_attribute("textContent") == expected
    assert browser.find_element("css selector", "svg.hist").is_displayed()
    assert len(browser.find_elements("css selector", ".effects tr")) == 20
    # a neighbour link leads to that latent's page
    link = browser.find_element("css selector", ".neighbours a")
    target = link.text
    link.click()
    assert browser.find_element("css selector", ".card h2").text.startswith(f"Latent {target}")
    browser.back()
    browser.save_screenshot(str(tmp_path / "latent.png"))
    assert (tmp_path / "latent.png").stat().st_size > 10_000


@pytest.mark.parametrize("allocator", ["feature_choice", "mutual_choice", "relu", "jumprelu"])
def test_threshold_allocators(allocator, zoo_model):
    """Codes of the threshold-style allocators (variable width, unused slots) give the top
    context and firing count of the dense code over the same rows (topk and gradient_topk,
    which is topk at inference, are covered by the site tests above)."""
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=128, n_latents=64, k=4, allocator=allocator, hook=HOOK,
                        model="zoo:pystdlib-4l")).eval()
    if sae.cfg.has_thresholds:
        sae.threshold.fill_(0.5)
    tok = zoo_model.tokenizer
    rows = heldout_rows(tok, TokenData(split="heldout", context_length=128), 512)
    keep = positions_to_keep(rows, tok)
    with torch.no_grad():
        z = torch.zeros(*rows.shape, 64)
        z[keep] = sae.encode_dense(zoo_model.activations(rows, [HOOK])[HOOK][keep])
    flat = z.flatten(0, 1)
    j = int((flat > 0).sum(0).argmax())
    card = top_contexts(sae, j, tokens=512, n=3, model=zoo_model, progress=False)
    assert card.count == int((flat[:, j] > 0).sum()) > 0
    assert card.top[0].activation == pytest.approx(flat[:, j].max().item(), rel=1e-5)
    assert card.top[0].position == int(flat[:, j].argmax())


def test_transcoder_latents_read_the_input_and_write_the_target(zoo_model):
    """A transcoder's card: contexts and counts from its input hook's activations, promoted
    tokens from its decoder row at the target (hook_mlp_out: straight through the unembedding)."""
    src, target = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=128, n_latents=64, k=4, hook=src, target_hook=target, d_out=128, skip=True,
                        model="zoo:pystdlib-4l")).eval()
    tok = zoo_model.tokenizer
    rows = heldout_rows(tok, TokenData(split="heldout", context_length=128), 512)
    keep = positions_to_keep(rows, tok)
    with torch.no_grad():
        x = zoo_model.activations(rows, [src])[src][keep]
        pre = x @ sae.W_enc.T + sae.b_enc  # no b_dec on a transcoder's input
        top = pre.topk(4, dim=1)
        z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    j = int((z > 0).sum(0).argmax())
    card = top_contexts(sae, j, tokens=512, n=3, model=zoo_model, progress=False)
    assert card.hook == f"{src} -> {target}"
    assert card.count == int((z[:, j] > 0).sum()) > 0
    assert card.top[0].activation == pytest.approx(z[:, j].max().item(), rel=1e-5)
    logits = sae.W_dec[j].detach() @ zoo_model.model.W_U.float()
    assert [v for _, v in card.promoted[:3]] == pytest.approx(logits.topk(3).values.tolist(), rel=1e-4)
    lowest = (-logits).topk(3).values.neg().tolist()
    assert [v for _, v in card.suppressed[:3]] == pytest.approx(lowest, rel=1e-4)
