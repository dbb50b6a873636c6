"""Zoology MQAR (P24): data, mixers, model, sweeps."""
