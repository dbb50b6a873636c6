"""NNX modules of the efficient family (one file per functional module of
:mod:`jattn.efficient`)."""
