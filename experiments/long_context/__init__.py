"""Long-context passkey retrieval on the ring: train short, evaluate at 64k tokens with the
sequence sharded over (simulated) devices (:mod:`experiments.long_context.run`)."""
