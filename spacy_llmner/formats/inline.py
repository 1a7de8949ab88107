"""Inline formats (LLMs4NER): the answer rewrites the sentence with its entities marked in place.

``[United Russia|politicalparty]`` (bracket) and ``<politicalparty>United Russia</politicalparty>`` (XML). Both share
rendering (nested spans become nested markup) and a stack parser that returns each mention with its position in the
answer's plain text, so ``spans.locate`` can place it on the right occurrence. Their grammars force an exact copy of
the input with flat markup: the model can choose only where entities start and end and which label they get.

Text that contains the format's own syntax is escaped in the copy (``\\[ \\] \\| \\\\`` in bracket answers, ``&lt; &gt;
&amp;`` in XML answers), in demonstrations and grammars alike, so input text can never read as markup.
"""

import re
from typing import List, Sequence, Tuple

from ..ty import Mention, ParsedAnswer
from . import gbnf


def _nestable(spans: Sequence[Tuple[int, int, str]]) -> List[Tuple[int, int, str]]:
    """Spans sorted outer-first, without those that cross an already kept span (markup cannot express them)."""
    kept: List[Tuple[int, int, str]] = []
    for start, end, label in sorted(set(spans), key=lambda s: (s[0], -s[1], s[2])):
        if start >= end:
            continue
        if any(s < start < e < end or start < s < end < e for s, e, _ in kept):
            continue
        kept.append((start, end, label))
    return kept


class _InlineFormat:
    inline = True
    _specials: Tuple[Tuple[str, str], ...] = ()  # (character, how the answer writes it)
    stop: Tuple[str, ...] = ("\n",)
    # The space before the answer belongs to the answer: a prompt ending in a space stops tokenizers from
    # producing their usual space-prefixed word tokens (measured: Gemma then answers with an empty line).
    cue = "Annotated:"
    lead = " "

    def open_tag(self, label: str) -> str:
        raise NotImplementedError

    def close_tag(self, label: str) -> str:
        raise NotImplementedError

    def escape(self, text: str) -> str:
        for ch, esc in self._specials:
            text = text.replace(ch, esc)
        return text

    def render(self, text: str, spans: Sequence[Tuple[int, int, str]]) -> str:
        opens: dict = {}
        closes: dict = {}
        for start, end, label in _nestable(spans):
            opens.setdefault(start, []).append(label)  # outer spans first
            closes.setdefault(end, []).insert(0, label)  # inner spans close first
        out = []
        for i in range(len(text) + 1):
            out.extend(self.close_tag(lab) for lab in closes.get(i, ()))
            out.extend(self.open_tag(lab) for lab in opens.get(i, ()))
            if i < len(text):
                out.append(self.escape(text[i]))
        return self.lead + "".join(out)

    # Parsing: one regex finds markup and escapes; everything else is plain text.
    _markup: "re.Pattern[str]"

    def parse(self, answer: str) -> ParsedAnswer:
        answer = answer.lstrip("\n").split("\n", 1)[0]
        answer = answer[len(self.lead) :] if answer.startswith(self.lead) else answer
        plain: List[str] = []
        size = 0
        stack: List[Tuple[str, int]] = []  # (label or "", start offset in plain text)
        mentions: List[Mention] = []
        malformed = 0
        pos = 0
        for m in self._markup.finditer(answer):
            chunk = answer[pos : m.start()]
            plain.append(chunk)
            size += len(chunk)
            pos = m.end()
            kind, label = self._classify(m)
            if kind == "text":  # an escaped character of the source
                plain.append(label)
                size += len(label)
                continue
            if kind == "open":
                stack.append((label, size))
                continue
            # close: the innermost open markup that it can close
            idx = next((j for j in range(len(stack) - 1, -1, -1) if stack[j][0] in ("", label)), None)
            if idx is None:
                malformed += 1
                continue
            malformed += len(stack) - 1 - idx  # opens left unclosed inside it
            _, start = stack[idx]
            del stack[idx:]
            text = "".join(plain)[start:size]
            stripped = text.strip()
            if stripped:
                start += len(text) - len(text.lstrip())
                mentions.append(Mention(stripped, label, start))
            else:
                malformed += 1
        plain.append(answer[pos:])
        malformed += len(stack)
        return ParsedAnswer(mentions=mentions, plain_text="".join(plain), malformed=malformed)

    def _classify(self, m: "re.Match[str]") -> Tuple[str, str]:
        """("open", label or ""), ("close", label) or ("text", an escaped source character)."""
        raise NotImplementedError

    def _escaped_pieces(self, text: str, token_offsets: Sequence[Tuple[int, int]]):
        lead, tokens, gaps = gbnf.pieces(text, token_offsets)
        return self.escape(lead), [self.escape(t) for t in tokens], [self.escape(g) for g in gaps]


