"""The project page's figures: receptive fields and maximal activations
(``activations``), visual data mining (``mining``) and static HTML pages
(``pages``)."""
