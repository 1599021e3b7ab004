"""Applications on the aligned model: the PAL sandbox (more to come: RAG, chain-of-thought, ReAct)."""