class BracketFormat(_InlineFormat):
    """``[span|label]``; nested spans nest: ``[[Paris|location] Commune|event]``."""

    name = "bracket"
    _specials = (("\\", "\\\\"), ("[", "\\["), ("]", "\\]"), ("|", "\\|"))
    _markup = re.compile(r"\\([\\\[\]|])|\[|\|\s*([^\[\]|\n]{1,60}?)\s*\]")

    def open_tag(self, label: str) -> str:
        return "["

    def close_tag(self, label: str) -> str:
        return f"|{label}]"

    def _classify(self, m):
        if m.group(1) is not None:
            return ("text", m.group(1))
        return ("open", "") if m.group(0) == "[" else ("close", m.group(2))

    def grammar(self, text: str, token_offsets: Sequence[Tuple[int, int]], labels: Sequence[str]) -> str:
        lead, tokens, gaps = self._escaped_pieces(text, token_offsets)
        n = len(tokens)
        rules = [f"root ::= {gbnf.literal(self.lead + lead)} out-0", f"out-{n} ::= {gbnf.literal(self.stop[0])}"]
        rules.append("label ::= " + gbnf.alternatives(labels))
        for i in range(n):
            tok, gap = gbnf.literal(tokens[i]), gbnf.literal(gaps[i])
            rules.append(f'out-{i} ::= {tok} {gap} out-{i + 1} | "[" {tok} in-{i}')
            cont = f" | {gap} {gbnf.literal(tokens[i + 1])} in-{i + 1}" if i + 1 < n else ""
            rules.append(f'in-{i} ::= "|" label "]" {gap} out-{i + 1}{cont}')
        return "\n".join(rules) + "\n"


class XMLFormat(_InlineFormat):
    """``<label>span</label>``; nested spans nest. The grammar makes every closing tag match its opening tag."""

    name = "xml"
    _specials = (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"))
    _unescape = {"amp": "&", "lt": "<", "gt": ">"}
    _markup = re.compile(r"&(amp|lt|gt);|<(/?)\s*([A-Za-z_][\w.\-]{0,59})\s*>")

    def open_tag(self, label: str) -> str:
        return f"<{label}>"

    def close_tag(self, label: str) -> str:
        return f"</{label}>"

    def _classify(self, m):
        if m.group(1) is not None:
            return ("text", self._unescape[m.group(1)])
        return ("close" if m.group(2) else "open", m.group(3))

    def grammar(self, text: str, token_offsets: Sequence[Tuple[int, int]], labels: Sequence[str]) -> str:
        lead, tokens, gaps = self._escaped_pieces(text, token_offsets)
        n = len(tokens)
        rules = [f"root ::= {gbnf.literal(self.lead + lead)} out-0", f"out-{n} ::= {gbnf.literal(self.stop[0])}"]
        for i in range(n):
            tok, gap = gbnf.literal(tokens[i]), gbnf.literal(gaps[i])
            opens = " | ".join(f"{gbnf.literal(self.open_tag(lab))} {tok} in-{i}-{k}" for k, lab in enumerate(labels))
            rules.append(f"out-{i} ::= {tok} {gap} out-{i + 1} | {opens}")
            for k, lab in enumerate(labels):
                cont = f" | {gap} {gbnf.literal(tokens[i + 1])} in-{i + 1}-{k}" if i + 1 < n else ""
                rules.append(f"in-{i}-{k} ::= {gbnf.literal(self.close_tag(lab))} {gap} out-{i + 1}{cont}")
        return "\n".join(rules) + "\n"
