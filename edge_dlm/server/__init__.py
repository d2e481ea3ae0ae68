"""`edge-dlm serve`: the OpenAI-compatible HTTP server (`app`) and its strict request schema (`schema`)."""
