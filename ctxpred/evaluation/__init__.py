"""Judging a representation: relative-position accuracy (``pretext``) and the
retrieval proxy (``retrieval_proxy``)."""
