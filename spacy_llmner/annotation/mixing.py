"""Label mixing (arXiv 2404.01334, Mixup-inspired): where the reference labels and an LLM's labels disagree, the
training target is a convex combination of the two, not either one alone.

What is mixed. A doc's *reference* labels are its ``doc.ents`` (``refine``'s merge of human and LLM labels), or
with ``reference_key = "refine_human"`` the human labels as they were before any merge.
Its *LLM* labels are ``doc.spans[llm_key]`` (``refine`` writes them to ``refine_llm``, confidences in
``attrs["scores"]``). LLM spans that are not exactly a reference entity are grouped with every reference entity
they overlap (connected components of overlap). Each group g has two versions: the reference's (its reference
entities; "O" where there are none) and the LLM's (its LLM spans). By default only groups where the reference
has no entity are mixed (the LLM proposes an entity where the human said "O": the omissions this is for);
``conflicts = true`` also mixes LLM spans that contradict a reference entity's type or boundaries (human labels
are usually the more reliable there). Human labels that the LLM left out are never mixed away: an LLM's silence
is no evidence against a human label.

With which weights. The soft target of group g is ``(1 - p_g) · reference + p_g · LLM`` with
``p_g = llm_weight · mean over the group's LLM spans of b(label) [· confidence, with use_confidence]``.
``llm_weight`` is Mixup's λ (fixed, 0.5 by default: the two annotators count alike).

How class imbalance enters. LLM labels are class-imbalanced: an LLM over-produces some types and under-produces
others. ``b(label) = min(1, share_ref(label) / share_llm(label))`` (add-one smoothed shares of all entities in the
corpus): a type the LLM proposes more often than the reference labels use it has its LLM votes shrunk by that
ratio; a type it under-produces keeps its full weight. ``balance = false`` sets b = 1.

How spaCy trains on it. spaCy's NER learns from hard labels, so the soft target is realised by sampling: the
``spacy_llmner.LabelMixing.v1`` corpus reader draws every group's version afresh each time it is read (the LLM's
with probability p_g). Read once per epoch (``[training] max_epochs = -1``, spaCy's streaming mode), the expected
training target of each token is exactly the mixed distribution, with no change to spaCy's NER model or loss.
(The alternative, a soft-target token classifier, would replace spaCy's transition-based NER and its fast CPU
inference: sampling keeps the student an ordinary spaCy pipeline.)
"""

import random
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from spacy.tokens import Doc, DocBin, Span
from spacy.util import filter_spans, registry

from ..corpora import unannotated
from .refine import overlaps, predicted_spans


@dataclass(frozen=True)
class MixSettings:
    llm_weight: float = 0.5
    balance: bool = True
    use_confidence: bool = False
    conflicts: bool = False
    llm_key: str = "refine_llm"
    reference_key: Optional[str] = None

    def __post_init__(self):
        if not 0.0 <= self.llm_weight <= 1.0:
            raise ValueError(f"mix: llm_weight is a probability in [0, 1], not {self.llm_weight}")


def label_counts(docs: Iterable[Doc], key: Optional[str] = None) -> Counter:
    """Entities per label: ``doc.ents``, or ``doc.spans[key]``."""
    return Counter(s.label_ for d in docs for s in (d.spans[key] if key else d.ents))


def balance_factors(reference: Counter, llm: Counter) -> Dict[str, float]:
    """b(label) = min(1, share_ref / share_llm), add-one smoothed over the labels either side uses."""
    labels = set(reference) | set(llm)
    n_ref, n_llm = sum(reference.values()) + len(labels), sum(llm.values()) + len(labels)
    return {lab: min(1.0, ((reference[lab] + 1) / n_ref) / ((llm[lab] + 1) / n_llm)) for lab in labels}


def groups(reference: Sequence[Span], llm: Sequence[Span], conflicts: bool = True) -> List[Tuple[List[int], List[int]]]:
    """Disagreement groups: (indices into ``llm``, indices into ``reference``) per connected component of overlap,
    seeded by the LLM spans that are not exactly a reference entity (with ``conflicts = False``: only those that
    overlap no reference entity)."""
    ref_keys = {(r.start, r.end, r.label_) for r in reference}
    seeds = [
        i
        for i, s in enumerate(llm)
        if (s.start, s.end, s.label_) not in ref_keys and (conflicts or not any(overlaps(s, r) for r in reference))
    ]
    parent = {("l", i): ("l", i) for i in seeds}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i in seeds:
        for j, r in enumerate(reference):
            if overlaps(llm[i], r):
                parent.setdefault(("r", j), ("r", j))
                parent[find(("r", j))] = find(("l", i))
        for i2 in seeds:
            if i2 > i and overlaps(llm[i], llm[i2]):
                parent[find(("l", i2))] = find(("l", i))
    comps: Dict[tuple, Tuple[List[int], List[int]]] = {}
    for node in parent:
        side, idx = node
        comps.setdefault(find(node), ([], []))[0 if side == "l" else 1].append(idx)
    return [(sorted(ls), sorted(rs)) for ls, rs in comps.values()]


