"""The ``llm_ner_ensemble`` component: span-level voting, fitted weights, self-validation, members of every kind."""

import threading

import pytest
import spacy
from spacy.training import Example

from spacy_llmner.ensemble import fit, fit_sources, flat, micro_f1, tally, union

from fakes import FakeBackend, FakeScorer

LABELS = ["person", "location", "organisation"]


# ---- voting on hand-made member outputs ------------------------------------------------------------------------
def test_majority_keeps_what_most_members_found():
    outputs = {
        "a": [(0, 2, "person"), (5, 6, "location")],
        "b": [(0, 2, "person")],
        "c": [(5, 6, "location"), (8, 9, "person")],
    }
    votes = {(v.start, v.end): v for v in tally(outputs, {})}
    assert votes[(0, 2)].support == pytest.approx(2 / 3) and votes[(0, 2)].members == ("a", "b")
    assert votes[(8, 9)].support == pytest.approx(1 / 3)
    kept = [(v.start, v.end, v.label) for v in votes.values() if v.support > 0.5]
    assert sorted(kept) == [(0, 2, "person"), (5, 6, "location")]


def test_boundaries_and_types_are_voted_separately():
    # Three members agree on the boundaries, not on the type: the span stays, the type is the majority's.
    outputs = {"a": [(0, 2, "person")], "b": [(0, 2, "organisation")], "c": [(0, 2, "organisation")]}
    (v,) = tally(outputs, {})
    assert (v.support, v.label, v.label_share) == (1.0, "organisation", pytest.approx(2 / 3))


def test_type_tie_goes_to_the_earliest_member_and_weights_break_it():
    outputs = {"a": [(0, 2, "person")], "b": [(0, 2, "location")]}
    assert tally(outputs, {})[0].label == "person"
    assert tally(outputs, {"b": 2.0})[0].label == "location"
    # label accuracies (fitted on dev) weigh each member's type vote
    assert tally(outputs, {}, {"a": {"person": 0.2}, "b": {"location": 0.9}})[0].label == "location"


def test_weights_decide_support_and_a_zero_weight_member_is_ignored():
    outputs = {"strong": [(0, 1, "person")], "weak1": [(3, 4, "person")], "weak2": [(3, 4, "person")]}
    supports = {(v.start, v.end): v.support for v in tally(outputs, {"strong": 3.0})}
    assert supports == {(0, 1): pytest.approx(0.6), (3, 4): pytest.approx(0.4)}
    assert {(v.start, v.end): v.support for v in tally(outputs, {"weak1": 0, "weak2": 0})}[(3, 4)] == 0.0


def test_nested_spans_are_all_kept_and_flat_prefers_support_then_length():
    outputs = {
        "a": [(0, 4, "organisation"), (2, 3, "location")],
        "b": [(0, 4, "organisation"), (2, 3, "location")],
        "c": [(2, 3, "location")],
    }
    votes = tally(outputs, {})
    assert len([v for v in votes if v.support > 0.5]) == 2  # nested: both kept
    assert [(v.start, v.end) for v in flat(votes)] == [(2, 3)]  # 3 votes beat 2
    outputs["c"].append((0, 4, "organisation"))
    assert [(v.start, v.end) for v in flat(tally(outputs, {}))] == [(0, 4)]  # equal support: the longer


def test_union_keeps_every_span_and_overlaps_go_to_the_member_listed_first():
    llm = [(0, 2, "person"), (5, 7, "organisation")]
    student = [(1, 3, "location"), (5, 7, "location"), (9, 10, "person")]
    ballot = union({"llm": llm, "student": student})
    assert all(ballot.keep) and len(ballot.votes) == 4
    # (1, 3) loses to the llm's overlapping span; on the shared boundaries the type tie goes to the llm as well
    assert ballot.spans() == [(0, 2, "person"), (5, 7, "organisation"), (9, 10, "person")]
    assert union({"student": student, "llm": llm}).spans() == student
    # without a precedence, equal support goes to the longer span, whichever member proposed it
    assert [(v.start, v.end) for v in flat(tally({"a": [(0, 2, "x")], "b": [(0, 3, "x")]}, {}))] == [(0, 3)]


