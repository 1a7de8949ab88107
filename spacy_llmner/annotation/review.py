"""A review page for refined docs: one self-contained HTML file (no network) that a person reads in a browser.

Per doc, displaCy's span view shows the human entities, the LLM's proposed additions ("+label 0.83") and its
conflicts with the human labels ("?label ≠ human"); a table counts human entities, additions and conflicts per
label; filters (docs with additions / with conflicts / one label; also from the address, ``page.html#conflicts``
or ``#label=person``) hide the other docs.
"""

import html
from collections import Counter
from typing import Dict, Optional, Sequence, Tuple

from spacy import displacy
from spacy.tokens import Doc, Span

from ..corpora import unannotated
from .refine import group, scored

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; max-width: 70em; }
.doc { border-top: 1px solid #ccc; padding: .5em 0; }
.doc[hidden] { display: none; }
.meta { color: #555; font-size: .85em; }
table { border-collapse: collapse; margin: .5em 0 1em; }
td, th { border: 1px solid #ccc; padding: .2em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
#shown { font-weight: bold; }
.details { font-size: .9em; margin: .2em 0; }
"""

_SCRIPT = """
const docs = Array.from(document.querySelectorAll('.doc'));
function apply() {
  const what = document.getElementById('what').value;
  const label = document.getElementById('label').value;
  let shown = 0;
  for (const d of docs) {
    let ok = true;
    if (what === 'additions') ok = +d.dataset.additions > 0;
    if (what === 'conflicts') ok = +d.dataset.conflicts > 0;
    if (label) ok = ok && d.dataset.labels.split(' ').includes(label);
    d.hidden = !ok;
    shown += ok ? 1 : 0;
  }
  document.getElementById('shown').textContent = shown + ' of ' + docs.length + ' docs shown';
}
function fromHash() {
  const h = decodeURIComponent(location.hash.slice(1));
  if (h === 'additions' || h === 'conflicts') document.getElementById('what').value = h;
  if (h.startsWith('label=')) document.getElementById('label').value = h.slice(6);
  apply();
}
document.getElementById('what').addEventListener('change', apply);
document.getElementById('label').addEventListener('change', apply);
window.addEventListener('hashchange', fromHash);
fromHash();
"""


def _fmt(score: Optional[float]) -> str:
    return "" if score is None else f" {score:.2f}"


HUMAN, ADDITION, CONFLICT = "#a6cee3", "#b2df8a", "#fdbf6f"


def review_doc(doc: Doc) -> Tuple[Doc, Dict[str, str]]:
    """A copy of a refined doc whose ``doc.spans["review"]`` holds what the page shows, and each label's colour."""
    out = unannotated(doc)
    spans, colors = [], {}
    for s in doc.spans["refine_human"] if "refine_human" in doc.spans else doc.ents:
        spans.append(Span(out, s.start, s.end, label=s.label_))
        colors[s.label_] = HUMAN
    for s, score in scored(group(doc, "refine_additions")):
        spans.append(Span(out, s.start, s.end, label=f"+{s.label_}{_fmt(score)}"))
        colors[spans[-1].label_] = ADDITION
    for s, score in scored(group(doc, "refine_conflicts")):
        spans.append(Span(out, s.start, s.end, label=f"?{s.label_}{_fmt(score)}"))
        colors[spans[-1].label_] = CONFLICT
    out.spans["review"] = spans
    return out, colors


def _details(doc: Doc) -> str:
    """The doc's proposals as a list: text, label, confidence; for conflicts also the human label(s)."""
    items = [
        f"<li>+ <b>{html.escape(s.text)}</b> → {html.escape(s.label_)}{_fmt(score)}</li>"
        for s, score in scored(group(doc, "refine_additions"))
    ]
    conf = group(doc, "refine_conflicts")
    for (s, score), human, kind in zip(scored(conf), conf.attrs.get("human", []), conf.attrs.get("kinds", [])):
        items.append(
            f"<li>? <b>{html.escape(s.text)}</b>: LLM {html.escape(s.label_)}{_fmt(score)}, human "
            f"{html.escape(human)} ({html.escape(kind)})</li>"
        )
    return f'<ul class="details">{"".join(items)}</ul>' if items else ""


def review_page(docs: Sequence[Doc], title: str = "spacy-llmner refine: review") -> str:
    """The HTML page for ``refine``'s output docs (see the module docstring)."""
    counts = {k: Counter() for k in ("human", "additions", "conflicts")}
    parts = []
    labels = set()
    for i, doc in enumerate(docs):
        human = doc.spans["refine_human"] if "refine_human" in doc.spans else doc.ents
        adds, conf = group(doc, "refine_additions"), group(doc, "refine_conflicts")
        doc_labels = {s.label_ for group in (human, adds, conf) for s in group}
        labels |= doc_labels
        counts["human"].update(s.label_ for s in human)
        counts["additions"].update(s.label_ for s in adds)
        counts["conflicts"].update(s.label_ for s in conf)
        shown, colors = review_doc(doc)
        body = displacy.render(shown, style="span", options={"spans_key": "review", "colors": colors}, page=False)
        parts.append(
            f'<div class="doc" id="doc-{i}" data-additions="{len(adds)}" data-conflicts="{len(conf)}" '
            f'data-labels="{html.escape(" ".join(sorted(doc_labels)))}">'
            f'<div class="meta">doc {i}: {len(human)} human, {len(adds)} additions, {len(conf)} conflicts</div>'
            f"{body}{_details(doc)}</div>"
        )
    rows = "".join(
        f"<tr><td>{html.escape(lab)}</td><td>{counts['human'][lab]}</td><td>{counts['additions'][lab]}</td>"
        f"<td>{counts['conflicts'][lab]}</td></tr>"
        for lab in sorted(labels)
    )
    total = (
        f"<tr><th>all</th><th>{sum(counts['human'].values())}</th><th>{sum(counts['additions'].values())}</th>"
        f"<th>{sum(counts['conflicts'].values())}</th></tr>"
    )
    options = "".join(f'<option value="{html.escape(lab)}">{html.escape(lab)}</option>' for lab in sorted(labels))
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f'<p><span style="background:{HUMAN}">label</span>: a human entity; '
        f'<span style="background:{ADDITION}">+label</span>: an entity the LLM proposes that the human labels '
        f'miss (with its confidence); <span style="background:{CONFLICT}">?label</span>: the LLM disagrees with '
        f"a human label (type or boundaries).</p>"
        f"<table><tr><th>label</th><th>human</th><th>additions</th><th>conflicts</th></tr>{rows}{total}</table>"
        f'<p>Show <select id="what"><option value="all">all docs</option><option value="additions">docs with '
        f'additions</option><option value="conflicts">docs with conflicts</option></select> '
        f'with label <select id="label"><option value="">any</option>{options}</select> '
        f'<span id="shown"></span></p>'
        f"{''.join(parts)}<script>{_SCRIPT}</script></body></html>"
    )
