"""Training examples for instruction tuning, rendered by the component the tuned model will serve.

Every example is ``(prompt, answer)``: the prompt is what ``LLMNER.request`` sends for the sentence (instructions,
label list, retrieved demonstrations, the sentence, the format's cue), the answer is the gold entities in the
component's output format followed by its stop sequence. Prompts come from the same ``PromptBuilder``, the same
retriever and the same format objects as at inference, so training and inference cannot drift apart.

Regularisation (IF-WRANER tunes with demonstrations in the prompt and guards against the model learning one label
set or one prompt by heart; our choices, all per example, all seeded):

* ``demo_dropout``: each retrieved demonstration is dropped with this probability, so the model sees 0..k of them
  and learns to answer with fewer (and cannot lean on copying one near-duplicate);
* ``random_demo``: with this probability one demonstration is swapped for a random pool sentence, as retrieval
  sometimes returns an unhelpful neighbour;
* ``shuffle_labels``: the label list is shown in a random order, so no label is learned by its position;
* ``rename_labels``: with this probability (and at least one demonstration shown) every label is renamed to an
  opaque name (``type_a`` …) in the list, the demonstrations and the answer alike: the model must read the
  labels the prompt defines and the demonstrations use instead of recalling a domain's names;
* ``lowercase``: with this probability the sentence, its demonstrations and the answer are lower-cased (search
  queries, chat and ASR text carry no capitals; the model must not find entities by their capital letters);
* ``demo_counts``: when set, each example shows a number of demonstrations drawn from this list (the most similar
  ones), before ``demo_dropout``: one model then serves zero-shot prompts, short fast prompts and k = 8 alike.

Label-set levers (issue 26: label sets the model never saw), each a probability per example, 0 = off (and then no
random draw is made, so configs without them render exactly the examples they rendered before):

* ``label_subset``: the label list is a random part of the dataset's labels (each kept with p = 0.5, at least one);
  entities of the others leave the demonstrations and the answer, so the model learns to answer only what is asked;
* ``absent_labels``: one to three labels of the other datasets join the list (never in the answer): a label in the
  list is no promise that the sentence holds one;
* ``paraphrase_labels``: every label with a paraphrase in ``label_texts.json`` is shown as one of them (list,
  demonstrations and answer alike; not together with ``rename_labels``'s opaque names);
* ``definitions``: the label list carries each label's one-line definition from ``label_texts.json`` (under any
  name it is shown by), as a user's ``label_definitions`` would.
"""

import json
import random
import string
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..labels import LabelSet
from ..labels.scheme import prompt_name
from ..prompt import Demonstration, PromptBuilder, display


@dataclass
class TuningExample:
    prompt: str
    answer: str  # the completion: formatted gold entities + the stop sequence
    dataset: str = ""


@dataclass
class Regularisation:
    demo_dropout: float = 0.3
    random_demo: float = 0.15
    shuffle_labels: float = 0.5
    rename_labels: float = 0.1
    lowercase: float = 0.0
    demo_counts: Optional[Tuple[int, ...]] = None
    label_subset: float = 0.0
    absent_labels: float = 0.0
    paraphrase_labels: float = 0.0
    definitions: float = 0.0

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "demo_counts":
                if value is not None and (not value or any(int(n) != n or n < 0 for n in value)):
                    raise ValueError(f"finetune: regularisation.demo_counts must list counts >= 0, not {value}")
            elif not 0.0 <= value <= 1.0:
                raise ValueError(f"finetune: regularisation.{f.name} must be a probability in [0, 1], not {value}")


@lru_cache(maxsize=1)
def label_texts() -> Dict[str, Dict]:
    """lower-case label name → {"paraphrases": [...], "definition": "..."} (``label_texts.json``, the project's own)."""
    return json.loads((Path(__file__).with_name("label_texts.json")).read_text(encoding="utf8"))["labels"]


def neighbours(component, demonstrations: Sequence[Demonstration]) -> List[List[Demonstration]]:
    """For each pool sentence, the demonstrations the component would retrieve for it, itself excluded (it is in
    the pool). Needs the component's retriever pool built from ``demonstrations``."""
    retriever = component.retriever
    if retriever is None or retriever.pool is None:
        return [list(component.demonstrations) for _ in demonstrations]
    k = retriever.k
    found = retriever.retrieve([display(d.text).rstrip() for d in demonstrations], k=k + 1)
    out = []
    for demo, demos in zip(demonstrations, found):
        kept = [d for d in demos if d.text != demo.text]
        out.append(kept[len(kept) - k :] if k else [])  # prompt order: the most similar last
    return out


