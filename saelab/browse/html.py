"""HTML for the feature browser: self-contained pages (inline CSS, JS and SVG; nothing fetched).

Every piece of text from data (tokens are arbitrary bytes or code) goes through `esc`.
Token shading: the latent's activation over its maximum on the whole window, in 9 levels.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable

from saelab.browse.card import Context, LatentCard

LEVELS = 9
_VISIBLE = {"\n": "↵", "\t": "⇥", "\r": "␍"}

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.2em 2em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.4em}h3{font-size:1em;margin:1em 0 .3em}
a{color:#0645ad}.muted{color:#777}
.ctx{font:13px/1.9 ui-monospace,Menlo,Consolas,monospace;white-space:pre;overflow-x:auto;
 border-bottom:1px solid #eee}
.ctx .v{display:inline-block;width:5.5em;color:#555;text-align:right;margin-right:.8em}
.ctx span{border-radius:2px}
.ctx .mx{outline:2px solid #c00;font-weight:bold}
""" + "".join(
    f".s{i}{{background:rgba(255,120,0,{0.85 * i / LEVELS:.2f})}}" for i in range(1, LEVELS + 1)
) + """
.kv td{padding:0 1em 0 0}.tok{font-family:ui-monospace,monospace;background:#f3f3f3;padding:0 .25em}
.cols{display:flex;gap:3em;flex-wrap:wrap}
table.lat{border-collapse:collapse}table.lat td,table.lat th{padding:2px 8px;border-bottom:1px solid #eee;
 text-align:left;vertical-align:top}table.lat th{cursor:pointer;user-select:none;background:#fafafa}
table.lat td.n{text-align:right;font-variant-numeric:tabular-nums}
table.lat td.snip{font-family:ui-monospace,monospace;white-space:pre}
tr.dead td{color:#999}.controls{margin:.6em 0}.controls *{margin-right:.8em}
.circ{color:#7a3ea0;font-size:.85em;white-space:nowrap}
"""

INDEX_JS = """
function applyFilter(){
  const q=document.getElementById('q').value.trim().toLowerCase();
  const show=document.getElementById('show').value;
  const minD=parseFloat(document.getElementById('mind').value)||0;
  const byId=/^#?\\d+$/.test(q)?q.replace('#',''):null;
  let shown=0;
  for(const tr of document.querySelectorAll('tr.lat')){
    const d=parseFloat(tr.dataset.density);
    let ok=!(show==='alive'&&d===0)&&!(show==='dead'&&d>0)&&d>=minD;
    if(ok&&q)ok=byId!==null?tr.dataset.id===byId:tr.dataset.tokens.includes(q);
    tr.hidden=!ok;if(ok)shown++;
  }
  document.getElementById('count').textContent=shown+' shown';
}
function sortBy(th){
  const table=th.closest('table'),col=th.cellIndex,body=table.tBodies[0];
  const asc=th.dataset.dir!=='asc';th.dataset.dir=asc?'asc':'desc';
  const key=tr=>{const c=tr.cells[col];return c.dataset.v!==undefined?parseFloat(c.dataset.v):c.textContent};
  const rows=Array.from(body.rows);
  rows.sort((a,b)=>{const x=key(a),y=key(b);return (x<y?-1:x>y?1:0)*(asc?1:-1)});
  body.append(...rows);
}
document.addEventListener('DOMContentLoaded',()=>{
  for(const id of ['q','show','mind'])for(const ev of ['input','change'])
    document.getElementById(id).addEventListener(ev,applyFilter);
  for(const th of document.querySelectorAll('table.lat th'))th.addEventListener('click',()=>sortBy(th));
  applyFilter();
});
"""


def esc(s: object) -> str:
    return html.escape(str(s), quote=True)


def show_token(t: str) -> str:
    """Whitespace and control characters made visible (escaped for HTML)."""
    out = "".join(_VISIBLE.get(ch, f"\\x{ord(ch):02x}" if ord(ch) < 32 or ord(ch) == 127 else ch)
                  for ch in t)
    return esc(out)


def quoted(t: str) -> str:
    """A token on its own, spaces shown as '·'."""
    return f'<span class="tok">{show_token(t).replace(" ", "·")}</span>'


def fmt(v: float) -> str:
    return f"{v:.3g}" if v == 0 or 1e-3 <= abs(v) < 1e4 else f"{v:.2e}"


def _hover(c: Context, start: int, stop: int) -> str:
    """A piece's tooltip: its activation; for a character over several byte tokens, each
    byte's escape and activation."""
    acts = c.acts[start:stop]
    if stop - start == 1:
        return fmt(acts[0]) if acts[0] > 0 else ""
    if max(acts) <= 0 and not start <= c.center < stop:
        return ""
    return " · ".join(f"{c.tokens[i]}: {fmt(c.acts[i])}" for i in range(start, stop))


