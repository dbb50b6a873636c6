"""Test-time-trained memories (P37 Titans): pure functions of arrays."""

from jattn.memory.titans import (
    MemoryInputs,
    MemoryWeights,
    NeuralMemoryConfig,
    NeuralMemoryParams,
    NeuralMemoryState,
    apply_memory,
    chunk_gates,
    init_neural_memory,
    initial_memory_state,
    memory_inputs,
    memory_recurrence,
    neural_memory,
    prepend_persistent,
)

__all__ = [
    "MemoryInputs",
    "MemoryWeights",
    "NeuralMemoryConfig",
    "NeuralMemoryParams",
    "NeuralMemoryState",
    "apply_memory",
    "chunk_gates",
    "init_neural_memory",
    "initial_memory_state",
    "memory_inputs",
    "memory_recurrence",
    "neural_memory",
    "prepend_persistent",
]
