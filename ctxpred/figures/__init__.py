"""The project page's figures. Pieces: receptive fields and streaming top-k
activations (``activations``), the mining steps as array functions
(``mining``), static HTML pages of patches (``pages``), pixels of boxes cut
again for a page (``crops``). Whole runs, one per tool: maximal activations
(``max_activations``), the nearest-neighbour figure (``neighbours``) and
visual data mining (``mining_run``)."""
