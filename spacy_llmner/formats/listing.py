"""List formats: the answer names each mention and its label, without rewriting the sentence.

``lines`` (``United Russia | politicalparty`` per line; measured best for tiny unguided models) and ``json``
(``[{"text": "United Russia", "label": "politicalparty"}]``). Their grammars allow only mentions that are runs of
input tokens and labels from the label set, so the answer is short and always parseable. A ``lines`` mention
that starts with a bullet-like character (``- * •``) or a backslash is written after a backslash, so that a
model's list bullets can be told from the text; ``json`` quotes with JSON's own escapes.
"""

import json
import re
from typing import List, Sequence, Tuple

from ..ty import Mention, ParsedAnswer
from . import gbnf


class LinesFormat:
    name = "lines"
    inline = False
    cue = "Entities:\n"
    lead = ""
    stop: Tuple[str, ...] = ("\n\n",)
    empty = "none"

    _bullets = "-*•\\"

    def escape_first(self, mention: str) -> str:
        return "\\" + mention if mention[:1] and mention[0] in self._bullets else mention

    def render(self, text: str, spans: Sequence[Tuple[int, int, str]]) -> str:
        lines = [f"{self.escape_first(text[s:e])} | {label}" for s, e, label in sorted(set(spans))]
        return "\n".join(lines) if lines else self.empty

    def parse(self, answer: str) -> ParsedAnswer:
        parsed = ParsedAnswer()
        end = 0
        for raw in answer.split("\n\n", 1)[0].splitlines(keepends=True):
            start, end = end, end + len(raw)
            line = raw.strip()
            # "\\- x" is the mention "- x"; an unescaped leading "- " is a list bullet
            line = line[1:] if line.startswith("\\") else line.lstrip("-*• ").strip()
            if not line or line.lower() == self.empty:
                continue
            text, sep, label = line.rpartition("|")
            if not sep or not text.strip() or not label.strip():
                parsed.malformed += 1
                continue
            parsed.mentions.append(
                Mention(text.strip(), label.strip(), answer_range=(start, start + len(raw.rstrip())))
            )
        return parsed

    def grammar(self, text: str, token_offsets: Sequence[Tuple[int, int]], labels: Sequence[str]) -> str:
        _, tokens, gaps = gbnf.pieces(text, token_offsets)
        rules = [
            f'root ::= ({gbnf.literal(self.empty)} | line ("\\n" line)*) "\\n\\n"',
            'line ::= mention " | " label',
            "label ::= " + gbnf.alternatives(labels),
        ]
        return "\n".join(rules + gbnf.mention_rules(tokens, gaps, first=self.escape_first)) + "\n"


_PAIR = re.compile(r'"text"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"label"\s*:\s*"((?:[^"\\]|\\.)*)"')


def _unescape(s: str) -> str:
    try:
        return json.loads(f'"{s}"')
    except ValueError:
        return s


class JSONFormat:
    name = "json"
    inline = False
    cue = "Entities:"
    stop: Tuple[str, ...] = ("\n",)
    lead = " "  # see inline.py: the answer, not the prompt, carries the space

    def render(self, text: str, spans: Sequence[Tuple[int, int, str]]) -> str:
        items = [{"text": text[s:e], "label": label} for s, e, label in sorted(set(spans))]
        return self.lead + json.dumps(items, ensure_ascii=False)

    def parse(self, answer: str) -> ParsedAnswer:
        parsed = ParsedAnswer()
        start = answer.find("[")
        end = answer.rfind("]")
        try:
            if not 0 <= start < end:
                raise ValueError("no JSON list")
            items: List = json.loads(answer[start : end + 1])
            if not isinstance(items, list):
                raise ValueError("not a list")
        except ValueError:
            # Truncated or slightly broken JSON: read the well-formed pairs it contains.
            items = [{"text": _unescape(t), "label": _unescape(lab)} for t, lab in _PAIR.findall(answer)]
        for item in items:
            if isinstance(item, dict) and isinstance(item.get("text"), str) and isinstance(item.get("label"), str):
                if item["text"].strip() and item["label"].strip():
                    parsed.mentions.append(Mention(item["text"].strip(), item["label"].strip()))
                    continue
            parsed.malformed += 1
        return parsed

    def grammar(self, text: str, token_offsets: Sequence[Tuple[int, int]], labels: Sequence[str]) -> str:
        _, tokens, gaps = gbnf.pieces(text, token_offsets)
        esc = lambda s: json.dumps(s, ensure_ascii=False)[1:-1]  # noqa: E731
        rules = [
            'root ::= " [" (item (", " item)*)? "]" "\\n"',
            'item ::= "{\\"text\\": \\"" mention "\\", \\"label\\": \\"" label "\\"}"',
            "label ::= " + gbnf.alternatives([esc(lab) for lab in labels]),
        ]
        return "\n".join(rules + gbnf.mention_rules(tokens, gaps, escape=esc)) + "\n"
