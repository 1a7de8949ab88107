"""GBNF building blocks shared by the formats' grammars.

Every grammar draws span text from the input: a mention is any run of consecutive input tokens, written exactly
as the source writes it (token text plus the whitespace between tokens). Rules grow linearly with the input.
"""

import re
from typing import List, Optional, Sequence, Tuple


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


def mention_rules(tokens: Sequence[str], gaps: Sequence[str], escape=lambda s: s, first=lambda s: s) -> List[str]:
    """Rules ``mention`` (any run of consecutive tokens) and ``run-i`` (a run starting at token i). ``escape``
    writes text the way the format quotes it; ``first`` additionally marks a mention's first token (lines format:
    a leading bullet character is escaped)."""
    n = len(tokens)
    if n == 0:
        return ['mention ::= "\\x00"']  # unreachable: an empty input has no mentions
    rules, starts = [], []
    for i in range(n):
        cont = ""
        if i + 1 < n:
            gap = escape(gaps[i])
            cont = f" ({literal(gap)} run-{i + 1})?" if gap else f" (run-{i + 1})?"
        tok = escape(tokens[i])
        rules.append(f"run-{i} ::= {literal(tok)}{cont}")
        lead = first(tok)
        if lead != tok:
            rules.append(f"start-{i} ::= {literal(lead)}{cont}")
            starts.append(f"start-{i}")
        else:
            starts.append(f"run-{i}")
    rules.append("mention ::= " + " | ".join(starts))
    return rules


# ---- the same grammar in llguidance's Lark -------------------------------------------------------------------------
# The formats build a grammar for every sentence (its mentions are the sentence's own tokens), so converting GBNF
# for the grammar engine happens once per sentence. llguidance's converter (``gbnf_to_lark``, Python) parses into a
# tree, a visible share of decoding time at k = 0 (docs/speed.md). For the subset the formats write
# the conversion is a renaming, done here with llguidance's rules: ``root`` becomes ``start``; every other rule that
# reaches only literals and such rules becomes a lexer terminal (upper case, ``-`` as ``_``); literals are kept
# verbatim (GBNF's escapes are Lark's).

_RULE = re.compile(r"\s*([a-z][a-z0-9_-]*)\s*::=(.*)")
_PART = re.compile(r'\s+|"(?:[^"\\\n]|\\.)*"|[a-z][a-z0-9_-]*|[()|?*+]')


def to_lark(grammar: str) -> Optional[str]:
    """``grammar`` (GBNF) as llguidance's Lark, or None where it leaves the formats' subset (comments, character
    classes, upper-case names, a reference to no rule, a name that would clash once renamed): the caller then hands
    it to llguidance's own converter."""
    rules = {}
    for line in grammar.splitlines():
        if not line.strip():
            continue
        m = _RULE.fullmatch(line)
        if m is None or m.group(1) in rules:
            return None
        parts = _PART.findall(m.group(2))
        if "".join(parts) != m.group(2):
            return None
        rules[m.group(1)] = parts
    refs = {name: {p for p in parts if p[0].isalpha()} for name, parts in rules.items()}
    if "root" not in rules or any(r not in rules or r == "root" for rs in refs.values() for r in rs):
        return None
    terminal: set = set()
    grew = True
    while grew:  # llguidance's fixpoint: recursive rules never become terminals
        grew = False
        for name, rs in refs.items():
            if name != "root" and name not in terminal and rs <= terminal:
                terminal.add(name)
                grew = True
    renamed = {
        n: "start" if n == "root" else n.replace("-", "_").upper() if n in terminal else n.replace("-", "_")
        for n in rules
    }
    if len(set(renamed.values())) != len(renamed):
        return None
    lines = ["%llguidance {}", ""]
    for name, parts in rules.items():
        body = "".join(renamed[p] if p[0].isalpha() else p for p in parts).strip()
        lines.append(f"{renamed[name]}: {body}")
    return "\n".join(lines) + "\n"


# ---- recognizing: does a grammar accept a text? ------------------------------------------------------------------
# A small Earley recognizer over the GBNF subset the formats write (literals with escapes, rule references, groups,
# ``|``, ``?``, ``*``, ``+``). Used to check that a server applied a grammar and, in tests, that every format's
# grammar accepts the answer its renderer writes. Iterative (no recursion limit on long inputs).

_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}


