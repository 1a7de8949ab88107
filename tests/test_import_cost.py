"""spaCy imports every installed plugin's factories at start-up: ours must not pull in heavy libraries.

In this environment thinc (``thinc.compat``), spacy-llm and spacy-transformers import torch themselves as soon as
spaCy starts, so the check isolates this plugin: heavy modules are made unimportable and only spaCy's and
spacy-llmner's entry points are visible. Any import of them from our start-up path then fails the run.
"""

import subprocess
import sys
import textwrap

HEAVY = [
    "torch",
    "transformers",
    "sentence_transformers",
    "llama_cpp",
    "spacy_llm",
    "spacy_transformers",
    "peft",
    "gguf",
    "ray",
]

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, importlib.metadata as md, sys
    HEAVY = %r

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HEAVY:
                raise ImportError("blocked heavy import: " + name)

    sys.meta_path.insert(0, Block())
    ours = md.EntryPoints(md.distribution("spacy-llmner").entry_points)
    md.entry_points = lambda **kw: ours.select(**kw) if kw else ours
    import spacy
    nlp = spacy.blank("en")
    ner = nlp.add_pipe("llm_lar_ner", config={"labels": ["person"], "format": {"@misc": "spacy_llmner.JSONFormat.v1"},
                                              "retriever": {"@misc": "spacy_llmner.Retriever.v1", "k": 4}})
    nlp.to_disk(sys.argv[1])
    spacy.load(sys.argv[1])
    import spacy_llmner.cli, spacy_llmner.scale  # the CLI and the scale-out module: ray only when it runs
    print(sorted(m for m in sys.modules if m.split(".")[0] in HEAVY))
    """
    % (HEAVY,)
)


def test_spacy_startup_and_pipeline_creation_import_nothing_heavy(tmp_path):
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "p")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "[]"


def test_entry_points_are_visible_to_spacy():
    import spacy
    from spacy.language import Language
    from spacy.util import registry

    spacy.blank("en")  # loads the factories' entry points
    assert Language.has_factory("llm_lar_ner")

    assert registry.misc.get("spacy_llmner.LinesFormat.v1")
    assert registry.llm_models.get("spacy_llmner.LlamaCpp.v1")
