"""A GGUF model's vocabulary without llama.cpp, for the torch engine: the tokenizer, each token's bytes, the
end-of-generation tokens and grammar matchers.

- **Tokenizer**: Hugging Face ``tokenizers``, built from the GGUF's own tokenizer tables so that it splits text
  exactly as llama.cpp does (tested against it on every test sentence and on fuzzed strings):
  - SentencePiece vocabularies (``tokenizer.ggml.model = llama``: Gemma) hold no merges, only scores: a BPE model
    whose merges are every split of a normal token into two tokens, ranked by the merged token's score (what
    SentencePiece's BPE does), with byte fallback, spaces written as ``▁`` and no space prefix where the file says
    so. transformers' own conversion of these files builds a Unigram model, which splits words differently.
    Finding those merges is seconds of Python for Gemma 3's 262k tokens; the table is kept in
    ``~/.cache/spacy_llmner/merges`` (``cached_merges``), so that later processes read it.
  - GPT-2 vocabularies (``gpt2``: SmolLM2) hold their merges; the pre-tokenizer is llama.cpp's for the file's
    ``tokenizer.ggml.pre`` (``smollm``: digits one by one, then GPT-2's byte-level split).
  - User-defined tokens (runs of spaces and newlines, markup) are matched on the raw text before anything else,
    control tokens as special tokens (a prompt's ``<start_of_turn>`` is one token, as llama.cpp's ``special``).
  Other tokenizer kinds are not built here: the backend then uses llama.cpp's (``engine`` needs llama-cpp-python).
- **Bytes per token**: from the table (``<0xXX>`` byte tokens are that byte; ``▁`` a space; GPT-2's byte map
  reversed), so a character split across byte tokens is joined by the caller, as llama.cpp's ``detokenize``.
- **End of generation**: the end-of-sequence id and the control tokens llama.cpp also ends on (``<end_of_turn>``,
  ``<|im_end|>`` ...).
- **Grammars**: llguidance (a maintained grammar engine, wheels for every platform, no dependencies) compiles the
  formats' GBNF; ``Matcher.allowed`` says which candidate tokens may come next, ``Matcher.best`` picks the best
  allowed token over the whole vocabulary.

``tokenizers`` (a transformers dependency) and ``llguidance`` are imported on first use.
"""

import hashlib
import os
import tempfile
import threading
from collections import Counter
from functools import lru_cache
from itertools import repeat
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..formats import gbnf
from .weights import read_gguf

# control tokens llama.cpp ends generation on besides the end-of-sequence id (llama-vocab.cpp's list)
EOG_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "<|end▁of▁sentence|>",
        "</s>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<fim-pad>",
        "<reponame>",
    }
)
NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6
TABLES = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")
PRE_TOKENIZERS = {"smollm": "digits"}  # llama.cpp's pre-tokenizer names this module builds for GPT-2 vocabularies


class UnsupportedTokenizer(ValueError):
    """The GGUF's tokenizer kind is not built here (llama.cpp's tokenizer is used instead)."""


def unsupported_tokenizer(meta) -> Optional[str]:
    """Why the tokenizer of a GGUF with this metadata (header scalars are enough) is not built here, or None."""
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")
    if kind == "llama" or (kind == "gpt2" and pre in PRE_TOKENIZERS):
        return None
    return f"tokenizer {kind!r} (pre-tokenizer {pre!r}) is not built without llama.cpp"


