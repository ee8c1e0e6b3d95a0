#!/usr/bin/env python3
"""Install the CUDA toolkit pinned in tools/cuda_wheels.txt from PyPI's NVIDIA wheels.

The toolkit goes into a cache folder as one root (for CUDA_TOOLKIT_ROOT_DIR);
a second run finds the finished install. Prints the toolkit root on stdout;
messages go to stderr. Exit status: 0 done, 1 failed (one line says why),
2 bad usage. Used by tools/build_caffe.sh --cuda (see
ctxpred/caffe/cuda_toolkit.py for what it does).
"""
import argparse
import sys

from ctxpred.caffe.cuda_toolkit import PINS, ToolkitError, install_toolkit


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True,
                        help="cache folder; the toolkit goes to <cache>/cuda-<version>-<key>/ "
                             "and the wheels to <cache>/src/cuda-wheels/")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter whose pip downloads the wheels (default: this one)")
    parser.add_argument("--pins", default=str(PINS),
                        help="pin file: one 'name==version sha256 filename' per line "
                             "(default: tools/cuda_wheels.txt)")
    args = parser.parse_args(argv)
    try:
        root = install_toolkit(args.cache, args.python, args.pins,
                               log=lambda message: print(message, file=sys.stderr))
    except (ToolkitError, OSError) as error:
        print(f"[cuda_toolkit] error: {error}", file=sys.stderr)
        return 1
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
