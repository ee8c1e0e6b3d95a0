"""Features of a trained net: extraction over patches or images, with HDF5/npy
writers and dense features (``extraction``), and nearest-neighbour search
(``search``)."""