def mix_docs(docs: Sequence[Doc], settings: MixSettings = MixSettings()) -> Tuple[List[Doc], Dict[str, Dict]]:
    """Marks each doc's disagreement groups for the mixing reader: ``doc.spans["mix_llm"]`` (the LLM version of
    every group; ``attrs["group"]``, ``attrs["p"]``) and ``doc.spans["mix_reference"]`` (the reference entities
    in a group; ``attrs["group"]``). ``doc.ents`` stays the reference. Returns the docs (changed in place) and
    per-label entity counts: ``reference``, ``llm`` and ``expected`` (the mixed target's expectation)."""
    for doc in docs:
        if settings.llm_key not in doc.spans:
            raise ValueError(
                f"mix: a doc has no doc.spans[{settings.llm_key!r}] (the LLM's labels); run `spacy-llmner refine` "
                f"first, or name the group that holds them with --llm-key. Doc: {doc.text[:60]!r}"
            )
    if settings.reference_key:
        for doc in docs:
            if settings.reference_key not in doc.spans:
                raise ValueError(f"mix: a doc has no doc.spans[{settings.reference_key!r}]: {doc.text[:60]!r}")
            doc.set_ents(filter_spans(doc.spans[settings.reference_key]), default="outside")
    ref_counts = label_counts(docs)
    llm_counts = label_counts(docs, settings.llm_key)
    factor = balance_factors(ref_counts, llm_counts) if settings.balance else {}
    expected: Counter = Counter({k: float(v) for k, v in ref_counts.items()})
    n_groups = 0
    for doc in docs:
        llm, scores = predicted_spans(doc, settings.llm_key)
        reference = list(doc.ents)
        mix_llm, mix_ref = [], []
        p_attr, g_llm, g_ref = [], [], []
        for g, (li, ri) in enumerate(groups(reference, llm, settings.conflicts)):
            version = filter_spans([llm[i] for i in li])
            weights = [
                factor.get(llm[i].label_, 1.0) * (scores[i] if settings.use_confidence and scores[i] is not None else 1)
                for i in li
            ]
            p = settings.llm_weight * sum(weights) / len(weights)
            for s in version:
                mix_llm.append(Span(doc, s.start, s.end, label=s.label_))
                p_attr.append(p)
                g_llm.append(g)
                expected[s.label_] += p
            for i in ri:
                mix_ref.append(Span(doc, reference[i].start, reference[i].end, label=reference[i].label_))
                g_ref.append(g)
                expected[reference[i].label_] -= p
            n_groups += 1
        doc.spans["mix_llm"] = mix_llm
        doc.spans["mix_llm"].attrs["group"] = g_llm
        doc.spans["mix_llm"].attrs["p"] = p_attr
        doc.spans["mix_reference"] = mix_ref
        doc.spans["mix_reference"].attrs["group"] = g_ref
    stats = {
        "reference": dict(sorted(ref_counts.items())),
        "llm": dict(sorted(llm_counts.items())),
        "expected": {k: round(v, 2) for k, v in sorted(expected.items())},
        "balance_factor": {k: round(v, 3) for k, v in sorted(factor.items())},
        "groups": n_groups,
    }
    return list(docs), stats


def sample(doc: Doc, rng: random.Random, force: Optional[bool] = None) -> Doc:
    """One draw of the mixed labels: a copy of ``doc`` whose ``doc.ents`` take each group's LLM version with the
    group's probability (``force``: always the LLM's (True) or always the reference's (False)). Tokens without
    annotation stay without, unless an LLM version covers them."""
    if "mix_llm" not in doc.spans or not len(doc.spans["mix_llm"]):
        return doc  # nothing to mix: the reference as it is
    out = unannotated(doc)
    llm, ref = doc.spans["mix_llm"], doc.spans["mix_reference"]
    p_of = dict(zip(llm.attrs["group"], llm.attrs["p"]))
    take = {g for g, p in p_of.items() if (force if force is not None else rng.random() < p)}
    dropped = {(s.start, s.end, s.label_) for s, g in zip(ref, ref.attrs.get("group", [])) if g in take}
    ents = [Span(out, e.start, e.end, label=e.label_) for e in doc.ents if (e.start, e.end, e.label_) not in dropped]
    ents += [Span(out, s.start, s.end, label=s.label_) for s, g in zip(llm, llm.attrs.get("group", [])) if g in take]
    ents = filter_spans(ents)
    covered = {i for e in ents for i in range(e.start, e.end)}
    missing = [Span(out, t.i, t.i + 1) for t in doc if t.ent_iob == 0 and t.i not in covered]
    out.set_ents(ents, missing=missing, default="outside")
    return out


@registry.readers("spacy_llmner.LabelMixing.v1")
def mixing_reader(path: str, silver: Optional[str] = None, seed: int = 0, shuffle: bool = True):
    """A training corpus that samples label mixing's soft target afresh on every read (see the module docstring):
    use it with ``[training] max_epochs = -1`` so that spaCy reads it once per epoch. The first read (spaCy's
    ``initialize``) shows both versions of every group, so that every label either side uses is known to the model.

    path (str): a DocBin written by ``spacy-llmner mix``.
    silver (Optional[str]): a DocBin of LLM-annotated docs added as they are (``spacy-llmner pre-annotate``).
    seed (int): seeds the draws (read n uses seed + n).
    shuffle (bool): shuffle the examples of each read (spaCy does not shuffle a streamed corpus).
    """
    from spacy.training import Example

    reads = [0]

    def read(nlp) -> Iterator[Example]:
        docs = list(DocBin().from_disk(path).get_docs(nlp.vocab))
        extra = list(DocBin().from_disk(silver).get_docs(nlp.vocab)) if silver else []
        rng = random.Random(seed + reads[0])
        if reads[0] == 0:
            drawn = [sample(d, rng, force=False) for d in docs]
            drawn += [sample(d, rng, force=True) for d in docs if len(d.spans.get("mix_llm", []))]
        else:
            drawn = [sample(d, rng) for d in docs]
        reads[0] += 1
        drawn += extra
        if shuffle:
            rng.shuffle(drawn)
        for ref in drawn:
            yield Example(nlp.make_doc(ref.text), ref)

    return read
