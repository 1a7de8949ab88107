"""Quality where users are (issue 26): whole documents, label sets the adapter never saw, lower-cased text, nested
entities; one command for the whole table, published zero-shot peers beside ours.

Every LLM row runs the shipped default pipeline (``nlp.add_pipe("llm_lar_ner")``: Gemma 3 270M, the shipped
adapter, the fast engine) with span retrieval of k demonstrations from a pool, on a set's full test split, scored
strict (exact span and type). All rows share one answer cache (--cache): a prompt two rows send alike is decoded once.

Sections (--sections):
  paragraphs  per CrossNER domain (--domains): the test split one sentence per Doc, then --per consecutive sentences
              per Doc with no boundaries given (the component finds them) and with the gold boundaries as
              ``doc.sents``; k = 3 from the domain's train split
  lodo        leave-one-domain-out: per domain, the adapter tuned without that domain (--lodo-adapters
              politics=PATH,...), the domain's train split as the only pool, k in --ks (0 / 3 / 8). A domain without
              such an adapter runs the shipped one, which saw the domain's train split: its rows say
              ``in_domain_adapter: true`` and are not leave-one-domain-out figures
  extra       each set of <data>/extra (--extra): its test split, or a seeded held-out 30 % where it has none; 200
              seeded train sentences as the pool (--pool), k = 3; beside it a spaCy tok2vec NER (configs/student.cfg)
              trained on the same 200 (checkpoint picked on 100 other train sentences: an advantage the LLM rows lack)
  genia       GENIA nested: --pool train sentences as the pool, k = 3, every span (nested too) scored
--variants cased,lower: each row as it is and with every text (test, pool, training) lower-cased.
--adapter: the adapter of every row that has no leave-one-domain-out adapter (default: the shipped default; a
shipped name, or NAME=PATH for a GGUF LoRA file); each row's key ends in @ its name, so the tables of two adapters
("before" and "after") sit side by side in one file. --lodo-tag names the leave-one-domain-out adapters' rows.
--extra-split dev scores the extra sets on --dev seeded train sentences outside the pool and the spaCy model's
checkpoint sentences (for choosing between adapters: wikigold and re3d are in no adapter's tuning data).
--limit N: the first N test sentences of each CrossNER domain (paragraphs, lodo); 0 = the full split.
--pool-fit: every LLM row's pipeline also fits itself to its pool when initialized (``spacy_llmner.PoolFit.v1``: the
pool's lexicon and a threshold per label, found by annotating the pool, each doc without itself); its rows are
named @<adapter>+fit and record what the fit measured on the pool and how long it took.
--union-spacy (with --pool-fit): each extra set also gets a row @<adapter>+fit+spacy, configs/pool_student.cfg: the
fitted LLM and the row's spaCy model (the same one, so the same 200 sentences and 100 more for its checkpoint) in an
``llm_ner_ensemble`` that keeps the union of their spans; with --extra-split dev the spaCy model is trained there too.
--union-sources N (with --union-spacy, test split): each extra set also gets a row @<adapter>+fit+spacy+sources, the
same union keeping, per label, every member's spans or one member's alone, as chosen on N seeded train sentences
outside the pool and the spaCy model's checkpoint sentences (the ensemble's ``initialize(dev=...)``); the row also
scores each member alone and their plain union on the same pass.
--pool-tune CONFIG (extra sets): each row's adapter is first tuned further on the row's own pool (the cased or the
lower-cased one) by ``spacy-llmner finetune CONFIG`` (configs/finetune_pool.cfg: ner-v2's own LoRA, the pool's sentences
as the default pipeline prompts them), once per --work folder; its rows are named @<adapter>+tuned (then +fit ...)
and record the tuning's examples and seconds.

Each row is written to --out (and --out's .md) once measured; a rerun skips the rows already there (--fresh
measures them again), so a stopped run resumes. The table states the run's wall and CPU seconds.

    python benchmarks/real_use.py --data ../shared/data --out metrics/real_use.json
"""

import argparse
import datetime
import json
import platform
import random
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import spacy
from spacy.tokens import Doc, DocBin, Span

from spacy_llmner.annotation import distill as D
from spacy_llmner.backends.llamacpp import DEFAULT_ADAPTERS, DEFAULT_DEMONSTRATIONS, TORCH_ENGINE_REVISION
from spacy_llmner.corpora import read_bio, read_jsonl
from spacy_llmner.ensemble import flat_spans, prf, union

from common import CROSSNER_LABELS, annotate_and_score, cpu_name, load_split
from documents import inputs, paragraphs

