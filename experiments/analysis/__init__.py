"""Attention analysis and intervention on a trained model (issue 24)."""
