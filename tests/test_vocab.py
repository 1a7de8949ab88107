"""The torch engine's vocabulary without llama.cpp (``backends/vocab.py``): the tokenizer built from the GGUF's own
tables splits text exactly as llama.cpp does, each token's bytes and the end-of-generation tokens are llama.cpp's,
and llguidance applies the formats' grammars token by token."""

import glob
import random

import numpy as np
import pytest
import spacy

from spacy_llmner.backends.llamacpp import resolve_model_path
from spacy_llmner.backends.vocab import vocab_of

MODELS = ["gemma3-270m", "smollm2-135m"]
EDGES = [
    "",
    " ",
    "\n",
    "\n\n\n1",
    "Entity types:\n- person\n- location\n\nSentence: Angela  Merkel\tmet 12,345 people in Zürich.\nEntities:\n",
    "<start_of_turn>user\nhi<end_of_turn>",
    "日本語のテキストと中文",
    "émigré naïve ﬁnance – “quotes” … ½",
    "  leading and trailing  ",
    "ID-4711/B: x^2 + y_1 = 3.5e-3 ;) <b>bold</b>",
]


def sentences():
    out = []
    for path in sorted(glob.glob("tests/fixtures/data/crossner/*/test.txt")):
        words = []
        for line in open(path, encoding="utf8"):
            line = line.strip()
            if line:
                words.append(line.split()[0])
            elif words:
                out.append(" ".join(words))
                words = []
    return out


@pytest.mark.model
@pytest.mark.parametrize("name", MODELS)
def test_the_tokenizer_bytes_and_end_tokens_are_llama_cpp_s(name):
    from llama_cpp import Llama, llama_model_get_vocab, llama_vocab_is_eog

    path = resolve_model_path(name)
    vocab = vocab_of(path)
    llm = Llama(path, vocab_only=True, verbose=False)
    rng = random.Random(0)
    pieces = [vocab.piece(rng.randrange(vocab.n_vocab)).decode("utf8", "ignore") for _ in range(400)]
    fuzz = ["".join(rng.choice(pieces + [" ", "\n", "1", "ß", "..."]) for _ in range(8)) for _ in range(100)]
    texts = sentences() + EDGES + fuzz
    assert len(texts) > 100
    differ = [t for t in texts if vocab.tokenize(t) != llm.tokenize(t.encode(), add_bos=True, special=True)]
    assert differ == []
    lv = llama_model_get_vocab(llm.model)
    assert vocab.eog == [t for t in range(vocab.n_vocab) if llama_vocab_is_eog(lv, t)]
    sample = range(0, vocab.n_vocab, 97)
    # llama-cpp-python returns nothing for pieces over 32 bytes; every other piece is the same bytes
    assert all(vocab.piece(t) == llm.detokenize([t]) for t in sample if llm.detokenize([t]))


@pytest.mark.model
@pytest.mark.parametrize("name", MODELS)
def test_by_text_maps_every_utf8_piece_to_all_its_ids(name):
    vocab = vocab_of(resolve_model_path(name))
    expected = {}
    for t in range(vocab.n_vocab):
        try:
            text = vocab.piece(t).decode("utf8")
        except UnicodeDecodeError:
            continue
        if text:
            expected.setdefault(text, []).append(t)
    table = vocab.by_text()
    assert {text: list(ids) for text, ids in table.items()} == expected
    if name == "gemma3-270m":  # texts shared by several tokens (a byte token and a piece)
        assert any(len(ids) > 1 for ids in table.values())


