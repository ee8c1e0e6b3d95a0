"""Regenerate prototxt/ from ctxpred's NetSpec definitions (ctxpred/models/context.py).

The checked-in prototxts are this script's output; tests/models/test_nets.py fails
when they differ from what the code generates.
"""
import argparse
from pathlib import Path

from ctxpred.models.context import write_prototxts

REPO = Path(__file__).resolve().parents[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(REPO / "prototxt"),
                        help="folder to write into (default: the checkout's prototxt/)")
    args = parser.parse_args(argv)
    for path in write_prototxts(args.out):
        print(path)


if __name__ == "__main__":
    main()
