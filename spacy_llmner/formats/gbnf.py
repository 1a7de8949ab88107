"""GBNF building blocks shared by the formats' grammars.

Every grammar draws span text from the input: a mention is any run of consecutive input tokens, written exactly
as the source writes it (token text plus the whitespace between tokens). Rules grow linearly with the input.
"""

from typing import List, Sequence, Tuple


def literal(text: str) -> str:
    """A GBNF string literal for ``text`` ('""' for the empty string)."""
    out = []
    for ch in text:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ch == "\x7f":
            out.append("\\x%02x" % ord(ch))
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def alternatives(options: Sequence[str]) -> str:
    return " | ".join(literal(o) for o in options)


def pieces(text: str, token_offsets: Sequence[Tuple[int, int]]) -> Tuple[str, List[str], List[str]]:
    """Split ``text`` into leading whitespace, token texts and the text after each token up to the next one."""
    if not token_offsets:
        return text, [], []
    lead = text[: token_offsets[0][0]]
    tokens, gaps = [], []
    for i, (start, end) in enumerate(token_offsets):
        tokens.append(text[start:end])
        nxt = token_offsets[i + 1][0] if i + 1 < len(token_offsets) else len(text)
        gaps.append(text[end:nxt])
    return lead, tokens, gaps


def mention_rules(tokens: Sequence[str], gaps: Sequence[str], escape=lambda s: s) -> List[str]:
    """Rules ``mention`` (any run of consecutive tokens) and ``run-i`` (a run starting at token i)."""
    n = len(tokens)
    if n == 0:
        return ['mention ::= "\\x00"']  # unreachable: an empty input has no mentions
    rules = []
    for i in range(n):
        tok = literal(escape(tokens[i]))
        if i + 1 < n:
            gap = escape(gaps[i])
            cont = f"{literal(gap)} run-{i + 1}" if gap else f"run-{i + 1}"
            rules.append(f"run-{i} ::= {tok} ({cont})?")
        else:
            rules.append(f"run-{i} ::= {tok}")
    rules.append("mention ::= " + " | ".join(f"run-{i}" for i in range(n)))
    return rules
