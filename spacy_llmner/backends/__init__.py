"""Backends: prompts in, completions out. Registered in spacy-llm's ``llm_models`` registry (created here the way
spacy-llm creates it, without importing spacy_llm, which imports torch), so they serve our component and
spacy-llm's own ``llm`` component alike."""

from typing import Any, Callable, Optional

from spacy.util import registry

if "llm_models" not in registry.get_registry_names():
    registry.create("llm_models", entry_points=True)


@registry.llm_models("spacy_llmner.LlamaCpp.v1")
def llamacpp_backend(
    model: str = "gemma3-270m", n_ctx: int = 4096, temperature: float = 0.0, seed: int = 0
) -> Any:
    """In-process llama.cpp: a packaged model by short name (gemma3-270m, smollm2-135m) or a GGUF path."""
    from .llamacpp import LlamaCppBackend

    return LlamaCppBackend(model=model, n_ctx=n_ctx, temperature=temperature, seed=seed)


@registry.llm_models("spacy_llmner.OpenAICompat.v1")
def openai_compat_backend(
    base_url: str = "http://127.0.0.1:8000/v1",
    model: str = "default",
    endpoint: str = "completions",
    api_key_env: Optional[str] = "OPENAI_API_KEY",
    grammar_field: Optional[str] = None,
    max_concurrency: int = 4,
    max_retries: int = 4,
    timeout: float = 120.0,
    temperature: float = 0.0,
    seed: Optional[int] = 0,
) -> Any:
    """Any OpenAI-compatible server. ``api_key_env`` names the environment variable holding the key."""
    from .openai_compat import OpenAICompatBackend

    return OpenAICompatBackend(
        base_url=base_url,
        model=model,
        endpoint=endpoint,
        api_key_env=api_key_env,
        grammar_field=grammar_field,
        max_concurrency=max_concurrency,
        max_retries=max_retries,
        timeout=timeout,
        temperature=temperature,
        seed=seed,
    )


@registry.llm_models("spacy_llmner.SpacyLLM.v1")
def spacy_llm_backend(model: Callable, name: str = "") -> Any:
    """Wraps a model from spacy-llm's registry (its config block nested under ``model``)."""
    from .spacy_llm import SpacyLLMBackend

    return SpacyLLMBackend(model, name=name)
