"""Weights: caffemodel files as named arrays (``files``), surgery such as
BatchNorm folding and groupless conversion (``surgery``), magic init
(``magic_init``, with the reference procedure in ``magic_init_reference``) and
ONNX export (``onnx``)."""
