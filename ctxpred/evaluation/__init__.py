"""Judging a representation: relative-position accuracy (``pretext``), the
retrieval proxy (``retrieval_proxy``), the field's frozen-feature protocols
(``protocols``: VOC07 SVM, low-shot SVM, kNN, linear probe) and their report
(``report``), on one AP and one bootstrap (``statistics``)."""
