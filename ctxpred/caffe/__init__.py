"""Caffe itself: the one place pycaffe is imported (``env``), CPU or GPU selection."""
