"""Experiment scripts that reproduce papers and benchmark jattn; run as ``python -m``."""
