"""finetune.evaluate: measure a model the same way at every stage of its journey.

Perplexity on the user's text, lm-evaluation-harness tasks (through crofter's own
llama.cpp `LM` adapter for GGUF files, lm-eval's `hf` model for checkpoints), the
user's own prompt suites, retrieval suites, and speed and size, all as `Row`s that
the results store keeps and `compare` sets side by side.

Imports `models` only: what needs the chat turn or a document collection (prompt
and retrieval suites) takes it as a callable from the CLI in `app/`.
"""
