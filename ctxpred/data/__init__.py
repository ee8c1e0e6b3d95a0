"""Training data: the default photo collection (``collection``), image sources and
decoding (``images``), patch-pair positions (``sampling``), per-patch preprocessing
(``preprocess``), batch assembly (``batching``), prefetching workers (``prefetch``)
and the ``PatchPairData`` Caffe layer (``layer``)."""
