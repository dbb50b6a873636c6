"""Efficient attention: linear (kernelised) attention, local windows and halos,
neighbourhoods, top-k sparse, landmark, routing, bi-level routing, LongHeads, agent
attention, and head-level designs (mixture of heads, relative heads)."""
