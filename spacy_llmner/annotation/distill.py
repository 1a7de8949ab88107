"""Distillation: the LLM pipeline (the teacher) labels a large unlabelled corpus, and fast spaCy students learn
from its labels and from the few gold ones.

    spacy-llmner distill gold.spacy corpus.txt training/distill --dev dev.spacy

Stages, each resumable (a rerun skips what is already written under the output folder):

1. ``teacher/``: the teacher pipeline. By default the shipped one, ``nlp.add_pipe("llm_lar_ner")`` with the gold
   sentences as its retrieval pool (span retrieval, k demonstrations, a sentence never shown itself); or a saved
   pipeline given by path.
2. ``corpus/`` and ``silver/``: the corpus in shards of ``shard_size`` texts, annotated by the teacher shard by shard
   (``scale.annotate_corpus``: a shard is committed whole or not at all; its usage is recorded in
   ``silver/manifest.json``). The default teacher's answer cache (``teacher_cache.sqlite``) makes an interrupted
   shard cheap to redo.
3. Partial annotation: a silver span whose calibrated confidence is under ``threshold`` becomes *missing*
   annotation (spaCy learns nothing about those tokens) instead of an entity or "O". ``silver = "hard"`` keeps the
   teacher's entities as they are.
4. Label mixing on the gold sentences: the teacher annotates them too (``refine``, keep-human); where it proposes an
   entity the gold labels lack, the student trains on the teacher's version with probability
   ``llm_weight · b(label)`` (``annotation.mixing``).
5. ``students/<kind>/``: each student (``configs/student.cfg``: tok2vec, ``configs/student_trf.cfg``:
   spacy-transformers) trained with ``spacy train``, scored on the dev set and timed; ``packages/``: each packaged as
   a wheel (``spacy package --build wheel``).
6. ``report.json`` and ``report.md``: what each stage did, the teacher's speed, each student's dev scores, speed
   and wheel.
"""

import importlib.util
import json
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import srsly
from spacy.tokens import Doc, DocBin, Span
from spacy.util import filter_spans

from ..corpora import unannotated
from .mixing import MixSettings, mix_docs
from .refine import predicted_spans, refine_docs

PathLike = Union[str, Path]
STUDENT_CONFIGS = {"tok2vec": "configs/student.cfg", "trf": "configs/student_trf.cfg"}
SILVER = ("partial", "hard")
TRF_EXTRA = "pip install 'spacy-llmner[student]'"  # spacy-transformers: an extra (spaCy imports it at start-up)


def has_spacy_transformers() -> bool:
    """Whether spacy-transformers is installed (looked up, not imported)."""
    return importlib.util.find_spec("spacy_transformers") is not None


def default_students() -> Tuple[str, ...]:
    """tok2vec, and the transformer student where spacy-transformers is installed."""
    return ("tok2vec", "trf") if has_spacy_transformers() else ("tok2vec",)


def missing_library(config: PathLike) -> Optional[str]:
    """Why a student config cannot train here (it names spacy-transformers' functions and that package is not
    installed), or None."""
    path = Path(config)
    if path.exists() and "spacy-transformers." in path.read_text(encoding="utf8") and not has_spacy_transformers():
        return f"{path} needs spacy-transformers, which is not installed: {TRF_EXTRA}"
    return None