FORMATS = {  # as the grammars write them: the inline formats start with a space
    "Lines": "Angela Merkel | person\nParis | location\n\n",
    "Bracket": " [Angela Merkel|person] met Emmanuel Macron in [Paris|location].\n",
    "XML": " <person>Angela Merkel</person> met Emmanuel Macron in <location>Paris</location>.\n",
    "JSON": ' [{"text": "Angela Merkel", "label": "person"}, {"text": "Paris", "label": "location"}]\n',
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_llguidance_applies_each_format_s_grammar_token_by_token(fmt):
    """The faithful answer is allowed token by token (tokens of the model's own tokenizer) and may end there; an
    answer naming a label that is not given, or a mention that is not in the text, is refused at its first
    wrong token."""
    vocab = vocab_of(resolve_model_path("gemma3-270m"))
    nlp = spacy.blank("en")
    config = {"labels": ["person", "location"], "zero_shot": True, "format": {"@misc": f"spacy_llmner.{fmt}Format.v1"}}
    ner = nlp.add_pipe("llm_lar_ner", config=config)
    grammar = ner.request(nlp.make_doc("Angela Merkel met Emmanuel Macron in Paris.")[:]).grammar

    def walk(answer):
        m = vocab.matcher(grammar)
        for token in vocab.tokenize(answer)[1:]:
            if not m.allowed(np.array([token]))[0]:
                return False, m
            m.accept(token)
        return True, m

    ok, m = walk(FORMATS[fmt])
    assert ok and m.allowed(np.array(vocab.eog)).any()
    assert not walk(FORMATS[fmt].replace("location", "organisation"))[0]
    assert not walk(FORMATS[fmt].replace("Paris", "Rome"))[0]
    full = np.zeros(vocab.n_vocab, np.float32)
    full[vocab.tokenize("Zürich")[1]] = 10.0  # the best token overall is not allowed: best() skips it
    best = vocab.matcher(grammar).best(full)
    assert best is not None and best != vocab.tokenize("Zürich")[1]


TRICKY = 'Dr. "Bob" O\'Neil\tof ACME-Corp\\EU met 佐藤 in São Paulo (Brazil) | 50% {x}'


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_our_lark_conversion_masks_tokens_as_llguidance_s_own(fmt):
    """The formats' grammars reach llguidance through ``gbnf.to_lark``, not llguidance's own GBNF converter. On
    text with quotes, backslashes, tabs, pipes, braces and non-Latin script, both conversions allow exactly the same
    tokens at every step of one walk through the grammar (each step a seeded draw among the allowed tokens)."""
    import llguidance

    from spacy_llmner.backends.vocab import Matcher
    from spacy_llmner.formats import gbnf

    vocab = vocab_of(resolve_model_path("gemma3-270m"))
    nlp = spacy.blank("en")
    config = {"labels": ["person", "place"], "zero_shot": True, "format": {"@misc": f"spacy_llmner.{fmt}Format.v1"}}
    ner = nlp.add_pipe("llm_lar_ner", config=config)
    doc = nlp.make_doc(TRICKY)
    grammar = ner.request(doc[:]).grammar
    assert gbnf.to_lark(grammar) is not None  # the formats' subset: the fast path is the one taken
    ours, theirs = vocab.matcher(grammar), Matcher(vocab, llguidance.grammar_from("gbnf", grammar))
    steps = 0
    while True:
        mask = ours.m.compute_bitmask()
        assert mask == theirs.m.compute_bitmask(), f"step {steps}"
        allowed = np.flatnonzero(np.unpackbits(np.frombuffer(mask, np.uint8), bitorder="little")[: vocab.n_vocab])
        if not len(allowed) or steps == 40:
            break
        token = int(random.Random(steps).choice(allowed))  # any allowed token: both must follow the same path
        if vocab.is_eog(token):
            break
        ours.accept(token)
        theirs.accept(token)
        steps += 1
    assert steps >= 10


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_first_allowed_picks_what_the_mask_picks(fmt):
    """The greedy decoder asks ``first_allowed`` (tokens tried one by one) instead of the whole-vocabulary mask: at
    every step of each format's answer, and where it may end, for candidate lists mixing allowed, refused and
    end-of-generation tokens, it gives the position of the mask's first allowed candidate."""
    vocab = vocab_of(resolve_model_path("gemma3-270m"))
    nlp = spacy.blank("en")
    config = {"labels": ["person", "location"], "zero_shot": True, "format": {"@misc": f"spacy_llmner.{fmt}Format.v1"}}
    ner = nlp.add_pipe("llm_lar_ner", config=config)
    m = vocab.matcher(ner.request(nlp.make_doc("Angela Merkel met Emmanuel Macron in Paris.")[:]).grammar)
    rng = random.Random(0)
    cut = FORMATS[fmt].index("Angela") + 3  # "Ang" alone: the grammar then forces "ela", one whole token
    answer = vocab.tokenize(FORMATS[fmt][:cut])[1:] + vocab.tokenize(FORMATS[fmt][cut:])[1:]
    table, forced = vocab.by_text(), 0
    for step in range(len(answer) + 1):
        allowed = np.flatnonzero(m.allowed(np.arange(vocab.n_vocab))).tolist()
        refused = [t for t in rng.sample(range(vocab.n_vocab), 50) if t not in set(allowed)]
        # near misses: the tokens that spell the start of an allowed token (refused where the text is forced)
        near = [t for a in allowed[:20] for k in range(1, 8) for t in table.get(vocab.text_of([a])[:k], ())]
        refused += [t for t in near if t not in set(allowed)]
        forced += bool(m.m.compute_ff_tokens()) and any(m.m.validate_tokens([t]) == 1 for t in refused)
        for _ in range(20):
            ids = rng.sample(refused, min(4, rng.randrange(len(refused) + 1))) + rng.sample(
                allowed, min(2, len(allowed))
            )
            ids += rng.sample(vocab.eog, rng.randrange(len(vocab.eog) + 1))
            rng.shuffle(ids)
            ok = m.allowed(np.array(ids, dtype=np.int64))
            assert m.first_allowed(ids) == (int(np.argmax(ok)) if ok.any() else None), (step, ids)
        if step < len(answer):
            m.accept(answer[step])
    assert set(vocab.eog) <= set(allowed) and m.first_allowed(refused + vocab.eog) == len(refused)  # it may end
    assert forced  # states where a token accepted alone is not in the mask (forced text) were tried


def test_to_lark_renames_rules_as_llguidance_and_leaves_other_grammars_to_it():
    from spacy_llmner.formats.gbnf import to_lark

    grammar = "\n".join(
        [
            'root ::= item ("," item)* rec-x',
            'item ::= "a-b" | leaf-y',
            'leaf-y ::= "\\"q\\\\"',
            'rec-x ::= "r" (rec-x)?',
        ]
    )
    # root is start; item and leaf-y reach only literals: terminals; the recursive rule stays a parser rule
    assert to_lark(grammar).splitlines() == [
        "%llguidance {}",
        "",
        'start: ITEM ("," ITEM)* rec_x',
        'ITEM: "a-b" | LEAF_Y',
        'LEAF_Y: "\\"q\\\\"',
        'rec_x: "r" (rec_x)?',
    ]
    assert to_lark("root ::= [a-z]+\n") is None  # a character class
    assert to_lark('# comment\nroot ::= "a"\n') is None
    assert to_lark('start ::= "a"\n') is None  # no root
    assert to_lark("root ::= missing\n") is None
    assert to_lark('root ::= a-b a_b\na-b ::= "x"\na_b ::= "y"\n') is None  # the same name once renamed


def test_merges_are_kept_between_processes_and_a_bad_cached_file_is_built_again(tmp_path, monkeypatch):
    """``cached_merges``: the first call builds and writes, the next reads the same table without building; a
    file that is not a merges table, or names tokens outside the vocabulary, is built again and replaced; a
    rewritten model file is a new key; a cache that cannot be written is built around."""
    from spacy_llmner.backends.vocab import cached_merges

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = tmp_path / "model.gguf"
    model.write_bytes(b"weights")
    table = np.array([[1, 2], [0, 3], [2, 2]], dtype=np.int32)
    built = []

    def build():
        built.append(1)
        return table.copy()

    assert np.array_equal(cached_merges(str(model), 4, build), table) and len(built) == 1
    (file,) = (tmp_path / "cache" / "spacy_llmner" / "merges").iterdir()
    assert np.array_equal(cached_merges(str(model), 4, build), table) and len(built) == 1  # read, not built
    for bad in (b"not numpy", None):
        if bad is None:
            np.save(file, np.array([[1, 9]], dtype=np.int32))  # token 9 of a vocabulary of 4
        else:
            file.write_bytes(bad)
        assert np.array_equal(cached_merges(str(model), 4, build), table)
        assert np.array_equal(np.load(file), table)  # replaced by the rebuilt table
    assert len(built) == 3
    model.write_bytes(b"other weights")  # another size and time: another key
    cached_merges(str(model), 4, build)
    assert len(built) == 4 and len(list(file.parent.iterdir())) == 2
    monkeypatch.setenv("XDG_CACHE_HOME", str(model))  # a file where the folder would be: nothing can be written
    assert np.array_equal(cached_merges(str(model), 4, build), table) and len(built) == 5


@pytest.mark.model
def test_gemma_s_cached_merges_are_the_ones_built_from_its_tables(tmp_path, monkeypatch):
    """The Gemma 3 tokenizer from a cached merges table is the one built from the file's scores."""
    from spacy_llmner.backends.vocab import TABLES, Vocab, spm_merges
    from spacy_llmner.backends.weights import read_gguf

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = resolve_model_path("gemma3-270m")
    meta, _ = read_gguf(path, tensors=False, arrays=TABLES)
    built = spm_merges(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"], meta["tokenizer.ggml.token_type"])
    assert len(built) > 100_000
    first, second = Vocab(path), Vocab(path)  # the first writes the table, the second reads it
    assert np.array_equal(np.load(next((tmp_path / "spacy_llmner" / "merges").iterdir())), built)
    texts = sentences() + EDGES
    assert [second.tokenize(t) for t in texts] == [first.tokenize(t) for t in texts]
