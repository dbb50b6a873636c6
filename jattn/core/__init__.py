"""The core of softmax attention: shape letters and validators (``shapes``), the mask
algebra (``masks``), ``dot_product_attention`` and its registry of implementations
(``attention``), score modifiers applied per tile (``score_mod``), the memory-efficient
``chunked`` path, the adapter to the Pallas kernels (``kernels``), positional encodings
(``positions``) and KV-cache decoding (``cache``)."""