def test_fit_sources_keeps_each_label_from_the_members_that_get_it_right():
    # the llm finds persons and proposes a wrong organisation; the student finds organisations and a wrong person
    gold, outputs = [], []
    for _ in range(10):
        gold.append([(0, 2, "person"), (4, 5, "organisation"), (11, 12, "location")])
        outputs.append(
            {
                "llm": [(0, 2, "person"), (6, 7, "organisation"), (11, 12, "location")],
                "student": [(0, 1, "person"), (4, 5, "organisation"), (8, 9, "person"), (11, 12, "location")],
            }
        )
    sources, f1, plain = fit_sources(outputs, gold, ["llm", "student"])
    assert sources == {"organisation": ("student",), "person": ("llm",)}  # location: both, the default
    assert plain == pytest.approx(0.75) and f1 == pytest.approx(1.0)
    assert union(outputs[0], sources).spans() == gold[0]
    # a plain union keeps both wrong spans; sources naming no label keep every member's spans
    assert union(outputs[0], {}).spans() == union(outputs[0]).spans() != gold[0]
    # nothing to gain: every label stays with both members
    assert fit_sources([{"llm": g, "student": []} for g in gold], gold, ["llm", "student"])[0] == {}


def test_fit_learns_to_trust_the_precise_member_and_beats_each_member():
    gold, outputs = [], []
    for _i in range(30):
        truth = [(0, 1, "person"), (3, 5, "organisation")]
        gold.append(truth)
        outputs.append(
            {
                "precise": [(0, 1, "person")],  # misses the organisation, never wrong
                "noisy": [(0, 1, "location"), (3, 5, "organisation")],  # finds both, mistypes the person
                "junk": [(6, 7, "person"), (9, 10, "location")],
            }
        )
    weights, label_weights, threshold, f1 = fit(outputs, gold, ["precise", "noisy", "junk"])
    members = {m: micro_f1([o[m] for o in outputs], gold) for m in ("precise", "noisy", "junk")}
    assert f1 == pytest.approx(1.0) and f1 > max(members.values())
    assert weights["junk"] < weights["noisy"]  # equal weights cannot tell noisy's organisation from junk
    assert label_weights["noisy"]["location"] < label_weights["precise"]["person"]


# ---- the component, with canned members ------------------------------------------------------------------------
def _answers(table):
    def answer(query):
        return "\n".join(f"{span} | {label}" for span, label in table if span in query)

    return answer


def build(nlp, answers_a, answers_b, *, ruler=True, **config):
    for name, answers in (("llm_a", answers_a), ("llm_b", answers_b)):
        proc = nlp.add_pipe(
            "llm_lar_ner",
            name=name,
            config={
                "labels": LABELS,
                "spans_key": name,
                "backend": {"@llm_models": "spacy_llmner.LlamaCpp.v1"},
                "zero_shot": True,
            },
        )
        proc.backend = answers if isinstance(answers, FakeBackend) else FakeBackend(_answers(answers))
        proc.constrained = False
        nlp.disable_pipe(name)
    members = ["llm_a", "llm_b"]
    if ruler:  # a non-LLM NER producer: anything that writes doc.ents
        r = nlp.add_pipe("entity_ruler", name="rules")
        r.add_patterns([{"label": "person", "pattern": "Ada Lovelace"}, {"label": "location", "pattern": "Paris"}])
        nlp.disable_pipe("rules")
        members.append("rules")
    return nlp.add_pipe("llm_ner_ensemble", name="vote", config={"members": members, **config})


TEXT = "Ada Lovelace met Babbage in Paris at the Royal Society."


def test_component_votes_keeps_member_spans_and_reports_usage(nlp):
    build(
        nlp,
        [("Ada Lovelace", "person"), ("Royal Society", "organisation"), ("Babbage", "person")],
        [("Ada Lovelace", "person"), ("Paris", "location"), ("Royal Society", "organisation")],
    )
    doc = nlp(TEXT)
    assert [(e.text, e.label_) for e in doc.ents] == [
        ("Ada Lovelace", "person"),
        ("Paris", "location"),
        ("Royal Society", "organisation"),
    ]
    assert [s.text for s in doc.spans["vote:llm_a"]] == ["Ada Lovelace", "Babbage", "Royal Society"]
    assert [s.text for s in doc.spans["vote:rules"]] == ["Ada Lovelace", "Paris"]
    group = doc.spans["vote"]
    assert group.attrs["scores"] == [pytest.approx(1.0), pytest.approx(2 / 3), pytest.approx(2 / 3)]
    usage = doc._.llm_ner_usage
    assert usage["llm_a"]["calls"] == 1 and usage["llm_b"]["calls"] == 1 and usage["rules"]["calls"] == 0
    assert usage["vote"]["calls"] == 2 and usage["vote"]["docs"] == 1


