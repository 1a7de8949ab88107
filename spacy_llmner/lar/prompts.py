"""The LAR prompts: typing (the one-pass prompt with its answer begun at the span) and yes/no verification."""

import random
import re
from typing import Dict, List, Sequence, Tuple

from ..prompt import Demonstration, display

# Contextual calibration (Zhao et al. 2021): tiny models prefer some labels (and "yes") whatever the span; the
# same question about a content-free span measures that prior, and scores are taken relative to it.
CONTENT_FREE = "N/A"
VERIFY_OPTIONS = (" yes", " no")


def typing_context(prompt: str, span_text: str) -> str:
    """The one-pass lines prompt with its answer begun at the span."""
    return f"{prompt}{display(span_text).strip()} |"


def typing_options(names: Sequence[str]) -> Tuple[str, ...]:
    # No trailing newline: a one-token label then needs no logits of its own (the span's row serves all such
    # labels), and full-vocabulary logits rows are what scoring costs on a 262k-token model.
    return tuple(f" {n}" for n in names)


def verification_examples(demos: Sequence[Demonstration], names: Dict[str, str], k: int, seed: int) -> str:
    """Yes/no questions from demonstrations: a gold span with its label (yes), with another label (no), and a
    word outside every entity (no)."""
    rng = random.Random(seed)
    lines: List[str] = []
    labels = list(names.values())
    for demo in reversed(demos):  # most similar last in prompt order: take those first
        spans = [(s, e, names[lab]) for s, e, lab in demo.spans if lab in names]
        if not spans or len(lines) >= k:
            continue
        s, e, name = rng.choice(spans)
        other = [n for n in labels if n != name]
        text = display(demo.text).strip()
        lines.append(f'Sentence: {text}\nIs "{text[s:e]}" a {name}? yes\n\n')
        if other:
            lines.append(f'Sentence: {text}\nIs "{text[s:e]}" a {rng.choice(other)}? no\n\n')
        # and a word outside every entity: "no" whatever the label
        inside = [(a, b) for a, b, _ in demo.spans]
        words = [m for m in re.finditer(r"[A-Za-z]{3,}", text) if not any(a <= m.start() < b for a, b in inside)]
        if words:
            lines.append(f'Sentence: {text}\nIs "{rng.choice(words).group()}" a {name}? no\n\n')
    return "".join(lines)


def verification_context(examples: str, text: str, span_text: str, name: str) -> str:
    return f'{examples}Sentence: {display(text).strip()}\nIs "{display(span_text).strip()}" a {name}?'
