"""ctxpred: context prediction (Doersch, Gupta & Efros, ICCV 2015) on real Caffe.

pycaffe itself is not on PyPI: `make setup` (or tools/build_caffe.sh) builds it
from a pinned source and links it into the virtual environment.
"""
from setuptools import find_packages, setup

setup(
    name="ctxpred",
    version="0.1.0",
    description=("Unsupervised visual representation learning by context "
                 "prediction, reproduced on real Caffe (pycaffe)."),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="BSD-2-Clause",
    python_requires=">=3.9",
    packages=find_packages(include=["ctxpred", "ctxpred.*"]),
    install_requires=[
        "numpy>=1.24",
        "scipy>=1.10",
        "scikit-image>=0.21",
        "h5py>=3.8",
        "lmdb>=1.4",
        "protobuf>=3.20",        # Caffe's generated caffe_pb2 needs >= 3.20
        "six",                   # imported by pycaffe
        "opencv-contrib-python-headless>=4.7,<5",
        "Pillow>=10",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "onnx>=1.17",            # tools/export_onnx.py; the first releases built for numpy 2
        "onnxruntime>=1.19",
        "hnswlib>=0.8",          # approximate nearest neighbours (ctxpred.features.search)
        "scikit-learn>=1.3",     # frozen-feature protocols (ctxpred.evaluation.protocols)
    ],
    extras_require={"test": ["pytest>=7"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Image Recognition",
    ],
)
