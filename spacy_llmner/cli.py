"""Command line: ``spacy-llmner annotate`` (the demo's main job). Typer, in spaCy's own CLI style."""

import json
import time
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="spacy-llmner: LLM-backed NER for spaCy", no_args_is_help=True)


@app.callback()
def _root() -> None:
    """spacy-llmner commands."""


@app.command()
def annotate(
    input_path: Path = typer.Argument(..., help="Text file, one document per line (or .jsonl with 'text')"),
    labels: str = typer.Option("person,organisation,location", help="Comma-separated target labels"),
    demonstrations: Optional[Path] = typer.Option(None, help="jsonl demonstrations (text + spans)"),
    model: str = typer.Option("gemma3-270m", help="Packaged model short name or GGUF path"),
    output_format: str = typer.Option("lines", "--format", help="lines, bracket, xml or json"),
    constrained: bool = typer.Option(True, help="Grammar-constrained decoding"),
    output: Path = typer.Option(Path("demo_output"), help="Folder for entities.jsonl and displacy.html"),
    cache_path: Optional[str] = typer.Option(None, help="sqlite answer cache"),
):
    """Annotate texts with the embedded local LLM; print entities, write jsonl and a displaCy page."""
    import spacy
    from spacy import displacy

    from .formats import FORMATS

    if output_format not in FORMATS:
        raise typer.BadParameter(f"--format must be one of {sorted(FORMATS)}, not {output_format!r}")

    t0 = time.perf_counter()
    if input_path.suffix == ".jsonl":
        texts = [json.loads(line)["text"] for line in input_path.read_text(encoding="utf8").splitlines() if line]
    else:
        texts = [line for line in input_path.read_text(encoding="utf8").splitlines() if line.strip()]
    nlp = spacy.blank("en")
    ner = nlp.add_pipe(
        "llm_lar_ner",
        config={
            "labels": [label.strip() for label in labels.split(",") if label.strip()],
            "format": {"@misc": f"spacy_llmner.{FORMATS[output_format].__name__}.v1"},
            "backend": {"@llm_models": "spacy_llmner.LlamaCpp.v1", "model": model},
            "demonstrations": str(demonstrations) if demonstrations else None,
            "constrained": constrained,
            "cache_path": cache_path,
        },
    )
    output.mkdir(parents=True, exist_ok=True)
    docs = []
    first = None
    with (output / "entities.jsonl").open("w", encoding="utf8") as f:
        for doc in nlp.pipe(texts):
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
