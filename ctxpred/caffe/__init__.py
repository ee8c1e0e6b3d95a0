"""Caffe itself: the one place pycaffe is imported and a device chosen (``env``); net and
solver definitions read, upgraded, phase-filtered and built into nets (``netparam``);
the kernel / stride / pad windows of Convolution and Pooling layers (``geometry``); the
pinned CUDA toolkit that tools/build_caffe.sh --cuda installs (``cuda_toolkit``)."""