def test_union_component_adds_what_the_other_members_found(nlp):
    build(
        nlp,
        [("Lovelace", "person"), ("Babbage", "person")],
        [("Royal Society", "organisation")],
        voting="union",
        threshold=0.9,  # unused by a union
    )
    doc = nlp(TEXT)
    # the rules' "Ada Lovelace" overlaps llm_a's "Lovelace": llm_a is listed first and keeps it
    assert [(e.text, e.label_) for e in doc.ents] == [
        ("Lovelace", "person"),
        ("Babbage", "person"),
        ("Paris", "location"),
        ("Royal Society", "organisation"),
    ]
    assert [s.text for s in doc.spans["vote"]] == ["Ada Lovelace", "Lovelace", "Babbage", "Paris", "Royal Society"]
    with pytest.raises(ValueError, match="voting='union' keeps every span"):
        spacy.blank("en").add_pipe("llm_ner_ensemble", config={"members": ["a"], "voting": "union", "validator": "a"})


def test_enabled_or_missing_members_are_named_in_the_error(nlp):
    build(nlp, [], [], ruler=False)
    nlp.enable_pipe("llm_b")
    with pytest.raises(ValueError, match="member 'llm_b' is enabled"):
        nlp("Paris.")
    nlp2 = spacy.blank("en")
    nlp2.add_pipe("llm_ner_ensemble", config={"members": ["nowhere"]})
    with pytest.raises(ValueError, match="'nowhere' is not a component"):
        nlp2("Paris.")
    with pytest.raises(ValueError, match="validator 'x' must be one of the members"):
        spacy.blank("en").add_pipe("llm_ner_ensemble", config={"members": ["a"], "validator": "x"})


def test_weighted_voting_fits_on_dev_and_round_trips(nlp, tmp_path):
    # llm_a is precise, llm_b adds a wrong span to every sentence; the rules only know two names.
    ens = build(
        nlp,
        [("Ada Lovelace", "person"), ("Royal Society", "organisation")],
        [("Ada Lovelace", "person"), ("Royal Society", "organisation"), ("the", "location")],
        voting="weighted",
    )
    dev = [
        {
            "text": f"Ada Lovelace wrote to the Royal Society in {y}.",
            "spans": [{"start": 0, "end": 12, "label": "person"}, {"start": 26, "end": 39, "label": "organisation"}],
        }
        for y in range(1840, 1850)
    ]
    ens.initialize(nlp=nlp, dev=dev)
    fitted = ens.fitted
    assert fitted["dev_f1"] == pytest.approx(1.0) and fitted["dev_f1"] > fitted["member_dev_f1"]["llm_b"]
    doc = nlp("Ada Lovelace wrote to the Royal Society in 1851.")
    assert [(e.text, e.label_) for e in doc.ents] == [("Ada Lovelace", "person"), ("Royal Society", "organisation")]
    nlp.to_disk(tmp_path / "p")
    back = spacy.load(tmp_path / "p")
    vote = back.get_pipe("vote")
    assert vote.weights == ens.weights and vote.threshold == pytest.approx(ens.threshold)
    assert {m: pytest.approx(w) for m, w in ens.label_weights.items()} == vote.label_weights
    for name in ("llm_a", "llm_b"):  # canned backends are not saved: put them back
        back.get_pipe(name).backend = nlp.get_pipe(name).backend
        back.get_pipe(name).constrained = False
    again = back("Ada Lovelace wrote to the Royal Society in 1851.")
    assert [(e.text, e.label_) for e in again.ents] == [(e.text, e.label_) for e in doc.ents]
    assert back.disabled == ["llm_a", "llm_b", "rules"]
    assert back.get_pipe("vote").from_bytes(ens.to_bytes()).weights == ens.weights