def _bytes_of_gpt2() -> Dict[str, int]:
    """GPT-2's byte-level alphabet reversed: character → byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class Vocab:
    """The vocabulary of one GGUF file (see the module's docstring)."""

    def __init__(self, path: str):
        meta, _ = read_gguf(path, tensors=False, arrays=TABLES)
        self.path = path
        self.kind = meta.get("tokenizer.ggml.model")
        self.tokens: List[str] = list(meta.get("tokenizer.ggml.tokens") or [])
        if not self.tokens:
            raise UnsupportedTokenizer(f"{path} holds no tokenizer")
        n = len(self.tokens)
        self.types: List[int] = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * n)
        self.n_vocab = n
        self.bos = meta.get("tokenizer.ggml.bos_token_id")
        self.eos = meta.get("tokenizer.ggml.eos_token_id")
        self.add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", self.kind == "llama"))
        why = unsupported_tokenizer(meta)
        if why is not None:
            raise UnsupportedTokenizer(f"{path}: {why}")
        if self.kind == "llama":
            scores = meta["tokenizer.ggml.scores"]
            merges = cached_merges(path, n, lambda: spm_merges(self.tokens, scores, self.types))
            self.tokenizer = _spm_bpe(self.tokens, merges, self.types, meta)
            self.pieces = self._spm_pieces()
        else:
            self.tokenizer = _gpt2_bpe(self.tokens, meta["tokenizer.ggml.merges"], self.types)
            table = _bytes_of_gpt2()
            self.pieces = [self._gpt2_piece(i, table) for i in range(n)]
        eog = {self.eos} if self.eos is not None else set()
        eog |= {i for i, t in enumerate(self.tokens) if self.types[i] in (CONTROL, USER_DEFINED) and t in EOG_TEXTS}
        self.eog: List[int] = sorted(eog)
        self._eog = frozenset(self.eog)
        self._llg = None
        self._by_text: Optional[Dict[str, Tuple[int, ...]]] = None

    def _spm_pieces(self) -> List[bytes]:
        """Each token's bytes: its text with ``▁`` as a space, ``<0xXX>`` byte tokens that byte, control tokens
        none (whole-table operations: 262k tokens for Gemma 3)."""
        pieces = list(map(str.encode, map(str.replace, self.tokens, repeat("▁"), repeat(" "))))
        for i, kind in enumerate(self.types):
            if kind == CONTROL:
                pieces[i] = b""
            elif kind == BYTE:
                tok = self.tokens[i]
                if len(tok) == 6 and tok.startswith("<0x"):
                    pieces[i] = bytes([int(tok[3:5], 16)])
        return pieces

    def _gpt2_piece(self, i: int, table: Dict[str, int]) -> bytes:
        tok, kind = self.tokens[i], self.types[i]
        if kind == CONTROL:
            return b""
        if kind == USER_DEFINED:  # stored as raw text, not in the byte-level alphabet
            return tok.encode()
        return bytes(table.get(c, 0) for c in tok)

    # -- the llama.cpp-like surface the decoder uses ------------------------------------------------------------
    def tokenize(self, text: str, bos: bool = True) -> List[int]:
        """Token ids of ``text`` with the model's BOS where it adds one (``bos = False``: never, for a continuation),
        special tokens parsed (as the llama.cpp backend's ``tokenize(..., add_bos=bos, special=True)``)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos] + ids if bos and self.add_bos and self.bos is not None else ids

    def piece(self, token: int) -> bytes:
        return self.pieces[token]

    def is_eog(self, token: int) -> bool:
        return token in self._eog

    def by_text(self) -> Dict[str, Tuple[int, ...]]:
        """Token text → token ids (ascending), over the whole vocabulary (built once; byte pieces that are not
        UTF-8 alone are left out: they are reachable through a prompt's own tokens only)."""
        if self._by_text is None:
            texts = list(map(_utf8_or_empty, self.pieces))
            table: Dict[str, Tuple[int, ...]] = dict(zip(texts, zip(range(len(texts)))))  # the last id of each
            shared = {text for text, n in Counter(texts).items() if n > 1 and text}
            for text in shared:
                table[text] = ()
            for t in [t for t, text in enumerate(texts) if text in shared]:
                table[texts[t]] += (t,)
            table.pop("", None)
            self._by_text = table
        return self._by_text

    def text_of(self, tokens: Sequence[int]) -> str:
        return b"".join(self.pieces[t] for t in tokens).decode("utf8", errors="ignore")

    # -- grammars -----------------------------------------------------------------------------------------------
    def matcher(self, grammar: str) -> "Matcher":
        return Matcher(self, _compiled(grammar))

    @property
    def ll_tokenizer(self):
        if self._llg is None:
            import llguidance

            # no "slices": they speed up masks of lexemes with broad character classes (JSON strings), while the
            # formats' grammars are literals; without them the table builds in ~half the time and masks are the same
            self._llg = llguidance.LLTokenizer(
                llguidance.TokenizerWrapper(_Wrapped(self)), n_vocab=self.n_vocab, eos_token=self.eog, slices=[]
            )
        return self._llg


class _Wrapped:
    """What llguidance's TokenizerWrapper reads: token bytes, ids of special tokens, a tokenize function."""

    def __init__(self, vocab: Vocab):
        self.eos_token_id = vocab.eos
        self.bos_token_id = vocab.bos
        self.tokens = [p if vocab.types[i] != CONTROL else vocab.tokens[i].encode() for i, p in enumerate(vocab.pieces)]
        self.special_token_ids = [i for i, t in enumerate(vocab.types) if t == CONTROL]
        self._vocab = vocab

    def __call__(self, text):
        text = text.decode("utf8", errors="replace") if isinstance(text, bytes) else text
        return self._vocab.tokenizer.encode(text, add_special_tokens=False).ids


@lru_cache(maxsize=512)
def _compiled(grammar: str) -> str:
    """llguidance's grammar for a GBNF grammar: converted by ``gbnf.to_lark`` where the grammar is of the formats'
    subset (every grammar the formats write), else by llguidance's own converter."""
    import llguidance

    lark = gbnf.to_lark(grammar)
    return llguidance.grammar_from("lark", lark) if lark is not None else llguidance.grammar_from("gbnf", grammar)


class Matcher:
    """One sequence's grammar state: which tokens may come next (a bit mask computed once per step)."""

    def __init__(self, vocab: Vocab, compiled: str):
        import llguidance

        self.vocab = vocab
        self.m = llguidance.LLMatcher(vocab.ll_tokenizer, compiled, log_level=0)
        if self.m.is_error():
            raise ValueError(f"grammar engine: {self.m.get_error()}")
        self._bits: Optional[np.ndarray] = None

    def _mask(self) -> np.ndarray:
        if self._bits is None:
            self._bits = np.frombuffer(self.m.compute_bitmask(), dtype=np.uint8)
        return self._bits

    def allowed(self, ids: np.ndarray) -> np.ndarray:
        """For candidate token ids, whether the grammar allows each next (end-of-generation where it may end)."""
        ids = np.asarray(ids, dtype=np.int64)
        return ((self._mask()[ids >> 3] >> (ids & 7)) & 1).astype(bool)

    def first_allowed(self, ids: Sequence[int]) -> Optional[int]:
        """The position of the first of ``ids`` the grammar allows next, or None: ``allowed(ids)``'s first True. Where
        the grammar forces text that makes whole tokens, llguidance's mask allows only that text's own tokens, so the
        mask is asked; elsewhere the mask allows exactly the tokens llguidance would accept alone, so each candidate
        is tried alone instead of computing the mask over the whole vocabulary (an end-of-generation token where the
        grammar may end, as the mask has it; tests/test_vocab.py checks both against the mask)."""
        m = self.m
        if m.compute_ff_tokens():
            ok = self.allowed(np.asarray(ids, dtype=np.int64))
            return int(np.argmax(ok)) if ok.any() else None
        eog = self.vocab.is_eog
        for j, token in enumerate(ids):
            if m.is_accepting() if eog(token) else m.validate_tokens([token]) == 1:
                return j
        return None

    def best(self, logits: np.ndarray) -> Optional[int]:
        """The best allowed token over the whole vocabulary (``logits`` has one entry per token), or None."""
        bits = np.unpackbits(self._mask(), bitorder="little")[: len(logits)].astype(bool)
        if not bits.any():
            return None
        return int(np.argmax(np.where(bits, logits, -np.inf)))

    def accept(self, token: int) -> None:
        self.m.consume_token(token)
        self._bits = None


def spm_merges(tokens: List[str], scores: List[float], types: List[int]) -> np.ndarray:
    """SentencePiece's BPE merges of a vocabulary with scores, as (left, right) token ids in rank order (int32,
    shape (n, 2)): every split of a normal token into two tokens, ranked by the merged token's score."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    get, merges = vocab.get, []
    for i, tok in enumerate(tokens):  # 1.1 M splits for Gemma 3: the suffix is looked up only after the prefix
        if types[i] != NORMAL or len(tok) < 2:
            continue
        for k in range(1, len(tok)):
            a = get(tok[:k])
            if a is not None:
                b = get(tok[k:])
                if b is not None:
                    merges.append((-scores[i], i, a, b))
    merges.sort()
    return np.array([(a, b) for _, _, a, b in merges], dtype=np.int32).reshape(-1, 2)


MERGES_FORMAT = 1  # bump when spm_merges changes what it returns: older cached files are then not read


def cache_dir() -> Path:
    """Where derived tables are kept between processes: ``$XDG_CACHE_HOME/spacy_llmner`` (``~/.cache/spacy_llmner``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "spacy_llmner"


def cached_merges(path: str, n_tokens: int, build: Callable[[], np.ndarray]) -> np.ndarray:
    """``build()``'s merges for the model file at ``path`` (a vocabulary of ``n_tokens``), kept in ``cache_dir()``
    under the file's location, size and modification time (a rewritten file is a new key): building them is
    seconds of Python for Gemma 3, reading them milliseconds. A cached file that is unreadable or names tokens
    outside the vocabulary is built again; a cache that cannot be written is built around, never an error."""
    st = os.stat(path)
    key = f"{MERGES_FORMAT}|{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"
    file = cache_dir() / "merges" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npy"
    try:
        merges = np.load(file, allow_pickle=False)
        if merges.dtype == np.int32 and merges.ndim == 2 and merges.shape[1] == 2:
            if not merges.size or (merges.min() >= 0 and merges.max() < n_tokens):
                return merges
    except (OSError, ValueError):
        pass
    merges = build()
    temp = None
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=file.parent, suffix=".npy", delete=False) as f:
            temp = f.name
            np.save(f, merges)
        os.replace(temp, file)  # whole or absent: a process reading it never sees half a file
    except OSError:
        if temp is not None and os.path.exists(temp):
            os.unlink(temp)
    return merges


def _spm_bpe(tokens: List[str], merges: np.ndarray, types: List[int], meta) -> "object":
    """A ``tokenizers`` BPE tokenizer equal to llama.cpp's SentencePiece tokenizer of the same tables, with the
    merges of ``spm_merges``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    vocab = {tok: i for i, tok in enumerate(tokens)}
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    tk = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[(tokens[a], tokens[b]) for a, b in merges.tolist()],
            unk_token=tokens[unk] if unk is not None else None,
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    norm = [normalizers.Replace(" ", "▁")]
    if meta.get("tokenizer.ggml.add_space_prefix"):
        norm.insert(0, normalizers.Prepend("▁"))
    tk.normalizer = normalizers.Sequence(norm)
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    _added(tk, tokens, types, AddedToken)
    return tk


def _utf8_or_empty(piece: bytes) -> str:
    try:
        return piece.decode("utf8")
    except UnicodeDecodeError:
        return ""


def _gpt2_bpe(tokens: List[str], merges: List[str], types: List[int]) -> "object":
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tk = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ", 1)) for m in merges])
    )
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tk.decoder = decoders.ByteLevel()
    _added(tk, tokens, types, AddedToken)
    return tk


def _added(tk, tokens, types, AddedToken) -> None:
    """User-defined tokens matched on the raw text first; control tokens as special tokens."""
    pairs = list(zip(tokens, types))
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in pairs if k == USER_DEFINED])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in pairs if k == CONTROL])


_BUILDING = threading.Lock()


def vocab_of(path: str) -> Vocab:
    """One ``Vocab`` per model file in the process (built once even where threads ask for it together: the torch
    engine builds it beside the model's loading)."""
    with _BUILDING:
        return _vocab_of(path)


@lru_cache(maxsize=4)
def _vocab_of(path: str) -> Vocab:
    return Vocab(path)
