"""Judging a representation: relative-position accuracy (``pretext``), the retrieval
proxy (``retrieval_proxy``), the field's frozen-feature protocols (``protocols``:
VOC07 SVM, low-shot SVM, kNN, linear probe), the labelled sets they run on
(``datasets``), a whole evaluation from cached layer features to the report
(``frozen``), its JSON / Markdown / PNG report (``report``), and one AP, one
bootstrap and the Wilson interval for all of them (``statistics``)."""
