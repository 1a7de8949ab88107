"""Per-entity confidence: each generated span carries the geometric-mean probability of the answer tokens that
stated it (``doc.spans[key].attrs["scores"]``), ``threshold`` drops the less confident, and the answer cache keeps
the token log-probabilities. Real-model checks are in test_adapters.py."""

import math
import sqlite3

import pytest
import spacy

from spacy_llmner.backends.cache import AnswerCache
from spacy_llmner.formats import LinesFormat
from spacy_llmner.formats.spans import confidence
from spacy_llmner.ty import Generation

from fakes import FakeBackend, add_fake_ner

ANSWER = "Angela Merkel | person\nParis | location\n\n"
LINE1 = len("Angela Merkel | person")
# three tokens write line 1 (p = 0.9 each), the newline and line 2 two more (p = 0.2), the stop one (p = 0.5)
LOGPROBS = (
    (6, math.log(0.9)),
    (14, math.log(0.9)),
    (LINE1, math.log(0.9)),
    (LINE1 + 6, math.log(0.2)),
    (len(ANSWER) - 2, math.log(0.2)),
    (len(ANSWER), math.log(0.5)),
)


class LogprobBackend(FakeBackend):
    def generate(self, requests):
        return [Generation(g.text, g.prompt_tokens, 6, token_logprobs=LOGPROBS) for g in super().generate(requests)]


def test_lines_mentions_know_their_line_and_confidence_reads_it():
    mentions = LinesFormat().parse(ANSWER).mentions
    assert [m.answer_range for m in mentions] == [(0, LINE1), (LINE1 + 1, len(ANSWER) - 2)]
    assert confidence(LOGPROBS, mentions[0].answer_range) == pytest.approx(0.9)
    assert confidence(LOGPROBS, mentions[1].answer_range) == pytest.approx(0.2)
    assert confidence(LOGPROBS, None) == pytest.approx(math.exp(sum(v for _, v in LOGPROBS) / 6))
    assert confidence((), (0, 5)) is None


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_spans_carry_scores_and_threshold_drops_the_unsure(threshold):
    nlp = spacy.blank("en")
    ner = add_fake_ner(nlp, lambda q: ANSWER, threshold=threshold)
    ner.backend = LogprobBackend(lambda q: ANSWER)
    doc = nlp("Angela Merkel flew to Paris.")
    group = doc.spans["llm_ner"]
    got = {(s.text, round(score, 3)) for s, score in zip(group, group.attrs["scores"])}
    if threshold == 0.0:
        assert got == {("Angela Merkel", 0.9), ("Paris", 0.2)}
    else:
        assert got == {("Angela Merkel", 0.9)} and [e.text for e in doc.ents] == ["Angela Merkel"]


def test_spans_without_log_probabilities_have_no_score_and_are_kept():
    nlp = spacy.blank("en")
    add_fake_ner(nlp, lambda q: ANSWER, threshold=0.99)
    doc = nlp("Angela Merkel flew to Paris.")
    assert len(doc.spans["llm_ner"]) == 2 and doc.spans["llm_ner"].attrs["scores"] == [None, None]
    with pytest.raises(ValueError, match="threshold is a confidence"):
        add_fake_ner(spacy.blank("en"), lambda q: ANSWER, threshold=1.5)


def test_the_cache_keeps_token_logprobs_and_opens_older_files(tmp_path):
    old = tmp_path / "old.sqlite"
    conn = sqlite3.connect(old)  # a cache written before token log-probabilities were kept
    conn.execute(
        "CREATE TABLE answers (key TEXT PRIMARY KEY, text TEXT NOT NULL, prompt_tokens INTEGER, "
        "completion_tokens INTEGER, seconds REAL)"
    )
    conn.execute("INSERT INTO answers VALUES ('k0', 'none', 3, 1, 0.1)")
    conn.commit()
    conn.close()
    cache = AnswerCache(old)
    assert cache.get("k0").text == "none" and cache.get("k0").token_logprobs == ()
    cache.put("k1", Generation(ANSWER, 10, 6, token_logprobs=LOGPROBS))
    back = AnswerCache(old).get("k1")
    assert back.cached and back.text == ANSWER
    assert [e for e, _ in back.token_logprobs] == [e for e, _ in LOGPROBS]
    assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(back.token_logprobs, LOGPROBS))
