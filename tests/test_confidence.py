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


def test_isotonic_calibration_is_monotone_smoothed_and_maps_over_confidence_down():
    from spacy_llmner.calibration import Calibration, fit

    # over-confident raw scores: 0.6 of the spans at raw 0.95 are right, 0.9 of those at 0.999, 0.3 at 0.7
    pairs = [(0.7, i < 30) for i in range(100)] + [(0.95, i < 60) for i in range(100)]
    pairs += [(0.999, i < 90) for i in range(100)]
    cal = fit(pairs, fitted_on="synthetic", min_block=20)
    xs, ys = [x for x, _ in cal.knots], [y for _, y in cal.knots]
    assert xs == sorted(xs) and ys == sorted(ys) and 0.0 < ys[0] and ys[-1] < 1.0  # never certain or impossible
    assert cal(0.95) == pytest.approx(61 / 102, abs=1e-5) and cal(0.999) == pytest.approx(91 / 102, abs=1e-5)
    assert cal(0.7) == pytest.approx(31 / 102, abs=1e-5) and cal(0.1) == cal(0.7) and cal(None) is None
    assert cal(0.8) < cal(0.9) < cal(0.95)  # between knots: linear, so ranking is kept
    # a violation is pooled: raw 0.9 less precise than raw 0.8 → one block
    pooled = fit([(0.8, i < 30) for i in range(40)] + [(0.9, i < 10) for i in range(40)], min_block=20)
    assert len(pooled.knots) == 1 and pooled(0.8) == pooled(0.9) == pytest.approx(41 / 82, abs=1e-5)
    assert Calibration.from_dict(cal.to_dict()) == cal
    with pytest.raises(ValueError, match="non-decreasing"):
        Calibration(((0.5, 0.6), (0.9, 0.4)))
    with pytest.raises(ValueError, match="too few"):
        fit([(0.5, True)] * 5)


def test_calibration_maps_by_demonstrations_shown_and_the_one_map_form_still_reads(tmp_path):
    from spacy_llmner.calibration import Calibration, Calibrations, load, save

    few = Calibration(((0.2, 0.1), (0.9, 0.6)), "k = 3")
    none = Calibration(((0.2, 0.05), (0.9, 0.3)), "k = 0")
    cals = Calibrations(((0, none), (1, few)))
    assert cals.for_demonstrations(0) is none and cals.for_demonstrations(1) is few
    assert cals.for_demonstrations(8) is few
    save(cals, tmp_path / "c.json")
    assert load(tmp_path / "c.json") == cals
    (tmp_path / "old.json").write_text('{"fitted_on": "old", "knots": [[0.2, 0.1], [0.9, 0.6]]}')
    old = load(tmp_path / "old.json")
    assert old.for_demonstrations(0) == old.for_demonstrations(5) == Calibration(few.knots, "old")
    assert Calibrations(((0, few),)).with_map(1, none).for_demonstrations(2) is none
    with pytest.raises(ValueError, match="start at min_demonstrations 0"):
        Calibrations(((1, few),))


def test_the_component_calibrates_before_threshold_unless_told_not_to():
    from spacy_llmner.calibration import Calibration, Calibrations

    class CalibratedBackend(LogprobBackend):
        # raw 0.9 → 0.6, raw 0.2 → 0.1 where demonstrations were shown; lower without (not these prompts)
        calibration = Calibrations(
            ((0, Calibration(((0.2, 0.0), (0.9, 0.0)))), (1, Calibration(((0.2, 0.1), (0.9, 0.6)))))
        )

    for calibrate, threshold, expected in [
        (True, 0.0, {("Angela Merkel", 0.6), ("Paris", 0.1)}),
        (True, 0.5, {("Angela Merkel", 0.6)}),
        (False, 0.0, {("Angela Merkel", 0.9), ("Paris", 0.2)}),
        (True, 0.7, set()),  # calibrated 0.6 is below 0.7 although raw 0.9 is above
    ]:
        nlp = spacy.blank("en")
        ner = add_fake_ner(nlp, lambda q: ANSWER, threshold=threshold, calibrate=calibrate)
        ner.set_demonstrations([{"text": "Bob met Ada.", "spans": [{"start": 0, "end": 3, "label": "person"}]}])
        ner.backend = CalibratedBackend(lambda q: ANSWER)
        doc = nlp("Angela Merkel flew to Paris.")
        group = doc.spans["llm_ner"]
        assert {(s.text, round(score, 3)) for s, score in zip(group, group.attrs["scores"])} == expected
    # the same answer to a prompt without demonstrations takes the other map
    nlp = spacy.blank("en")
    ner = add_fake_ner(nlp, lambda q: ANSWER)
    ner.backend = CalibratedBackend(lambda q: ANSWER)
    assert nlp("Angela Merkel flew to Paris.").spans["llm_ner"].attrs["scores"] == [0.0, 0.0]


def test_the_shipped_adapter_carries_a_calibration_its_backend_offers():
    from spacy_llmner import adapters
    from spacy_llmner.backends.cache import CachedBackend
    from spacy_llmner.backends.llamacpp import LlamaCppBackend

    assert (adapters.folder("ner-v2") / "calibration.json").exists()
    cals = LlamaCppBackend().calibration  # read from the file: nothing loaded
    assert cals is not None and [n for n, _ in cals.maps] == [0, 1]  # without demonstrations, with some
    for n, cal in cals.maps:
        assert len(cal.knots) >= 3 and "dev" in cal.fitted_on and f"k = {0 if n == 0 else 3}" in cal.fitted_on
        assert cal(0.999) > cal(0.8)  # confident answers stay more confident
    cal = cals
    assert LlamaCppBackend(adapter=None).calibration is None
    assert LlamaCppBackend(adapter="ner-v1").calibration is None
    assert CachedBackend(LlamaCppBackend(), ":memory:").calibration == cal
