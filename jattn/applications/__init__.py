"""Mechanisms of application papers built on softmax attention: cross attention and
Perceiver-style readers (``cross``), fusion across branches, frames and references
(``fusion``), contrastive matching losses (``matching``), embedding pooling (``pooling``),
graph and relation-aware attention (``structure``), channel and position attention
(``channel``) and pointer networks (``pointer``)."""
