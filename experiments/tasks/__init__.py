"""Synthetic tasks shared by the experiments and the benchmarks: multi-query associative
recall (``mqar``, Zoology) and needle-in-noise (``passkey``, Titans); ``labels`` holds what
they share (the ignored label and the gather of supervised positions)."""
