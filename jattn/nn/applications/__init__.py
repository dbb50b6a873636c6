"""NNX modules of the application family (one file per functional module of
:mod:`jattn.applications`)."""
