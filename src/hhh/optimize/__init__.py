"""Optimize for deployment: fold the adapter into the base (merge), write GGUF for llama.cpp (export), and make
the model cheaper (quantize, prune, distill) while measuring whether the alignment survives."""
