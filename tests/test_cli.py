"""The command-line helpers shared by tools/: exit codes of run_tool, shared flag types."""
import argparse
from pathlib import Path

import pytest

from ctxpred.caffe.env import CaffeNotAvailable
from ctxpred.cli import (BAD_INPUT, DONE, FAILED, add_max_pixels, deploy_prototxt, pixel_budget,
                         run_tool, tool_parser)

REPO = Path(__file__).resolve().parents[1]


def raising(error):
    def main(argv):
        raise error
    return main


def test_run_tool_maps_errors_to_one_line_and_the_convention(capsys):
    assert run_tool(lambda argv: None) == DONE
    cases = [(CaffeNotAvailable("GPU 0 was requested, but\nCPU-only"), BAD_INPUT),
             (ValueError("bad.prototxt: no layer"), BAD_INPUT),
             (FileNotFoundError("gone.caffemodel"), BAD_INPUT),
             (OSError(28, "No space left on device"), FAILED)]
    printed = []
    for error, code in cases:
        assert run_tool(raising(error)) == code
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        printed.append(lines[0])
    assert printed[0] == "error: GPU 0 was requested, but CPU-only"


def test_max_pixels_flag():
    parser = tool_parser("doc")
    add_max_pixels(parser)
    assert parser.parse_args([]).max_pixels == 4_000_000
    assert parser.parse_args(["--max-pixels", "0"]).max_pixels is None  # full size
    assert parser.parse_args(["--max-pixels", "9216"]).max_pixels == 9216
    with pytest.raises(argparse.ArgumentTypeError, match="one 96x96 patch"):
        pixel_budget("9215")


def test_deploy_prototxt_of_a_net_or_the_given_file():
    assert deploy_prototxt("vgg") == str(REPO / "prototxt" / "vgg" / "deploy.prototxt")
    assert Path(deploy_prototxt("color_dropping")).is_file()
    assert deploy_prototxt("vgg", "mine.prototxt") == "mine.prototxt"
