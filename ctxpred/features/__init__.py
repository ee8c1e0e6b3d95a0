"""Features of a trained net: the deploy net and its checked weights (``nets``),
the one extraction path every tool shares, on pycaffe or onnxruntime
(``forward``), the patch extractor (``extractor``), patches cut image by image
(``patches``), HDF5/npy feature files (``writers``), patches streamed into a
file (``streaming``), dense feature maps (``dense``), per-layer pooled
features of whole images with their HDF5 cache (``layers``), and
nearest-neighbour search (``search``)."""