def context_html(c: Context, vmax: float) -> str:
    """One context: pieces (`Context.shown`: a character's byte tokens as one) shaded by their
    largest activation / vmax (the value on hover), the one holding the chosen token outlined;
    inactive pieces are plain text, which keeps pages small."""
    parts = []
    for p in c.shown():
        a = max(c.acts[p.start:p.stop])
        level = min(LEVELS, math.ceil(LEVELS * a / vmax)) if a > 0 and vmax > 0 else 0
        cls = ([f"s{level}"] if level else []) + (["mx"] if p.start <= c.center < p.stop else [])
        hover = _hover(c, p.start, p.stop)
        title = f' title="{esc(hover)}"' if hover else ""
        text = show_token(p.text)
        parts.append(f'<span class="{" ".join(cls)}"{title}>{text}</span>' if cls or title else text)
    return (f'<div class="ctx" data-act="{c.activation!r}" data-pos="{c.position}">'
            f'<span class="v">{fmt(c.activation)}</span>{"".join(parts)}</div>')


def histogram_svg(bars: list[tuple[float, float, int]], w: int = 360, h: int = 110) -> str:
    if not bars:
        return '<p class="muted">no activations</p>'
    top = max(c for _, _, c in bars) or 1
    bw = w / len(bars)
    rects = "".join(
        f'<rect x="{i * bw:.1f}" y="{h - h * c / top:.1f}" width="{bw - 1:.1f}" height="{h * c / top:.1f}" '
        f'fill="#e8811e"><title>{fmt(lo)}–{fmt(hi)}: {c}</title></rect>'
        for i, (lo, hi, c) in enumerate(bars))
    return (f'<svg class="hist" width="{w}" height="{h + 30}" viewBox="0 0 {w} {h + 30}" '
            f'xmlns="http://www.w3.org/2000/svg">{rects}'
            f'<line x1="0" y1="{h}" x2="{w}" y2="{h}" stroke="#444"/>'
            f'<text x="0" y="{h + 16}" font-size="11">0</text>'
            f'<text x="{w}" y="{h + 16}" font-size="11" text-anchor="end">{fmt(bars[-1][1])}</text>'
            f'<text x="{w / 2}" y="{h + 28}" font-size="11" text-anchor="middle">activation '
            f'(tallest bar: {top:,} tokens)</text></svg>')


def _effects(title: str, rows: list[tuple[str, float]]) -> str:
    body = "".join(f"<tr><td>{quoted(t)}</td><td>{v:+.3f}</td></tr>" for t, v in rows)
    return f'<div><h3>{title}</h3><table class="kv effects">{body}</table></div>'


def _label_row(card: LatentCard) -> str:
    """The best-matching exact label (from `saelab eval --probes`), when there is one."""
    if card.label is None:
        return ""
    name, f1 = card.label
    return (f'<tr><td>best label</td><td class="label">{esc(name)} (F1 {f1:.2f}: firing as a '
            f'predictor of the label)</td></tr>')


def _circuit_row(card: LatentCard, report_href: str | None) -> str:
    """Its place in the task circuit `saelab eval --task` found, linking the eval report."""
    c = card.circuit
    if c is None:
        return ""
    href = report_href or c.report
    return (f'<tr><td>circuit</td><td class="circuit">in the {esc(c.task)} circuit: node {c.rank} '
            f'of {c.size} ({esc(c.method)} score {c.score:+.3f}; the smallest circuit with '
            f'faithfulness &ge; 0.8, CPR {c.cpr:.3f}) &middot; <a href="{esc(href)}">eval report</a>'
            '</td></tr>')


def circuit_badge(card: LatentCard) -> str:
    """A short mark for the index: the task whose circuit holds the latent, and its rank."""
    c = card.circuit
    if c is None:
        return ""
    return (f' <span class="circ" title="node {c.rank} of {c.size} in the {esc(c.task)} circuit">'
            f'&#9670; {esc(c.task)} #{c.rank}</span>')


def card_html(card: LatentCard, link: Callable[[int], str | None] | None = None,
              report_href: str | None = None) -> str:
    """The latent's card; `link(latent)` gives the href of a neighbour's page (None: no link),
    `report_href` the eval report's (default: its path on disk)."""
    head = (f'<h2>Latent {card.latent} <span class="muted">{esc(card.hook)}</span></h2>'
            f'<table class="kv"><tr><td>density</td><td class="density">{card.density:.4%} '
            f'({card.count:,} of {card.window:,} tokens)</td></tr>'
            f'<tr><td>max activation</td><td class="max">{fmt(card.max)}</td></tr>'
            f'<tr><td>mean nonzero activation</td><td>{fmt(card.mean)}</td></tr>{_label_row(card)}'
            f'{_circuit_row(card, report_href)}</table>')
    if card.dead:
        body = f'<p class="deadnote"><b>Dead</b>: never active over these {card.window:,} tokens.</p>'
    else:
        top = "".join(context_html(c, card.max) for c in card.top)
        bands = "".join(
            f'<h3>{esc(label)}</h3><div class="band">{"".join(context_html(c, card.max) for c in cs)}</div>'
            for label, cs in reversed(card.bands) if cs)
        body = (f'<h3>Nonzero activations</h3>{histogram_svg(card.histogram)}'
                f'<h3>Top contexts</h3><div class="top">{top}</div>'
                f'<h3>Samples across its activations</h3><p class="muted">a uniform random sample '
                f'of its activations, split at the sample\'s quantiles</p>{bands}')
    if card.promoted is None or card.suppressed is None:  # both set or neither (card.py)
        effects = f'<p class="muted">Next-token effects: {esc(card.effect_note)}.</p>'
    else:
        effects = (f'<div class="cols">{_effects("Promotes", card.promoted)}'
                   f'{_effects("Suppresses", card.suppressed)}</div>'
                   f'<p class="muted">Logit effect: {esc(card.effect_note)}.</p>')
    nb = []
    for j, cos in card.neighbours:
        href = link(j) if link else None
        name = f'<a href="{esc(href)}">{j}</a>' if href else str(j)
        nb.append(f"<tr><td>{name}</td><td>{cos:.3f}</td></tr>")
    neighbours = ('<h3>Nearest latents (decoder cosine)</h3>'
                  f'<table class="kv neighbours">{"".join(nb)}</table>')
    return f'<div class="card" id="latent-{card.latent}">{head}{body}{effects}{neighbours}</div>'