def _tokenize_rhs(rhs: str) -> List[str]:
    out, i = [], 0
    while i < len(rhs):
        ch = rhs[i]
        if ch.isspace():
            i += 1
        elif ch == '"':
            j, buf = i + 1, []
            while rhs[j] != '"':
                if rhs[j] == "\\":
                    nxt = rhs[j + 1]
                    if nxt == "x":
                        buf.append(chr(int(rhs[j + 2 : j + 4], 16)))
                        j += 4
                        continue
                    buf.append(_ESCAPES.get(nxt, nxt))
                    j += 2
                    continue
                buf.append(rhs[j])
                j += 1
            out.append('"' + "".join(buf))  # a literal: leading quote, then its decoded text
            i = j + 1
        elif ch in "()|?*+":
            out.append(ch)
            i += 1
        else:
            j = i
            while j < len(rhs) and (rhs[j].isalnum() or rhs[j] in "-_"):
                j += 1
            if j == i:
                raise ValueError(f"GBNF: cannot read {rhs[i : i + 20]!r}")
            out.append(rhs[i:j])
            i = j
    return out


def literals(text: str) -> List[str]:
    """Every string literal of a GBNF grammar, decoded (escapes resolved), in order of appearance."""
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            out.extend(t[1:] for t in _tokenize_rhs(line.partition("::=")[2]) if t.startswith('"'))
    return out


class Grammar:
    """A GBNF grammar compiled to plain BNF (characters as terminals) for recognition."""

    def __init__(self, text: str, root: str = "root"):
        self.rules: dict = {}  # name -> list of alternatives (tuples of symbols: ("t", char) or ("n", name))
        self._fresh = 0
        for line in text.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            name, _, rhs = line.partition("::=")
            self.rules[name.strip()] = self._alternatives(_tokenize_rhs(rhs), [0])
        self.root = root
        self.nullable = self._nullable()

    def _new_rule(self, alts) -> tuple:
        self._fresh += 1
        name = f"_g{self._fresh}"
        self.rules[name] = alts
        return ("n", name)

    def _alternatives(self, toks: List[str], at: List[int]) -> list:
        alts, seq = [], []
        while at[0] < len(toks) and toks[at[0]] != ")":
            tok = toks[at[0]]
            at[0] += 1
            if tok == "|":
                alts.append(tuple(seq))
                seq = []
                continue
            if tok == "(":
                inner = self._alternatives(toks, at)
                at[0] += 1  # the closing parenthesis
                item = [self._new_rule(inner)]
            elif tok.startswith('"'):
                item = [("t", ch) for ch in tok[1:]]
            else:
                item = [("n", tok)]
            if at[0] < len(toks) and toks[at[0]] in "?*+":
                op = toks[at[0]]
                at[0] += 1
                body = tuple(item)
                if op == "?":
                    item = [self._new_rule([body, ()])]
                else:
                    star = self._new_rule([()])
                    self.rules[star[1]].append(body + (star,))
                    item = [star] if op == "*" else list(body) + [star]
            seq.extend(item)
        alts.append(tuple(seq))
        return alts

    def _nullable(self) -> set:
        null: set = set()
        changed = True
        while changed:
            changed = False
            for name, alts in self.rules.items():
                if name not in null and any(all(s[0] == "n" and s[1] in null for s in alt) for alt in alts):
                    null.add(name)
                    changed = True
        return null

    def accepts(self, text: str, prefix: bool = False) -> bool:
        """True if the grammar derives ``text`` (``prefix``: if some text the grammar derives starts with it)."""
        rules, nullable = self.rules, self.nullable
        n = len(text)
        chart = [dict() for _ in range(n + 1)]  # item -> None (an ordered set); item = (rule, alt, dot, origin)
        waiting = [dict() for _ in range(n + 1)]  # nonterminal -> items at that position expecting it

        def add(i, item):
            if item not in chart[i]:
                chart[i][item] = None
                work.append(item)

        for a in range(len(rules[self.root])):
            chart[0][(self.root, a, 0, 0)] = None
        for i in range(n + 1):
            work = list(chart[i])
            while work:
                item = work.pop()
                rule, a, dot, origin = item
                alt = rules[rule][a]
                if dot < len(alt):
                    kind, sym = alt[dot]
                    if kind == "t":
                        if i < n and text[i] == sym:
                            chart[i + 1][(rule, a, dot + 1, origin)] = None
                        continue
                    waiting[i].setdefault(sym, []).append(item)
                    for b in range(len(rules[sym])):
                        add(i, (sym, b, 0, i))
                    if sym in nullable:  # Aycock & Horspool: an empty sym may be skipped at once
                        add(i, (rule, a, dot + 1, origin))
                else:
                    for parent in waiting[origin].get(rule, ()):
                        p_rule, p_a, p_dot, p_origin = parent
                        add(i, (p_rule, p_a, p_dot + 1, p_origin))
            if prefix and i == n and chart[n]:
                return True
            if i < n and not chart[i + 1]:
                return False
        return any(r == self.root and o == 0 and d == len(rules[r][a]) for r, a, d, o in chart[n])


def accepts(grammar: str, text: str, prefix: bool = False) -> bool:
    return Grammar(grammar).accepts(text, prefix)
