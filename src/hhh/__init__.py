"""hhh: align instruction-tuned language models."""
