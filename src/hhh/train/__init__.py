"""Training loops, one readable file per method; shared machinery in `loop.py` and `guards.py`."""
