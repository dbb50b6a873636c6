"""Tools that look inside attention: attention rollout (``rollout``) and the
random-features lens (``rf_lens``)."""