SECTIONS = ("paragraphs", "lodo", "extra", "genia")
PARAGRAPH_CONDITIONS = ("sentences", "sentencizer", "doc_sents")
ORG = {"PER": "person", "ORG": "organisation", "LOC": "location", "MISC": "misc"}
# set → (folder under --data, train files, test files or None for a seeded held-out part, label names given to the
# model; None: the set's own names, lower-cased). "fixture": the test suite's smoke run (a CrossNER fixture split).
EXTRA = {
    "wikigold": ("extra/wikigold", ["wikigold.conll.txt"], None, ORG),
    "btc": ("extra/btc", [f"{s}.conll" for s in "abegh"], ["f.conll"], ORG),
    "sec_filings": ("extra/sec_filings", ["train.FIN5.txt"], ["test.FIN3.txt"], ORG),
    "anem": ("extra/anem", ["AnEM.train"], ["AnEM.test"], None),
    "re3d": ("extra/re3d", ["*/*.conll"], None, None),
    "fixture": ("crossner/conll2003", ["train.txt"], ["test.txt"], None),
}
GENIA_INSTRUCTIONS = (
    "Find the biomedical named entities in each sentence and give the type of each one. "
    "Entities may lie inside other entities: list both."
)
# Published zero-shot figures on the CrossNER domains (strict F1; no example of the domain seen), as quoted in issue 26
PEERS = {
    "GLiNER-L (0.3 B), zero-shot": (
        {"politics": 72.6, "science": 62.6, "music": 69.6, "literature": 64.4, "ai": 57.2},
        "Zaratiana et al., GLiNER (NAACL 2024), its own table",
    ),
    "GLiNER-L, re-scored": (
        {"politics": 74.8, "science": 69.4, "music": 69.5, "literature": 68.4, "ai": 60.6},
        "Ding et al., GNER (2024), its zero-shot table",
    ),
    "NuNER Zero-span": (
        {"politics": 72.7, "science": 66.4, "music": 69.9, "literature": 64.9, "ai": 60.1},
        "numind/NuNER_Zero-span model card",
    ),
    "GNER-T5-base (248 M)": (
        {"politics": 64.5, "science": 68.0, "music": 72.3, "literature": 58.7, "ai": 56.8},
        "Ding et al., GNER (2024)",
    ),
}


# -- data -----------------------------------------------------------------------------------------------------------


def relabelled(docs: List[Doc], names: Optional[Dict[str, str]]) -> List[Doc]:
    """The docs' entities renamed (``names``; None: lower-cased), dropping empty sentences."""
    names, out = names or {}, []
    for doc in docs:
        if not doc.text.strip():
            continue
        doc.ents = [Span(doc, e.start, e.end, names.get(e.label_, e.label_.lower())) for e in doc.ents]
        out.append(doc)
    return out


def extra_set(data: Path, name: str, vocab, seed: int) -> Tuple[List[Doc], List[Doc]]:
    """(train, test) of an extra set, gold labels renamed; a set without a test split is split 70 / 30, seeded."""
    where, train_files, test_files, names = EXTRA[name]
    folder = data / where

    def read(patterns):
        return [d for p in patterns for f in sorted(folder.glob(p)) for d in read_bio(f, vocab)]

    train = relabelled(read(train_files), names)
    if not train:
        raise SystemExit(f"real_use: no sentences for the extra set {name!r} under {folder}")
    if test_files:
        return train, relabelled(read(test_files), names)
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    cut = int(0.7 * len(order))
    return [train[i] for i in sorted(order[:cut])], [train[i] for i in sorted(order[cut:])]


def lowered(docs: List[Doc]) -> List[Doc]:
    """Copies with every word lower-cased: same tokens, spaces, sentence starts, entities and span groups."""
    out = []
    for d in docs:
        has_sents = d.has_annotation("SENT_START")
        new = Doc(
            d.vocab,
            words=[t.text.lower() for t in d],
            spaces=[bool(t.whitespace_) for t in d],
            sent_starts=[bool(t.is_sent_start) for t in d] if has_sents else None,
        )
        new.ents = [Span(new, e.start, e.end, e.label_) for e in d.ents]
        for key, group in d.spans.items():
            new.spans[key] = [Span(new, s.start, s.end, s.label_) for s in group]
        out.append(new)
    return out