@dataclass(frozen=True)
class DistillSettings:
    threshold: float = 0.5  # silver spans under this calibrated confidence become missing annotation (partial)
    silver: str = "partial"  # "partial" or "hard" (the teacher's entities as they are)
    check: bool = True  # partial: what the gold-only tok2vec student finds and the teacher does not is missing too
    mix: bool = True  # label mixing where the gold sentences and the teacher disagree
    llm_weight: float = 0.5  # mixing's lambda
    pool: int = 0  # annotate and train on the corpus's first N texts (0: all)
    k: int = 3  # the default teacher's demonstrations per sentence
    shard_size: int = 512
    batch_size: int = 256
    students: Tuple[str, ...] = field(default_factory=default_students)
    student_configs: Dict[str, str] = field(default_factory=lambda: dict(STUDENT_CONFIGS))
    overrides: Dict[str, Dict[str, object]] = field(default_factory=dict)  # per student kind: spacy train overrides
    package: bool = True
    version: str = "0.1.0"
    seed: int = 0
    spans_key: str = "llm_ner"  # the teacher's doc.spans group of scored spans

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"distill: threshold is a confidence in [0, 1], not {self.threshold}")
        if self.silver not in SILVER:
            raise ValueError(f"distill: silver must be one of {', '.join(SILVER)}, not {self.silver!r}")
        unknown = [s for s in self.students if s not in self.student_configs]
        if unknown:
            raise ValueError(
                f"distill: no config for student(s) {unknown}; known: {sorted(self.student_configs)} "
                "(give one with --student-config KIND=PATH)"
            )
        missing = [m for m in (missing_library(self.student_configs[s]) for s in self.students) if m]
        if missing:  # refused before the teacher's hours of annotation, not when the student is reached
            raise ValueError(f"distill: {'; '.join(missing)} (or leave the student out: --students tok2vec)")
        if self.pool < 0 or self.shard_size < 1 or self.batch_size < 1 or self.k < 0:
            raise ValueError("distill: pool, k ≥ 0 and shard_size, batch_size ≥ 1")


def read_gold(path: PathLike, vocab) -> List[Doc]:
    """Gold docs: a DocBin, a jsonl of ``text`` + ``entities``/``spans`` (character offsets; the longest
    non-overlapping spans are the entities) or a BIO file."""
    import spacy

    from ..corpora import read_bio, read_docbin, read_jsonl

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"distill: gold file not found: {path}")
    if path.suffix == ".spacy":
        return read_docbin(path, vocab)
    if path.suffix == ".jsonl":
        return read_jsonl(path, spacy.blank("en", vocab=vocab))
    return read_bio(path, vocab)


def default_teacher(
    labels: Sequence[str], pool: Sequence[Doc], k: int = 3, cache_path: Optional[str] = None, **backend
):
    """The shipped default pipeline (``nlp.add_pipe("llm_lar_ner")``: Gemma 3 270M, the shipped adapter, the fast
    engine) with span retrieval of ``k`` demonstrations from ``pool``; a sentence of the pool never sees itself.
    ``cache_path``: its sqlite answer cache."""
    import spacy

    nlp = spacy.blank("en")
    nlp.add_pipe(
        "llm_lar_ner",
        config={
            "labels": list(labels),
            "show_progress": True,  # a bar per shard
            "cache_path": cache_path,
            "retriever": {"@misc": "spacy_llmner.Retriever.v1", "strategy": "span", "k": k, "exclude_identical": True},
            "backend": {"@llm_models": "spacy_llmner.LlamaCpp.v1", **backend},
        },
    )
    nlp.get_pipe("llm_lar_ner").initialize(pool=list(pool))
    return nlp


def write_shards(texts: Sequence[str], folder: Path, shard_size: int) -> List[Path]:
    """The corpus as jsonl shards of ``shard_size`` texts, each named by its position and a hash of its texts: a
    shard already annotated is found again by name, and one whose texts changed is annotated afresh."""
    import hashlib

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, start in enumerate(range(0, len(texts), shard_size)):
        part = texts[start : start + shard_size]
        digest = hashlib.sha1("\n".join(part).encode("utf8")).hexdigest()[:10]
        path = folder / f"part-{n:05d}-{digest}.jsonl"
        if not path.exists():
            srsly.write_jsonl(path, [{"text": t} for t in part])
        paths.append(path)
    return paths