def notebook_html(body: str) -> str:
    return f"<div><style>{CSS}</style>{body}</div>"


def document(title: str, body: str, script: str = "") -> str:
    js = f"<script>{script}</script>" if script else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{CSS}</style>{js}</head><body>{body}</body></html>\n")


def latent_page(card: LatentCard, index_href: str, link: Callable[[int], str | None],
                report_href: str | None = None) -> str:
    nav = f'<p><a href="{esc(index_href)}">← all latents</a></p>'
    return document(f"Latent {card.latent} · {card.hook}", nav + card_html(card, link, report_href))


def index_row(card: LatentCard, href: str) -> str:
    tops = ", ".join(f"{quoted(t)}×{n}" for t, n in card.top_tokens())
    snippet = card.top[0].snippet() if card.top else ""
    # what the search box matches: top tokens and top-context snippets, as displayed
    search = " ".join([t for t, _ in card.top_tokens(20)] + [c.snippet() for c in card.top]).lower()
    return (f'<tr class="lat{" dead" if card.dead else ""}" data-id="{card.latent}" '
            f'data-density="{card.density!r}" data-tokens="{show_token(search)}">'
            f'<td data-v="{card.latent}"><a href="{esc(href)}">{card.latent}</a>{circuit_badge(card)}</td>'
            f'<td class="n" data-v="{card.density!r}">{"dead" if card.dead else f"{card.density:.3%}"}</td>'
            f'<td class="n" data-v="{card.max!r}">{fmt(card.max)}</td>'
            f'<td>{tops}</td><td class="snip">{show_token(snippet)}</td></tr>')


def _circuit_note(cards: list[LatentCard], report_href: str | None) -> str:
    """One line under a section whose latents include a task circuit's."""
    marks = sorted((card.circuit for card in cards if card.circuit is not None), key=lambda m: m.rank)
    if not marks:
        return ""
    c = marks[0]
    href = report_href or c.report
    return (f'<p class="circuitnote">&#9670; {len(marks)} of these latents are in the {esc(c.task)} '
            f'circuit ({esc(c.method)}; {c.size} nodes reach faithfulness &ge; 0.8, CPR {c.cpr:.3f}): '
            f'<a href="{esc(href)}">eval report</a></p>')


def index_section(name: str, cards: list[LatentCard], href: Callable[[int], str], meta: dict,
                  report_href: str | None = None) -> str:
    dead = [c.latent for c in cards if c.dead]
    facts = " · ".join(f"{esc(k)}: {esc(v)}" for k, v in meta.items())
    dead_list = ", ".join(f'<a href="{esc(href(j))}">{j}</a>' for j in dead) or "none"
    rows = "".join(index_row(c, href(c.latent)) for c in cards)
    return (f'<section data-hook="{esc(name)}"><h2>{esc(name)}</h2><p class="muted">{facts}</p>'
            f'{_circuit_note(cards, report_href)}'
            f'<p class="deadlist">Dead latents ({len(dead)} of {len(cards)}, never active over '
            f'{cards[0].window if cards else 0:,} tokens): {dead_list}</p>'
            f'<table class="lat"><thead><tr><th>latent</th><th>density</th><th>max act</th>'
            f'<th>top tokens</th><th>top context</th></tr></thead><tbody>{rows}</tbody></table></section>')


def index_page(title: str, sections: list[str], meta: dict) -> str:
    controls = ('<div class="controls"><input id="q" type="search" size="30" '
                'placeholder="latent id (12) or token text (self.)">'
                '<select id="show"><option value="all">all latents</option>'
                '<option value="alive">alive only</option><option value="dead">dead only</option></select>'
                '<label>min density <input id="mind" type="number" step="any" min="0" value="0" '
                'style="width:6em"></label><span id="count"></span></div>')
    facts = '<p class="muted">' + " · ".join(f"{esc(k)}: {esc(v)}" for k, v in meta.items()) + "</p>"
    return document(title, f"<h1>{esc(title)}</h1>{facts}{controls}{''.join(sections)}", INDEX_JS)