def sample(docs: List[Doc], n: int, seed: int, skip: int = 0) -> List[Doc]:
    """``n`` docs of a seeded order, after its first ``skip``."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    return [docs[i] for i in order[skip : skip + n]]


# -- rows -----------------------------------------------------------------------------------------------------------


PIPELINES: Dict[Tuple[str, bool], object] = {}  # (adapter, nested) → its pipeline: the model loads once per run


def pipeline(args, labels: List[str], pool: List[Doc], k: int, adapter: str = "auto", nested: bool = False):
    """The shipped default pipeline with span retrieval of ``k`` from ``pool`` (nested: every span kept in "sc"),
    initialized afresh for this row (labels, pool, k) and otherwise reused."""
    if (adapter, nested) not in PIPELINES:
        nlp = spacy.blank("en")
        config = {
            "labels": list(labels),
            "cache_path": args.cache,
            "retriever": {"@misc": "spacy_llmner.Retriever.v1", "strategy": "span", "k": k},
            "backend": {"@llm_models": "spacy_llmner.LlamaCpp.v1", "adapter": adapter, "engine": args.engine},
        }
        if nested:
            config.update(spans_key="sc", instructions=GENIA_INSTRUCTIONS)
        if args.pool_fit:
            config["pool_fit"] = {"@misc": "spacy_llmner.PoolFit.v1"}
        nlp.add_pipe("llm_lar_ner", config=config)
        PIPELINES[(adapter, nested)] = nlp
    nlp = PIPELINES[(adapter, nested)]
    ner = nlp.get_pipe("llm_lar_ner")
    ner.retriever.k = k
    ner.initialize(pool=pool, labels=list(labels))
    return nlp


def run_llm(args, nlp, gold: List[Doc], docs: Optional[List[Doc]] = None, nested: bool = False, more=None) -> Dict:
    """Strict P / R / F1 of ``nlp`` on unannotated copies of ``gold`` (or on ``docs``), with its usage and time, and
    what its pipeline fitted to the pool (--pool-fit); ``more`` as in ``annotate_and_score``."""
    row = annotate_and_score(nlp, gold, docs, args.batch_size, nested, more)
    fit = nlp.get_pipe("llm_lar_ner").pool_fit  # what this row's initialize fitted, its seconds included
    if fit is not None:
        row["pool_fit"] = {**fit.report, "thresholds": dict(fit.thresholds)}
    return row


def spacy_model(args, key: str) -> Path:
    """Where ``train_spacy`` keeps the model of the row ``key`` (its model-best)."""
    return Path(args.work) / key.replace("/", "_") / "model" / "model-best"


def train_spacy(args, key: str, pool: List[Doc], dev: List[Doc]) -> Path:
    """A spaCy tok2vec NER (configs/student.cfg) trained on ``pool``, its checkpoint picked on ``dev``, once per
    --work folder; its model-best."""
    best = spacy_model(args, key)
    folder = best.parent.parent
    if best.exists():
        return best
    folder.mkdir(parents=True, exist_ok=True)
    DocBin(docs=pool).to_disk(folder / "train.spacy")
    DocBin(docs=dev).to_disk(folder / "dev.spacy")
    overrides = {
        "paths.train": folder / "train.spacy",
        "paths.silver": None,
        "paths.dev": folder / "dev.spacy",
        "vars.max_steps": args.spacy_steps,
        "vars.eval_frequency": args.spacy_eval_every,
        "training.patience": args.spacy_patience,
        "system.seed": args.seed,
    }
    D.train_student("configs/student.cfg", folder / "model", overrides)
    return best


def run_spacy(args, key: str, pool: List[Doc], dev: List[Doc], test: List[Doc]) -> Dict:
    """The spaCy model of ``train_spacy``; its test P / R / F1 and seconds (training included)."""
    t0 = time.perf_counter()
    best = train_spacy(args, key, pool, dev)
    return {**D.score(best, test), "docs": len(test), "seconds": time.perf_counter() - t0}


UNION_CONFIG = "configs/pool_student.cfg"


def pool_tuned(args, key: str, pool: List[Doc]) -> Tuple[str, Dict]:
    """The adapter tuned further on ``pool`` by ``spacy-llmner finetune`` with the config ``args.pool_tune`` (for
    the row ``key``, once per --work folder): its GGUF file and its tuning summary."""
    from spacy_llmner.finetune import finetune, load_settings

    folder = Path(args.work) / (key.replace("/", "_") + "_tuned")
    if not (folder / "adapter.gguf").exists():
        folder.mkdir(parents=True, exist_ok=True)
        DocBin(docs=pool).to_disk(folder / "pool.spacy")
        overrides = {"paths.pool": str(folder / "pool.spacy"), "data.names": [key.split("/")[1]]}
        finetune(load_settings(Path(args.pool_tune), overrides), folder)
    summary = json.loads((folder / "tuning.json").read_text())
    tuning = {"config": args.pool_tune, "examples": summary["examples"], "seconds": summary["seconds"]}
    return str(folder / "adapter.gguf"), tuning


def union_pipeline(
    args, labels: List[str], pool: List[Doc], student: Path, dev: Optional[List[Doc]] = None, adapter: str = ""
):
    """``UNION_CONFIG`` assembled for this row: the LLM as ``pipeline`` builds it with the pool fit (its adapter:
    ``adapter`` or else ``args.adapter``), the spaCy model ``student`` beside it, their spans united (per label as
    chosen on ``dev``, when given)."""
    overrides = {
        "paths.student": str(student),
        "components.llm_lar_ner.cache_path": args.cache,
        "components.llm_lar_ner.backend.adapter": adapter or args.adapter,
        "components.llm_lar_ner.backend.engine": args.engine,
    }
    nlp = spacy.util.load_model_from_config(spacy.util.load_config(UNION_CONFIG, overrides=overrides), auto_fill=True)
    members = {"llm_lar_ner": {"pool": pool, "labels": list(labels)}}
    nlp.get_pipe("llm_ner_ensemble").initialize(members=members, dev=dev)
    return nlp


def union_breakdown(ensemble: str, members: List[str]):
    """For ``annotate_and_score(more=...)``: F1 / P / R of each member alone (its own flat spans) and of the members'
    plain union, from the member groups the ensemble ``ensemble`` left on the predicted docs."""

    def more(examples) -> Dict:
        gold = [[(e.start, e.end, e.label_) for e in eg.reference.ents] for eg in examples]
        outputs = [
            {m: [(s.start, s.end, s.label_) for s in eg.predicted.spans[f"{ensemble}:{m}"]] for m in members}
            for eg in examples
        ]
        systems = {m: [flat_spans(o[m]) for o in outputs] for m in members}
        systems["union"] = [union(o).spans() for o in outputs]
        scores = {name: prf(pred, gold) for name, pred in systems.items()}
        return {
            "breakdown": {
                name: {"f1": 100 * s.fscore, "p": 100 * s.precision, "r": 100 * s.recall} for name, s in scores.items()
            }
        }

    return more


class Table:
    """The measured rows (resumable) and the report."""

    def __init__(self, args):
        self.args, self.path = args, Path(args.out)
        old = json.loads(self.path.read_text()) if self.path.exists() and not args.fresh else {}
        self.rows: Dict[str, Dict] = old.get("rows", {})
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        self.spent = old.get("cpu_seconds", 0.0), old.get("wall_seconds", 0.0)

    def has(self, key: str) -> bool:
        """Measured, and not by an earlier torch engine (its rows are measured again)."""
        return key in self.rows and not (self.args.engine == "torch" and stale(key, self.rows[key]))

    def add(self, key: str, row: Dict) -> None:
        if "@" in key:  # an LLM row: which engine's answers it scores
            row["engine"] = self.args.engine
            if self.args.engine == "torch":
                row["engine_revision"] = TORCH_ENGINE_REVISION
                # how it read demonstrations (rows without this field read them in sequence: before 2026-12-06)
                row["demonstrations"] = DEFAULT_DEMONSTRATIONS
        self.rows[key] = row
        what = f"F1 {row['f1']:.1f} (P {row['p']:.1f} R {row['r']:.1f}, {row['docs']} docs)"
        print(f"  {key}: {what}", flush=True)
        self.write()

    def write(self) -> Dict:
        result = {
            "args": {k: str(v) for k, v in vars(self.args).items()},
            "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu": cpu_name()},
            "date": datetime.date.today().isoformat(),
            "cpu_seconds": self.spent[0] + time.process_time() - self.c0,
            "wall_seconds": self.spent[1] + time.perf_counter() - self.t0,
            "rows": self.rows,
            "peers": {name: {"f1": f1, "source": src} for name, (f1, src) in PEERS.items()},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(result, indent=1))
        self.path.with_suffix(".md").write_text(markdown(result))
        return result


# -- sections -------------------------------------------------------------------------------------------------------


def crossner(args, domain: str, variant: str) -> Tuple[List[Doc], List[Doc]]:
    """(test, train) of a CrossNER domain, lower-cased for the "lower" variant."""
    test, train = (load_split(args.data, domain, split, spacy.blank("en")) for split in ("test", "train"))
    test = test[: args.limit] if args.limit else test
    return (lowered(test), lowered(train)) if variant == "lower" else (test, train)


def section_paragraphs(args, table: Table) -> None:
    for domain in args.domains:
        for variant in args.variants:
            keys = {c: f"paragraphs/{domain}/{c}/{variant}@{args.adapter_name}" for c in PARAGRAPH_CONDITIONS}
            todo = [c for c, key in keys.items() if not table.has(key)]
            if not todo:
                continue
            gold, pool = crossner(args, domain, variant)
            nlp = pipeline(args, CROSSNER_LABELS[domain].split(), pool, 3, args.adapter)
            docs = paragraphs(gold, args.per, nlp.vocab)
            for condition in todo:
                if condition == "sentences":
                    row = run_llm(args, nlp, gold)
                else:
                    row = run_llm(args, nlp, docs, inputs(docs, nlp.vocab, condition == "doc_sents"))
                    row["sentences"] = len(gold)
                table.add(keys[condition], row)


def section_lodo(args, table: Table) -> None:
    for domain in args.domains:
        adapter = args.lodo_adapters.get(domain, args.adapter)
        tag = args.lodo_tag if domain in args.lodo_adapters else args.adapter_name
        for variant in args.variants:
            todo = [k for k in args.ks if not table.has(f"lodo/{domain}/k{k}/{variant}@{tag}")]
            gold, pool = crossner(args, domain, variant) if todo else ([], [])
            for k in todo:
                key = f"lodo/{domain}/k{k}/{variant}@{tag}"
                nlp = pipeline(args, CROSSNER_LABELS[domain].split(), pool, k, adapter)
                row = run_llm(args, nlp, gold)
                row.update(k=k, adapter=adapter, in_domain_adapter=domain not in args.lodo_adapters)
                table.add(key, row)


def section_extra(args, table: Table) -> None:
    for name in args.extra:
        train, test = extra_set(Path(args.data), name, spacy.blank("en").vocab, args.seed)
        pool, dev = sample(train, args.pool, args.seed), sample(train, args.spacy_dev, args.seed, skip=args.pool)
        section = "extra"
        if args.extra_split == "dev":  # train sentences outside the pool and the spaCy checkpoint's sentences
            section, test = "extra-dev", sample(train, args.dev, args.seed, skip=args.pool + args.spacy_dev)
        labels = sorted({e.label_ for d in train + test for e in d.ents})
        for variant in args.variants:
            lower = variant == "lower"
            v_test, v_pool, v_dev = (lowered(x) if lower else x for x in (test, pool, dev))
            key = f"{section}/{name}/{variant}"
            adapter, tuning = args.adapter, {}
            if args.pool_tune:  # the adapter tuned further on this row's pool (the cased or lower-cased one)
                adapter, tuning = pool_tuned(args, f"extra/{name}/{variant}", v_pool)
            if not table.has(f"{key}@{args.adapter_name}"):
                row = run_llm(args, pipeline(args, labels, v_pool, 3, adapter), v_test)
                row.update(k=3, pool=len(pool), labels=labels, **({"pool_tune": tuning} if tuning else {}))
                table.add(f"{key}@{args.adapter_name}", row)
            united = args.union_spacy and not table.has(f"{key}@{args.adapter_name}+spacy")
            # a union row whose spaCy model is trained again (another --work folder, a new checkout) scores the
            # spaCy row again too: training is not bit-for-bit the same across machines, and the two rows must
            # share one model
            again = united and not spacy_model(args, f"{key}/spacy").exists()
            if (section == "extra" or args.union_spacy) and (again or not table.has(f"{key}/spacy")):
                table.add(f"{key}/spacy", {**run_spacy(args, f"{key}/spacy", v_pool, v_dev, v_test), "pool": len(pool)})
            if united:
                student = train_spacy(args, f"{key}/spacy", v_pool, v_dev)
                row = run_llm(args, union_pipeline(args, labels, v_pool, student, adapter=adapter), v_test)
                row.update(k=3, pool=len(pool), labels=labels, config=UNION_CONFIG)
                table.add(f"{key}@{args.adapter_name}+spacy", row)
            if args.union_sources and not table.has(f"{key}@{args.adapter_name}+spacy+sources"):
                student = train_spacy(args, f"{key}/spacy", v_pool, v_dev)
                chosen_on = sample(train, args.union_sources, args.seed, skip=args.pool + args.spacy_dev)
                nlp = union_pipeline(
                    args, labels, v_pool, student, lowered(chosen_on) if lower else chosen_on, adapter=adapter
                )
                ensemble = nlp.get_pipe("llm_ner_ensemble")
                row = run_llm(args, nlp, v_test, more=union_breakdown(ensemble.name, ensemble.members))
                votes = ensemble.vote_settings()
                fitted = {**votes["fitted"], "sources": votes["sources"]}
                row.update(k=3, pool=len(pool), labels=labels, config=UNION_CONFIG, fitted=fitted)
                table.add(f"{key}@{args.adapter_name}+spacy+sources", row)
            if args.pool_tune:  # one model per row: the next row's adapter is another
                PIPELINES.pop((adapter, False), None)


def section_genia(args, table: Table) -> None:
    todo = [v for v in args.variants if not table.has(f"genia/nested/{v}@{args.adapter_name}")]
    if not todo:
        return
    prefix = args.genia or str(Path(args.data) / "genia" / "genia_nested")
    train, gold = (read_jsonl(f"{prefix}.{split}.jsonl", spacy.blank("en")) for split in ("train", "test"))
    labels = sorted({s.label_ for d in train for s in d.spans["sc"]})
    for variant in todo:
        key = f"genia/nested/{variant}@{args.adapter_name}"
        test, pool = gold, sample(train, args.pool, args.seed)
        if variant == "lower":
            test, pool = lowered(test), lowered(pool)
        nlp = pipeline(args, labels, pool, 3, args.adapter, nested=True)
        row = run_llm(args, nlp, test, nested=True)
        row.update(k=3, pool=len(pool), spans=sum(len(d.spans["sc"]) for d in test))
        table.add(key, row)


# -- report ---------------------------------------------------------------------------------------------------------


# The torch engine's revision (``backends.llamacpp.TORCH_ENGINE_REVISION``, in answer caches' identities) that fixed
# answers an earlier one got wrong: its attention masks by token position. Later revisions changed rounding only
# (3: decoding attention sums bfloat16 in another order), and rows measured by them stand.
FIXED_IN_REVISION = 2


def stale(key: str, row: Dict) -> bool:
    """An LLM row (its key names an adapter after @) measured by a torch engine older than FIXED_IN_REVISION (rows
    without an engine are the torch engine's, the default)."""
    torch = row.get("engine", "torch") == "torch"
    return "@" in key and torch and row.get("engine_revision", 1) < FIXED_IN_REVISION


STALE_NOTE = (
    "† measured by an earlier torch engine (before its attention masks followed token positions: a short prompt "
    "decoded beside a longer one lost part of its sliding window); a rerun measures these rows again."
)


def cell(rows: Dict, key: str, gap_to: Optional[str] = None) -> str:
    if key not in rows:
        return "—"
    text = f"{rows[key]['f1']:.1f}" + ("†" if stale(key, rows[key]) else "")
    if gap_to and gap_to in rows:
        text += f" ({rows[key]['f1'] - rows[gap_to]['f1']:+.1f})"
    return text


def adapters_of(rows: Dict, prefix: str) -> List[str]:
    """The adapter names (key suffixes after @) of the rows whose keys start with ``prefix``, in first-seen order."""
    return list(dict.fromkeys(k.partition("@")[2] for k in rows if k.startswith(prefix) and "@" in k))


def markdown(result: Dict) -> str:
    rows, args = result["rows"], result["args"]
    domains = ["politics", "science", "music", "literature", "ai"]
    variants = [v for v in ("cased", "lower") if any(f"/{v}@" in k or f"/{v}/" in k for k in rows)]
    out = [
        "# Quality where users are",
        "",
        f"`python benchmarks/real_use.py` ({result['date']}, {result['machine']['cpu']}): "
        f"{result['wall_seconds'] / 60:.0f} min wall, {result['cpu_seconds'] / 60:.0f} min CPU so far. "
        f"Engine {args.get('engine')}; strict F1; Gemma 3 270M with the adapter each row names (after @), span "
        "retrieval. Sentence counts are given per row where a row ran on part of a split.",
        "",
    ]
    if any(k.startswith("paragraphs/") for k in rows):
        out += [
            f"## Documents: {args.get('per')} consecutive sentences per Doc (F1, gap to one sentence per Doc), k = 3",
            "",
            "| domain | variant | adapter | sentences | one per Doc | no boundaries given | boundaries from "
            "doc.sents |",
            "|---|---|---|---|---|---|---|",
        ]
        for a in adapters_of(rows, "paragraphs/"):
            for d in domains:
                for v in variants:
                    base = f"paragraphs/{d}/sentences/{v}@{a}"
                    if base in rows:
                        cells = [cell(rows, f"paragraphs/{d}/{c}/{v}@{a}", base) for c in PARAGRAPH_CONDITIONS[1:]]
                        n = rows[base]["docs"]
                        out.append(f"| {d} | {v} | {a} | {n} | {cell(rows, base)} | {' | '.join(cells)} |")
        out.append("")
    lodo = sorted({k.split("/")[2] for k in rows if k.startswith("lodo/")}, key=lambda s: int(s[1:]))
    if lodo:
        out += [
            "## CrossNER: the domain's train split as the only pool (F1; sentences per domain after the label)",
            "",
            "Rows marked * ran an adapter tuned on that domain's train split: not leave-one-domain-out.",
            "",
            "| system | " + " | ".join(domains) + " | average |",
            "|---|" + "---|" * (len(domains) + 1),
        ]
        for tag in adapters_of(rows, "lodo/"):
            for v in variants:
                for k in lodo:
                    keys = [f"lodo/{d}/{k}/{v}@{tag}" for d in domains]
                    if not any(key in rows for key in keys):
                        continue
                    f1 = [rows[key]["f1"] for key in keys if key in rows]
                    marks = ["*" if rows.get(key, {}).get("in_domain_adapter") else "" for key in keys]
                    cells = [cell(rows, key) + m for key, m in zip(keys, marks)]
                    sizes = [rows[key]["docs"] for key in keys if key in rows]  # in the domains' order
                    avg = f"{sum(f1) / len(f1):.1f}" if len(f1) == len(domains) else "—"
                    label = f"ours ({tag}), k = {k[1:]}, {v}, n = {'/'.join(map(str, sizes))}"
                    out.append(f"| {label} | " + " | ".join(cells) + f" | {avg} |")
        for name, (f1, source) in PEERS.items():
            avg = sum(f1.values()) / len(f1)
            out.append(f"| {name} ({source}) | " + " | ".join(f"{f1[d]:.1f}" for d in domains) + f" | {avg:.1f} |")
        out.append("")
    titles = {"extra": "test split or held-out 30 %", "extra-dev": "dev: train sentences outside the pool"}
    for section, title in titles.items():
        names = sorted({k.split("/")[1] for k in rows if k.startswith(section + "/")})
        if not names:
            continue
        adapters = adapters_of(rows, section + "/")
        has_spacy = any(k.startswith(section + "/") and k.endswith("/spacy") for k in rows)
        spacy_col = " | spaCy tok2vec on the same sentences" if has_spacy else ""
        out += [
            f"## Other domains and label sets, {title}: {args.get('pool')} of the set's own sentences as the pool, "
            "k = 3 (F1 / P / R)",
            "",
            "| set | variant | sentences | " + " | ".join(f"ours ({a})" for a in adapters) + spacy_col + " |",
            "|---|---|---|" + "---|" * (len(adapters) + bool(spacy_col)),
        ]
        for name in names:
            for v in variants:
                ours = [rows.get(f"{section}/{name}/{v}@{a}") for a in adapters]
                theirs = rows.get(f"{section}/{name}/{v}/spacy")
                seen = [r for r in ours + [theirs] if r]
                if seen:
                    cells = [prf_text(r, f"{section}/{name}/{v}@{a}") for r, a in zip(ours, adapters)]
                    cells += [prf_text(theirs)] if spacy_col else []
                    out.append(f"| {name} | {v} | {seen[0]['docs']} | " + " | ".join(cells) + " |")
        out.append("")
        if any(a.endswith("+spacy") for a in adapters):
            out += [
                "+spacy: the union of the fitted LLM's spans and the spaCy model's of the same row "
                f"(`{UNION_CONFIG}`, overlaps to the LLM).",
                "",
            ]
        if any("+tuned" in a for a in adapters):
            tuned = [r["pool_tune"] for k, r in rows.items() if k.startswith(section + "/") and "pool_tune" in r]
            out += [
                f"+tuned: the adapter tuned further on the row's own pool (`{tuned[0]['config']}`, "
                f"{max(t['examples'] for t in tuned)} examples at most, "
                f"{max(t['seconds']['train'] for t in tuned) / 60:.0f} min of CPU training at most per set).",
                "",
            ]
        if any(a.endswith("+sources") for a in adapters):
            chosen_on = max(
                r["fitted"]["dev_docs"] for k, r in rows.items() if k.startswith(section + "/") and "fitted" in r
            )
            out += [
                f"+sources: the same union keeping, per label, every member's spans or one member's alone, as chosen "
                f"on {chosen_on} train sentences outside the pool and the spaCy model's checkpoint sentences.",
                "",
            ]
    genia = [k for k in rows if k.startswith("genia/")]
    if genia:
        out += ["## GENIA nested (every span, nested ones too)", ""]
        out += ["| variant | adapter | test sentences | F1 / P / R |", "|---|---|---|---|"]
        for k in sorted(genia):
            stem, _, a = k.partition("@")
            out.append(f"| {stem.split('/')[-1]} | {a} | {rows[k]['docs']} | {prf_text(rows[k], k)} |")
        out.append("")
    if any(stale(k, r) for k, r in rows.items()):
        out += [STALE_NOTE, ""]
    return "\n".join(out)


def prf_text(row: Optional[Dict], key: str = "") -> str:
    return f"{row['f1']:.1f} / {row['p']:.1f} / {row['r']:.1f}" + ("†" if stale(key, row) else "") if row else "—"


def main(argv: Optional[List[str]] = None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--domains", default="politics,science,music,literature,ai")
    ap.add_argument("--extra", default=",".join(n for n in EXTRA if n != "fixture"), help="extra sets")
    ap.add_argument("--genia", default=None, help="GENIA files' prefix (default <data>/genia/genia_nested)")
    ap.add_argument("--variants", default="cased,lower")
    ap.add_argument("--ks", default="0,3,8", help="demonstrations per prompt in the lodo section")
    ap.add_argument("--lodo-adapters", default="", help="domain=adapter (a GGUF LoRA path or a shipped name),...")
    ap.add_argument("--lodo-tag", default="lodo", help="the key suffix of rows run with --lodo-adapters")
    ap.add_argument("--adapter", default="auto", help="the other rows' adapter: auto, a shipped name or NAME=PATH")
    ap.add_argument("--extra-split", default="test", choices=["test", "dev"])
    ap.add_argument("--dev", type=int, default=200, help="sentences per extra set with --extra-split dev")
    ap.add_argument("--limit", type=int, default=0, help="test sentences per CrossNER domain (0: all)")
    ap.add_argument("--per", type=int, default=8, help="sentences per document (paragraphs)")
    ap.add_argument("--pool", type=int, default=200, help="pool sentences of the extra sets and GENIA")
    ap.add_argument("--spacy-dev", type=int, default=100, help="sentences the spaCy model's checkpoint is picked on")
    ap.add_argument("--spacy-steps", type=int, default=2000)
    ap.add_argument("--spacy-eval-every", type=int, default=100)
    ap.add_argument("--spacy-patience", type=int, default=800)
    ap.add_argument("--engine", default="torch", choices=["torch", "llama.cpp"])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default="training/real_use/cache.sqlite", help="the answer cache all rows share")
    ap.add_argument("--work", default="training/real_use", help="the spaCy baselines' training folders")
    ap.add_argument("--fresh", action="store_true", help="measure every row again")
    ap.add_argument("--pool-fit", action="store_true", help="LLM rows fit lexicon and thresholds to their pool")
    ap.add_argument("--union-spacy", action="store_true", help="extra sets: also the fitted LLM united with spaCy")
    ap.add_argument(
        "--union-sources", type=int, default=0, help="extra sets: also the union per label, chosen on N sentences"
    )
    ap.add_argument(
        "--pool-tune",
        default="",
        help="extra sets: the adapter tuned further on each row's pool (a finetune config: configs/finetune_pool.cfg)",
    )
    ap.add_argument("--out", default="metrics/real_use.json")
    args = ap.parse_args(argv)
    args.domains, args.extra, args.variants = (
        s.split(",") if s else [] for s in (args.domains, args.extra, args.variants)
    )
    args.ks = [int(k) for k in args.ks.split(",")]
    args.lodo_adapters = dict(pair.split("=", 1) for pair in args.lodo_adapters.split(",") if pair)
    args.adapter_name, _, path = args.adapter.partition("=")
    args.adapter = path or args.adapter
    if args.adapter_name == "auto":
        args.adapter_name = DEFAULT_ADAPTERS["gemma3-270m"]
    if args.pool_tune:
        if args.sections != "extra":
            raise SystemExit("real_use: --pool-tune tunes on the extra sets' pools: give --sections extra")
        args.adapter_name += "+tuned"
    if args.pool_fit:
        args.adapter_name, args.lodo_tag = args.adapter_name + "+fit", args.lodo_tag + "+fit"
    elif args.union_spacy:
        raise SystemExit("real_use: --union-spacy unites the fitted LLM with spaCy: give --pool-fit too")
    if args.union_sources and not (args.union_spacy and args.extra_split == "test"):
        raise SystemExit(
            "real_use: --union-sources chooses the union's sources on train sentences outside the pool: give "
            "--union-spacy, and score the test split (its sentences are --extra-split dev's)"
        )
    sections = args.sections.split(",")
    unknown = [s for s in sections if s not in SECTIONS] + [s for s in args.extra if s not in EXTRA]
    unknown += [v for v in args.variants if v not in ("cased", "lower")]
    if unknown:
        raise SystemExit(f"real_use: unknown section, extra set or variant: {', '.join(unknown)}")
    Path(args.cache).parent.mkdir(parents=True, exist_ok=True)
    table = Table(args)
    runs = {"paragraphs": section_paragraphs, "lodo": section_lodo, "extra": section_extra, "genia": section_genia}
    for name in SECTIONS:
        if name in sections:
            print(f"{name}:", flush=True)
            runs[name](args, table)
    result = table.write()
    print(Path(args.out).with_suffix(".md").read_text())
    return result


if __name__ == "__main__":
    main()