def annotate(
    teacher: PathLike, shards: Sequence[Path], output: Path, batch_size: int, progress: Optional[Callable] = None
) -> Dict:
    """The teacher over every shard not yet committed under ``output`` (``scale.annotate_corpus``)."""
    from ..scale import annotate_corpus

    return annotate_corpus(str(teacher), list(shards), output, batch_size=batch_size, progress=progress)


def annotated_docs(output: Path, shards: Sequence[Path], vocab) -> List[Doc]:
    """The teacher's docs, in corpus order."""
    from ..scale.shards import Shard

    docs: List[Doc] = []
    for path in shards:
        docs.extend(DocBin().from_disk(output / f"{Shard.of(path).name}.spacy").get_docs(vocab))
    return docs


def silver(
    doc: Doc,
    spans_key: str,
    threshold: float,
    mode: str = "partial",
    check: Optional[Sequence[Tuple[int, int, str]]] = None,
) -> Tuple[Doc, int, int]:
    """A teacher-annotated doc as training data: (doc, entities kept, spans made missing). ``hard``: its entities
    as the teacher set them. ``partial``: spans at or above ``threshold`` are entities (the longest non-overlapping
    ones), spans under it are missing annotation where they overlap no kept entity, every other token is "O".
    ``check``: a second opinion's (start_char, end_char, label) spans (the student trained on the gold alone); those
    the kept entities do not cover are missing too, not "O": what one of the two finds and the other does not is
    not taught either way (the teacher's blind spots, such as a kind of mention its demonstrations never show)."""
    out = unannotated(doc)
    if mode == "hard":
        out.ents = [Span(out, e.start, e.end, label=e.label_) for e in doc.ents]
        return out, len(out.ents), 0
    spans, scores = predicted_spans(doc, spans_key)
    sure = [s for s, c in zip(spans, scores) if c is None or c >= threshold]
    ents = filter_spans([Span(out, s.start, s.end, label=s.label_) for s in sure])
    taken = {i for e in ents for i in range(e.start, e.end)}
    unsure = [Span(out, s.start, s.end) for s, c in zip(spans, scores) if c is not None and c < threshold]
    for start, end, _ in check or ():
        span = out.char_span(start, end, alignment_mode="expand")
        if span is not None:
            unsure.append(span)
    missing = [m for m in filter_spans(unsure) if not any(i in taken for i in range(m.start, m.end))]
    out.set_ents(ents, missing=missing, default="outside")
    return out, len(ents), len(missing)


def second_opinion(model: PathLike, texts: Sequence[str]) -> List[List[Tuple[int, int, str]]]:
    """Per text, the (start_char, end_char, label) entities a spaCy pipeline (the student trained on the gold
    alone) finds: ``silver``'s ``check``."""
    import spacy

    nlp = spacy.load(model)
    return [[(e.start_char, e.end_char, e.label_) for e in d.ents] for d in nlp.pipe(texts, batch_size=256)]


def mixed_gold(teacher_nlp, gold: Sequence[Doc], settings: DistillSettings, spans_key: str) -> Tuple[List[Doc], Dict]:
    """The gold docs with the teacher's disagreeing labels marked for the mixing reader, and mixing's counts."""
    refined = [doc for doc, _, _ in refine_docs(teacher_nlp, gold, "keep-human", 1.0, spans_key, settings.batch_size)]
    mix = MixSettings(llm_weight=settings.llm_weight, balance=True, reference_key="refine_human")
    docs, counts = mix_docs(refined, mix)
    return docs, {"groups": counts["groups"], "reference": counts["reference"], "llm": counts["llm"]}


