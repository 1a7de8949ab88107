"""Backends: prompts in, completions out. Registered in spacy-llm's ``llm_models`` registry (created here the way
spacy-llm creates it, without importing spacy_llm, which imports torch), so they serve our component and
spacy-llm's own ``llm`` component alike. The classes themselves are registered: their modules import only the
standard library at import time (llama_cpp and requests load on first use)."""

from spacy.util import registry

from .llamacpp import LlamaCppBackend
from .openai_compat import OpenAICompatBackend
from .spacy_llm import SpacyLLMBackend

if "llm_models" not in registry.get_registry_names():
    registry.create("llm_models", entry_points=True)

# In-process llama.cpp: a packaged model by short name (gemma3-270m, smollm2-135m) or a GGUF path.
llamacpp_backend = registry.llm_models.register("spacy_llmner.LlamaCpp.v1", func=LlamaCppBackend)
# Any OpenAI-compatible server; ``api_key_env`` names the environment variable holding the key.
openai_compat_backend = registry.llm_models.register("spacy_llmner.OpenAICompat.v1", func=OpenAICompatBackend)
# A model from spacy-llm's registry, its config block nested under ``model``.
spacy_llm_backend = registry.llm_models.register("spacy_llmner.SpacyLLM.v1", func=SpacyLLMBackend)

__all__ = ["LlamaCppBackend", "OpenAICompatBackend", "SpacyLLMBackend"]
