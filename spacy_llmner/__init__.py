"""LLM-backed named-entity recognition for spaCy pipelines.

Importing this package must stay cheap: spaCy imports every plugin's factories at start-up, so nothing heavy
(torch, transformers, llama_cpp) is imported here or in the modules the entry points name.
"""

__version__ = "0.1.0"
