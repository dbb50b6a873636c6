"""Linear attention kernels: the Lightning chunked causal form (one kernel for GPUs and TPUs,
interpretable on any backend)."""