def test_union_fits_its_sources_on_dev_and_round_trips(nlp, tmp_path):
    # llm_a finds the person and calls "the" a location; llm_b finds the organisation and calls "in" a person
    ens = build(
        nlp,
        [("Ada Lovelace", "person"), ("the", "location")],
        [("Royal Society", "organisation"), ("in", "person")],
        ruler=False,
        voting="union",
    )
    text = "Ada Lovelace wrote to the Royal Society in 1851."
    assert len(nlp(text).ents) == 4  # a plain union keeps every span, the wrong ones too
    dev = [
        {
            "text": f"Ada Lovelace wrote to the Royal Society in {y}.",
            "spans": [{"start": 0, "end": 12, "label": "person"}, {"start": 26, "end": 39, "label": "organisation"}],
        }
        for y in range(1840, 1850)
    ]
    ens.initialize(nlp=nlp, dev=dev)
    assert ens.sources == {"location": ("llm_b",), "person": ("llm_a",)}  # llm_b never says location: none left
    assert ens.fitted["dev_f1"] == pytest.approx(1.0) and ens.fitted["union_dev_f1"] == pytest.approx(2 / 3)
    doc = nlp(text)
    assert [(e.text, e.label_) for e in doc.ents] == [("Ada Lovelace", "person"), ("Royal Society", "organisation")]
    assert [s.text for s in doc.spans["vote:llm_b"]] == ["Royal Society", "in"]  # each member's own spans stay
    nlp.to_disk(tmp_path / "p")
    back = spacy.load(tmp_path / "p")
    assert back.get_pipe("vote").sources == ens.sources
    for name in ("llm_a", "llm_b"):  # canned backends are not saved: put them back
        back.get_pipe(name).backend = nlp.get_pipe(name).backend
        back.get_pipe(name).constrained = False
    assert [(e.text, e.label_) for e in back(text).ents] == [(e.text, e.label_) for e in doc.ents]
    # initialized again without a dev set: a plain union again
    ens.initialize(nlp=nlp)
    assert ens.sources == {} and ens.fitted is None and len(nlp(text).ents) == 4
    # a saved vote naming a component that is not a member is refused, naming it
    votes = back.get_pipe("vote").vote_settings()
    votes["sources"] = {"person": ["llm_c"]}
    with pytest.raises(ValueError, match=r"vote: the saved vote's sources name \['llm_c'\]"):
        back.get_pipe("vote").use_vote_settings(votes)


def test_nlp_evaluate_scores_each_member_and_the_ensemble(nlp):
    build(nlp, [("Ada Lovelace", "person")], [("Paris", "location"), ("Royal Society", "organisation")])
    gold = nlp.make_doc(TEXT)
    gold.ents = [
        gold.char_span(0, 12, "person"),
        gold.char_span(28, 33, "location"),
        gold.char_span(41, 54, "organisation"),
    ]
    scores = nlp.evaluate([Example(nlp.make_doc(TEXT), gold)])
    assert scores["llm_a_ents_r"] == pytest.approx(1 / 3) and scores["llm_b_ents_r"] == pytest.approx(2 / 3)
    assert scores["rules_ents_p"] == 1.0
    assert scores["ents_f"] == pytest.approx(0.8)  # person, location (2 of 3 each); the organisation had 1 vote


def test_validation_asks_only_about_doubtful_spans(nlp):
    asked = []

    def logprobs(context, options):
        question = context.rsplit("\n", 1)[-1]
        asked.append(question)
        return [-0.1, -3.0] if "Babbage" in question else [-3.0, -0.1]  # yes only for Babbage

    scorer = FakeScorer(_answers([("Ada Lovelace", "person"), ("Babbage", "person"), ("Paris", "location")]), logprobs)
    build(
        nlp,
        scorer,
        [("Ada Lovelace", "person"), ("Paris", "location")],
        validator="llm_a",
        validate_band=0.2,
        threshold=0.5,
    )
    for name in ("llm_a", "llm_b"):
        nlp.get_pipe(name).lar = None
    nlp.get_pipe("llm_a").set_demonstrations(
        [
            {
                "text": "Bob went to Rome.",
                "spans": [{"start": 0, "end": 3, "label": "person"}, {"start": 12, "end": 16, "label": "location"}],
            }
        ]
    )
    doc = nlp(TEXT)
    # supports: Ada 3/3 and Paris 3/3 are safe; Babbage 1/3 is within 0.2 of 0.5: asked, and kept on "yes"
    assert [e.text for e in doc.ents] == ["Ada Lovelace", "Babbage", "Paris"]
    spans_asked = [q for q in asked if "N/A" not in q]
    assert spans_asked == ['Is "Babbage" a person?']
    assert doc._.llm_ner_usage["vote:validation"]["calls"] >= 1


