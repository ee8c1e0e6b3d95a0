"""A short real-pycaffe smoke run: patch pairs from the default photos through
PatchPairData, a tiny pair classifier, and a few SGD steps.

Stands in for `make demo` until tools/train.py trains the paper's nets.
"""
import argparse
import json
import tempfile
from pathlib import Path

from ctxpred.caffe_env import load_caffe
from ctxpred.layers import close_data_layers


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", default="data/photos/train",
                        help="image folder, glob, list file or LMDB (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=5, help="SGD steps (default: %(default)s)")
    args = parser.parse_args(argv)
    caffe = load_caffe()
    n = caffe.NetSpec()
    n.data, n.select1, n.select2, n.label = caffe.layers.Python(
        ntop=4, python_param=dict(module="ctxpred.layers", layer="PatchPairData",
                                  param_str=json.dumps({"source": args.images, "workers": 2})))
    n.pool = caffe.layers.Pooling(n.data, pool=caffe.params.Pooling.AVE, kernel_size=8, stride=8)
    n.feature = caffe.layers.InnerProduct(n.pool, num_output=64, weight_filler=dict(type="xavier"))
    n.first = caffe.layers.BatchReindex(n.feature, n.select1)
    n.second = caffe.layers.BatchReindex(n.feature, n.select2)
    n.score = caffe.layers.InnerProduct(caffe.layers.Concat(n.first, n.second), num_output=8,
                                        weight_filler=dict(type="xavier"))
    n.loss = caffe.layers.SoftmaxWithLoss(n.score, n.label,
                                          loss_param=dict(normalization=caffe.params.Loss.NONE))
    with tempfile.TemporaryDirectory() as folder:
        net_path = Path(folder, "smoke.prototxt")
        net_path.write_text(str(n.to_proto()))
        solver_path = Path(folder, "solver.prototxt")
        solver_path.write_text(f'net: "{net_path}"\nbase_lr: 1e-5\nlr_policy: "fixed"\n'
                               'solver_mode: CPU\n')
        solver = caffe.SGDSolver(str(solver_path))
        for _ in range(args.steps):
            solver.step(1)
            pairs = len(solver.net.blobs["label"].data)
            print(f"step {solver.iter}: {solver.net.blobs['data'].data.shape[0]} patches, "
                  f"{pairs} pairs, loss/pair {float(solver.net.blobs['loss'].data) / pairs:.4f}")
        close_data_layers(solver.net)


if __name__ == "__main__":
    main()
