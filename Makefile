# ctxpred: the two commands of README.md, and the steps they share.
#   make test   set up whatever is missing, then run the test suite
#   make demo   set up whatever is missing, then train and evaluate the demo
PYTHON ?= python3
# CUDA=1 builds and links the CUDA Caffe instead of the CPU one (both stay in
# the cache; the venv uses the one last set up). CUDA_ARCH=90 limits the GPU
# architectures built (see tools/build_caffe.sh --help).
CUDA      ?=
CUDA_ARCH ?=
CAFFE_FLAGS := $(if $(CUDA),--cuda) $(if $(CUDA_ARCH),--cuda-arch "$(CUDA_ARCH)")
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: help setup venv caffe data prototxt test demo chromium

help:
	@echo "make test    set up (Debian packages, .venv, Caffe, photos), run the tests"
	@echo "make demo    set up, then run the demo"
	@echo "make setup   only set up"
	@echo "  CUDA=1 [CUDA_ARCH=90] with any of them: use the CUDA build of Caffe"
	@echo "make prototxt  regenerate prototxt/ from ctxpred's net definitions"

setup: venv caffe data

venv: $(STAMP)

$(STAMP): setup.py
	@$(PYTHON) -m venv $(VENV) || { echo "error: '$(PYTHON) -m venv' failed; on Debian/Ubuntu run: sudo apt-get install python3-venv python3-dev" >&2; exit 2; }
	@# opencv-python-headless and the contrib wheel both own cv2/: keep only the contrib one
	@$(PY) -m pip uninstall -q -y opencv-python-headless opencv-python 2>/dev/null || true
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

caffe: $(STAMP)
	@tools/build_caffe.sh --python $(PY) $(CAFFE_FLAGS) >/dev/null

data: $(STAMP)
	@$(PY) data/make_collection.py

prototxt: $(STAMP)
	$(PY) tools/make_prototxt.py

# The page tests render HTML in headless Chromium (Debian's package).
chromium:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  else echo "error: the page tests need Chromium; run: sudo apt-get install chromium" >&2; exit 2; fi; }

test: setup chromium
	$(PY) -m pytest -q tests

demo: setup
	$(PY) tools/demo.py