def train_student(config: PathLike, output: Path, overrides: Dict[str, object]) -> None:
    """``spacy train`` of a student config; a config with ``[paths] transformer = null`` gets the packaged MiniLM's
    local folder, so the spacy-transformers student trains offline."""
    import spacy
    from spacy.cli.train import train

    config = Path(config)
    if not config.exists():
        raise FileNotFoundError(f"distill: student config not found: {config} (see configs/student.cfg)")
    missing = missing_library(config)
    if missing:
        raise ValueError(f"train-student: {missing}")
    overrides = dict(overrides)
    if "transformer" in spacy.util.load_config(config).get("paths", {}) and overrides.get("paths.transformer") is None:
        from ..retrieval.encoder import packaged_minilm_path

        overrides["paths.transformer"] = packaged_minilm_path()
    train(config, output, overrides={k: (str(v) if isinstance(v, Path) else v) for k, v in overrides.items()})


def words_per_second(model: PathLike, texts: Sequence[str], runs: int = 3) -> float:
    """A pipeline's speed over ``texts`` (tokenizer included): words over the median of ``runs`` timed passes."""
    import spacy

    nlp = spacy.load(model)
    words = sum(len(nlp.make_doc(t)) for t in texts)
    list(nlp.pipe(texts[:64]))
    seconds = []
    for _ in range(runs):
        t0 = time.perf_counter()
        list(nlp.pipe(texts, batch_size=256))
        seconds.append(time.perf_counter() - t0)
    return words / sorted(seconds)[len(seconds) // 2]


def score(model: PathLike, gold: Sequence[Doc]) -> Dict[str, float]:
    """Strict entity P/R/F1 (spaCy's scorer, in points) of a pipeline on gold docs."""
    import spacy
    from spacy.training import Example

    nlp = spacy.load(model)
    examples = [Example(nlp.make_doc(g.text), g) for g in gold]
    scores = nlp.evaluate(examples, batch_size=256)
    return {"p": 100 * scores["ents_p"], "r": 100 * scores["ents_r"], "f1": 100 * scores["ents_f"]}


TEACHER_SOURCE = {
    "name": "Gemma 3 270M with spacy-llmner's NER adapter (the teacher whose labels this model was trained on)",
    "url": "https://ai.google.dev/gemma/terms",
    "license": "Gemma Terms of Use: a model trained on Gemma's output is a Model Derivative under them",
}


def record_sources(model: Path, teacher: Optional[PathLike], meta: Optional[Dict]) -> None:
    """Adds the teacher (the default one: Gemma's terms) and ``meta`` (e.g. the data's licences: ``sources``,
    ``license``) to the student's meta.json, which its package carries."""
    path = model / "meta.json"
    current = srsly.read_json(path)
    sources = list(current.get("sources") or [])
    sources.append(TEACHER_SOURCE if teacher is None else {"name": f"teacher pipeline {teacher}"})
    extra = dict(meta or {})
    sources.extend(extra.pop("sources", []))
    srsly.write_json(path, {**current, **extra, "sources": sources})


def package(model: Path, dest: Path, name: str, version: str) -> Dict:
    """``spacy package --build wheel``: the wheel's path and size."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "spacy", "package", str(model), str(dest), "--name", name, "--version", version]
    subprocess.run([*cmd, "--build", "wheel", "--force"], check=True, capture_output=True)
    (wheel,) = (dest / f"en_{name}-{version}" / "dist").glob("*.whl")
    return {"wheel": str(wheel), "megabytes": round(wheel.stat().st_size / 1e6, 2)}


def split_dev(gold: List[Doc], seed: int, share: float = 0.2) -> Tuple[List[Doc], List[Doc]]:
    """(train, dev): a seeded ``share`` of the gold docs held out for the students' model selection."""
    order = list(range(len(gold)))
    random.Random(seed).shuffle(order)
    n_dev = max(1, int(len(gold) * share))
    dev = set(order[:n_dev])
    return [d for i, d in enumerate(gold) if i not in dev], [gold[i] for i in sorted(dev)]


def distill(
    gold_path: PathLike,
    corpus_path: PathLike,
    out: PathLike,
    dev_path: Optional[PathLike] = None,
    teacher: Optional[PathLike] = None,
    labels: Optional[Sequence[str]] = None,
    settings: DistillSettings = DistillSettings(),
    log: Callable[[str], None] = print,
    progress: Optional[Callable[[Dict], None]] = None,
    meta: Optional[Dict] = None,
) -> Dict:
    """Runs the stages of the module docstring under ``out`` and returns the report (also in report.json).
    ``meta`` goes into each packaged student's meta.json (``sources``: the gold and corpus data's licences)."""
    import spacy

    from ..scale import read_texts

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = spacy.blank("en").vocab
    gold = read_gold(gold_path, vocab)
    if not gold:
        raise ValueError(f"distill: no gold docs in {gold_path}")
    if dev_path is not None:
        dev = read_gold(dev_path, vocab)
    else:
        gold, dev = split_dev(gold, settings.seed)
        log(f"distill: no --dev given: {len(dev)} of the gold docs held out (seed {settings.seed}) to select students")
    labels = list(labels) if labels else sorted({e.label_ for d in gold for e in d.ents})
    if not labels:
        raise ValueError(f"distill: the gold docs in {gold_path} have no entities and no --labels were given")
    if not Path(corpus_path).exists():
        raise FileNotFoundError(f"distill: corpus not found: {corpus_path}")
    texts = read_texts(corpus_path, vocab)
    texts = texts[: settings.pool] if settings.pool else texts
    if not texts:
        raise ValueError(f"distill: the corpus {corpus_path} has no texts")
    report: Dict = {"settings": asdict(settings), "labels": labels, "gold": len(gold), "dev": len(dev)}

    # 1. the teacher
    teacher_dir = Path(teacher) if teacher else out / "teacher"
    if teacher is None and not (teacher_dir / "config.cfg").exists():
        log(f"distill: default teacher (llm_lar_ner, span retrieval, k = {settings.k}, pool: the gold) → {teacher_dir}")
        cache = str((out / "teacher_cache.sqlite").resolve())
        default_teacher(labels, gold, settings.k, cache).to_disk(teacher_dir)
    teacher_nlp = spacy.load(teacher_dir)
    spans_key = settings.spans_key

    # 2. the corpus, annotated shard by shard
    shards = write_shards(texts, out / "corpus", settings.shard_size)
    manifest = annotate(teacher_dir, shards, out / "silver", settings.batch_size, progress)
    report["teacher"] = {
        "pipeline": str(teacher_dir),
        "texts": len(texts),
        "seconds_this_run": manifest["seconds"],
        "docs_per_second": manifest["docs_per_second"],
        "seconds": sum(r.get("seconds", 0.0) for r in manifest["records"]),
        "usage": manifest["usage"],
    }
    report["teacher"]["sentences_per_second"] = len(texts) / report["teacher"]["seconds"] if texts else 0.0

    # 3. silver labels, partial or hard; with check, the gold-only student's second opinion
    train_dir = out / "train"
    train_dir.mkdir(exist_ok=True)
    DocBin(docs=gold).to_disk(train_dir / "gold.spacy")
    DocBin(docs=dev).to_disk(train_dir / "dev.spacy")
    teacher_docs = annotated_docs(out / "silver", shards, vocab)

    def student_overrides(kind: str, train: Path, silver_path: Optional[Path]) -> Dict[str, object]:
        return {
            "paths.train": train,
            "paths.silver": silver_path,
            "paths.dev": train_dir / "dev.spacy",
            "system.seed": settings.seed,
            **settings.overrides.get(kind, {}),
        }

    checks: List = [None] * len(teacher_docs)
    checked = settings.check and settings.silver == "partial"
    if checked:
        base = out / "students" / "gold_only"
        if not (base / "trained.json").exists():
            log(f"distill: the tok2vec student on the gold alone (the second opinion) → {base}")
            overrides = student_overrides("tok2vec", train_dir / "gold.spacy", None)
            train_student(settings.student_configs["tok2vec"], base, overrides)
            srsly.write_json(base / "trained.json", {"dev": score(base / "model-best", dev)})
        report["gold_only"] = srsly.read_json(base / "trained.json")
        checks = second_opinion(base / "model-best", [d.text for d in teacher_docs])
    silver_docs, kept, missing = [], 0, 0
    for doc, check in zip(teacher_docs, checks):
        s, n_kept, n_missing = silver(doc, spans_key, settings.threshold, settings.silver, check)
        silver_docs.append(s)
        kept, missing = kept + n_kept, missing + n_missing
    DocBin(docs=silver_docs).to_disk(train_dir / "silver.spacy")
    report["silver"] = {"mode": settings.silver, "docs": len(silver_docs), "entities": kept, "missing_spans": missing}
    report["silver"]["checked_by_gold_only_student"] = checked

    # 4. gold, label-mixed with the teacher's version where they disagree
    if settings.mix:
        mixed = train_dir / "gold_mixed.spacy"
        if not mixed.exists():
            docs, counts = mixed_gold(teacher_nlp, gold, settings, spans_key)
            DocBin(docs=docs, store_user_data=True).to_disk(mixed)
            srsly.write_json(train_dir / "mixing.json", counts)
        report["mixing"] = srsly.read_json(train_dir / "mixing.json")
        train_path = mixed
    else:
        train_path = train_dir / "gold.spacy"
    del teacher_nlp

    # 5. students
    report["students"] = {}
    dev_texts = [d.text for d in dev]
    for kind in settings.students:
        folder = out / "students" / kind
        result_path = folder / "result.json"
        if not result_path.exists():
            overrides = student_overrides(kind, train_path, train_dir / "silver.spacy")
            log(f"distill: training the {kind} student → {folder}")
            t0 = time.perf_counter()
            train_student(settings.student_configs[kind], folder, overrides)
            result = {"train_seconds": time.perf_counter() - t0}
            result["dev"] = score(folder / "model-best", dev)
            result["words_per_second"] = words_per_second(folder / "model-best", dev_texts)
            if settings.package:
                record_sources(folder / "model-best", teacher, meta)
                name = f"distilled_{kind}"
                result["package"] = package(folder / "model-best", out / "packages", name, settings.version)
            srsly.write_json(result_path, result)
        report["students"][kind] = srsly.read_json(result_path)
    srsly.write_json(out / "report.json", report)
    (out / "report.md").write_text(markdown(report), encoding="utf8")
    return report


def markdown(report: Dict) -> str:
    t, s = report["teacher"], report["silver"]
    lines = [
        "# distill report",
        "",
        f"Labels: {', '.join(report['labels'])}. Gold {report['gold']} docs, dev {report['dev']}.",
        f"Teacher `{t['pipeline']}`: {t['texts']} texts in {t['seconds']:.0f} s ({t['sentences_per_second']:.2f}/s); "
        f"LLM usage {json.dumps(t['usage'])}.",
        f"Silver ({s['mode']}): {s['entities']} entities, {s['missing_spans']} unsure spans left unannotated.",
    ]
    if "gold_only" in report:
        g = report["gold_only"]["dev"]
        lines.append(f"The tok2vec student of the gold alone (the second opinion): dev F1 {g['f1']:.1f}.")
    if "mixing" in report:
        lines.append(f"Label mixing: {report['mixing']['groups']} disagreement groups in the gold docs.")
    lines += ["", "| student | dev P | dev R | dev F1 | words/s | train s | wheel MB |", "|---" * 7 + "|"]
    for kind, r in report["students"].items():
        d = r["dev"]
        mb = r.get("package", {}).get("megabytes", "")
        lines.append(
            f"| {kind} | {d['p']:.1f} | {d['r']:.1f} | {d['f1']:.1f} | {r['words_per_second']:.0f} | "
            f"{r['train_seconds']:.0f} | {mb} |"
        )
    return "\n".join(lines) + "\n"
