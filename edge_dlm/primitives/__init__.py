"""Primitives: the bottom layer. Errors, atomic files, attention patterns, the KV cache, sampling,
the tokenizer, energy meters, the machine's description and the bundled prompts. Nothing here
imports another edge-dlm layer."""
