"""Theory checks of the random-features lens on attention (P63)."""