class ExampleBuilder:
    """Renders ``TuningExample``s for one dataset through a configured ``llm_lar_ner`` component (its labels set
    and, with a retriever, its pool built from the dataset's sentences)."""

    def __init__(
        self,
        component,
        regularisation: Optional[Regularisation] = None,
        seed: int = 0,
        other_labels: Sequence[str] = (),
    ):
        """``other_labels``: the labels of the other datasets (``absent_labels`` draws from them)."""
        self.component = component
        self.other_labels = sorted(set(other_labels))
        self.reg = regularisation or Regularisation(0.0, 0.0, 0.0, 0.0)
        if self.reg.demo_counts and component.retriever is not None:
            component.retriever.k = max(component.retriever.k, *self.reg.demo_counts)  # neighbours to draw from
        self.rng = random.Random(seed)

    def build(
        self, demonstrations: Sequence[Demonstration], pool: Sequence[Demonstration] = (), dataset: str = ""
    ) -> List[TuningExample]:
        """Examples for these sentences; ``pool``: the retrieval pool (random demonstrations come from it)."""
        shown = neighbours(self.component, demonstrations)
        return [self.example(d, demos, pool or demonstrations, dataset) for d, demos in zip(demonstrations, shown)]

    def example(
        self, gold: Demonstration, demos: Sequence[Demonstration], pool: Sequence[Demonstration] = (), dataset: str = ""
    ) -> TuningExample:
        comp, reg, rng = self.component, self.reg, self.rng
        if reg.demo_counts:
            n = rng.choice(reg.demo_counts)
            demos = list(demos)[len(demos) - n :] if n else []  # the n most similar (prompt order: most similar last)
        demos = [d for d in demos if rng.random() >= reg.demo_dropout]
        if demos and pool and rng.random() < reg.random_demo:
            demos[rng.randrange(len(demos))] = rng.choice([p for p in pool if p.text != gold.text] or list(pool))
        labels = comp.label_set
        order = list(labels.labels)
        if rng.random() < reg.shuffle_labels:
            rng.shuffle(order)
        rename = {}
        if demos and rng.random() < reg.rename_labels:
            codes = [f"type_{c}" for c in string.ascii_lowercase]
            rng.shuffle(codes)
            rename = {label: code for label, code in zip(labels.labels, codes)}
        texts = label_texts()
        if reg.label_subset and len(order) > 1 and rng.random() < reg.label_subset:
            order = [label for label in order if rng.random() < 0.5] or [rng.choice(order)]
        absent = []
        if reg.absent_labels and not rename and rng.random() < reg.absent_labels:
            taken = {label.lower() for label in labels.labels}
            candidates = [label for label in self.other_labels if label.lower() not in taken]
            absent = rng.sample(candidates, min(len(candidates), rng.randint(1, 3)))
        if reg.paraphrase_labels and not rename and rng.random() < reg.paraphrase_labels:
            rename = {k: rng.choice(texts[k.lower()]["paraphrases"]) for k in order if k.lower() in texts}
            names = [prompt_name(rename.get(k, k)).lower() for k in [*order, *absent]]
            if len(set(names)) < len(names):  # two labels would be shown by one name: keep their own names
                rename = {}
        definitions = dict(labels.definitions)
        if reg.definitions and rng.random() < reg.definitions:
            definitions = {
                k: texts[k.lower()]["definition"] for k in [*order, *absent] if k.lower() in texts
            } | definitions
        if order != labels.labels or rename or absent or definitions != labels.definitions:
            for label in absent:
                order.insert(rng.randint(0, len(order)), label)
            shown = {rename.get(k, k): v for k, v in definitions.items() if k in order}
            labels = LabelSet([rename.get(label, label) for label in order], shown)
            kept = set(order) - set(absent)
            demos = [self._relabel(d, rename, comp.label_set, kept) for d in demos]
            gold = self._relabel(gold, rename, comp.label_set, kept)
        if rng.random() < reg.lowercase:
            gold, demos = _lower(gold), [_lower(d) for d in demos]
        prompts = PromptBuilder(labels, comp.format, comp.prompts.instructions)
        shown = display(gold.text).rstrip()
        spans = [
            (s, e, labels.prompt_names[t])
            for s, e, lab in gold.spans
            if e <= len(shown) and (t := labels.resolve(lab)) is not None
        ]
        answer = comp.format.render(shown, spans) + comp.format.stop[0]
        return TuningExample(prompts.build(shown, demos), answer, dataset)

    @staticmethod
    def _relabel(demo: Demonstration, rename, labels: LabelSet, kept=None) -> Demonstration:
        """The demonstration's spans under their new names; those of labels not ``kept`` (None: all) dropped."""
        spans = []
        for s, e, lab in demo.spans:
            target = labels.resolve(lab)
            if target is not None and (kept is None or target in kept):
                spans.append((s, e, rename.get(target, target)))
        return Demonstration(demo.text, spans)


def _lower(demo: Demonstration) -> Demonstration:
    """The demonstration lower-cased, its offsets kept (unchanged where lower-casing would change a length)."""
    lowered = demo.text.lower()
    return Demonstration(lowered, demo.spans) if len(lowered) == len(demo.text) else demo