class _RemoteMeeting(FakeBackend):
    """Two of these only answer when both are asked at once: proof that remote members run concurrently."""

    remote = True

    def __init__(self, barrier, answer):
        super().__init__(answer)
        self.barrier = barrier

    def generate(self, requests):
        self.barrier.wait(timeout=10)
        return super().generate(requests)


def test_remote_members_run_concurrently(nlp):
    barrier = threading.Barrier(2)
    build(
        nlp,
        _RemoteMeeting(barrier, _answers([("Paris", "location")])),
        _RemoteMeeting(barrier, _answers([("Paris", "location")])),
        ruler=False,
    )
    assert [e.text for e in nlp(TEXT).ents] == ["Paris"]


# ---- the real models -----------------------------------------------------------------------------------------
DEMOS = [
    {
        "text": "Angela Merkel visited Paris with the Social Democratic Party.",
        "spans": [
            {"start": 0, "end": 13, "label": "person"},
            {"start": 22, "end": 27, "label": "location"},
            {"start": 37, "end": 60, "label": "organisation"},
        ],
    },
    {
        "text": "Tony Blair led the Labour Party in London.",
        "spans": [
            {"start": 0, "end": 10, "label": "person"},
            {"start": 19, "end": 31, "label": "organisation"},
            {"start": 35, "end": 41, "label": "location"},
        ],
    },
]


@pytest.mark.model
def test_gemma_and_smollm2_ensemble_end_to_end(tmp_path):
    nlp = spacy.blank("en")
    for name, model in (("gemma", "gemma3-270m"), ("smol", "smollm2-135m")):
        proc = nlp.add_pipe(
            "llm_lar_ner",
            name=name,
            config={
                "labels": LABELS,
                "spans_key": name,
                "backend": {"@llm_models": "spacy_llmner.LlamaCpp.v1", "model": model},
            },
        )
        proc.set_demonstrations(DEMOS)
        nlp.disable_pipe(name)
    nlp.add_pipe("llm_ner_ensemble", config={"members": ["gemma", "smol"], "threshold": 0.0})
    texts = ["Angela Merkel visited Paris with the Social Democratic Party.", "Barack Obama spoke in Berlin."]
    docs = list(nlp.pipe(texts))
    # the demonstrated sentence: both members recover it, so the union-vote output is exactly its entities
    assert [(e.text, e.label_) for e in docs[0].ents] == [
        ("Angela Merkel", "person"),
        ("Paris", "location"),
        ("Social Democratic Party", "organisation"),
    ]
    for doc in docs:
        assert set(doc.spans) >= {"llm_ner_ensemble", "llm_ner_ensemble:gemma", "llm_ner_ensemble:smol"}
        union = {(s.start, s.end) for m in ("gemma", "smol") for s in doc.spans[f"llm_ner_ensemble:{m}"]}
        assert {(e.start, e.end) for e in doc.ents} <= union
        usage = doc._.llm_ner_usage
        assert usage["gemma"]["calls"] == 1 and usage["smol"]["calls"] == 1
        assert (
            usage["llm_ner_ensemble"]["prompt_tokens"]
            == usage["gemma"]["prompt_tokens"] + usage["smol"]["prompt_tokens"]
        )
    nlp.to_disk(tmp_path / "ens")
    back = spacy.load(tmp_path / "ens")
    assert [(e.text, e.label_) for e in back(texts[0]).ents] == [(e.text, e.label_) for e in docs[0].ents]


def test_non_llm_members_do_not_inherit_entities_left_by_earlier_components(nlp):
    # an enabled component before the ensemble (e.g. a LAR source) leaves "Royal Society"; spaCy's ner would keep
    # such entities as its own, so a non-LLM member starts from a doc without them
    source = nlp.add_pipe("entity_ruler", name="source")
    source.add_patterns([{"label": "ORG", "pattern": "Royal Society"}])
    build(nlp, [("Paris", "location")], [("Paris", "location")])
    doc = nlp(TEXT)
    assert [s.text for s in doc.spans["vote:rules"]] == ["Ada Lovelace", "Paris"]
    assert "Royal Society" not in [e.text for e in doc.ents]
