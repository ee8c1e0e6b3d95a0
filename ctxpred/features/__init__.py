"""Features of a trained net: the deploy net and its checked weights (``nets``),
the patch extractor (``extractor``), patches cut image by image (``patches``),
HDF5/npy feature files (``writers``), patches streamed into a file
(``streaming``), dense feature maps (``dense``), and nearest-neighbour search
(``search``)."""
