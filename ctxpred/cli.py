"""One exit-code convention for every command-line tool in tools/.

====  ==========================================================================
0     done
1     failed while running (an I/O error, a full disk, a failed check, a
      loader that died or stalled)
2     bad arguments or input (a missing or damaged file, a prototxt Caffe
      cannot build, weights that do not fit, a source without usable images)
3     training diverged
130   interrupted (a third Ctrl-C abandoned the snapshot being written)
====  ==========================================================================

Every error is one line on stderr starting with ``error:``, naming the file
(and layer or value) at fault; no traceback. Below the convention: the flags
most tools share (images, weights, net/deploy, seed, gpu), written once.
"""
import argparse
import sys
import warnings
from pathlib import Path

DONE, FAILED, BAD_INPUT, DIVERGED, INTERRUPTED = 0, 1, 2, 3, 130


def _one_line_warning(message, category, filename, lineno, line=None):
    return f"warning: {message}\n"


def fail(message, code=BAD_INPUT):
    """Print ``error: message`` as one line on stderr; returns ``code`` for ``return fail(...)``."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return code


def exit_code(error):
    """The convention's code for an exception: 2 for bad input, 1 for a failure while running.

    FileNotFoundError and ValueError (a missing file, a bad prototxt or model,
    weights that do not fit, no usable image: the library's input errors all
    derive from ValueError) are bad input; other OSErrors (reading or writing
    while running: a full disk, an I/O error) and RuntimeError (a failed
    loader) are failures. An exception class may carry its own ``exit_code``
    (training's DivergenceError: 3).
    """
    default = BAD_INPUT if isinstance(error, (FileNotFoundError, ValueError)) else FAILED
    return getattr(error, "exit_code", default)


def run_tool(main, argv=None):
    """``main(argv)``'s exit code (None counts as 0); an OSError, ValueError or
    RuntimeError it raises becomes one line and :func:`exit_code`'s code,
    KeyboardInterrupt 130; a missing pycaffe (or a GPU asked of a CPU-only
    build: :class:`ctxpred.caffe.env.CaffeNotAvailable`) is bad input, 2, so a
    tool calls ``load_caffe(gpu=args.gpu)`` without catching it. Warnings (a
    skipped image, ignored files) print as one line each, ``warning: ...``."""
    from ctxpred.caffe.env import CaffeNotAvailable

    warnings.formatwarning = _one_line_warning
    try:
        return main(argv) or DONE
    except CaffeNotAvailable as error:
        return fail(error, BAD_INPUT)
    except (OSError, ValueError, RuntimeError) as error:
        return fail(error, exit_code(error))
    except KeyboardInterrupt:
        return fail("interrupted", INTERRUPTED)


# The flags most tools share, written once. Each adds one flag with its help text.

REPO = Path(__file__).resolve().parents[1]


def tool_parser(doc):
    """An ArgumentParser whose --help shows the tool's module docstring as written."""
    return argparse.ArgumentParser(description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def positive_int(text):
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def comma_separated(kind):
    """argparse type: a comma-separated list of ``kind`` values, as a tuple."""
    return lambda text: tuple(kind(item) for item in text.split(",") if item)


def commas(values):
    """'a,b,c': a default as the user would type it for a :func:`comma_separated` flag."""
    return ",".join(map(str, values))


def existing_file(text):
    """argparse type: the path of a file that exists (bad input otherwise: exit 2)."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"file {text} does not exist")
    return text


def add_images(parser, required=True, default=None, extra=""):
    parser.add_argument("--images", required=required, default=default,
                        help="images: folder (recursive), glob, image file, list file or Caffe "
                             "LMDB" + extra
                             + ("" if default is None else " (default: %(default)s)"))


def add_weights(parser, multiple=False, extra=""):
    parser.add_argument("--weights", required=True, type=existing_file,
                        nargs="+" if multiple else None,
                        help="caffemodel (binary or HDF5 .h5)" + extra)


def add_net(parser, deploy=True):
    """--net (one of the released architectures) and, with ``deploy``, --deploy to override
    the deploy prototxt it picks; resolve them with :func:`deploy_prototxt`."""
    from ctxpred.models.context import NET_NAMES
    parser.add_argument("--net", choices=NET_NAMES, default="color_dropping",
                        help="architecture: picks prototxt/<net>/deploy.prototxt of this "
                             "checkout (default: %(default)s)")
    if deploy:
        parser.add_argument("--deploy", default=None, type=existing_file,
                            help="deploy prototxt to use instead of the one --net picks")


def deploy_prototxt(net, deploy=None):
    """The deploy prototxt a tool uses: ``deploy`` if given, else prototxt/<net>/deploy.prototxt."""
    return str(deploy or REPO / "prototxt" / net / "deploy.prototxt")


def pixel_budget(text):
    """argparse type of --max-pixels: 0 -> None (full size), else at least one 96x96 patch."""
    value = int(text)
    if value and value < 96 * 96:
        raise argparse.ArgumentTypeError(f"{text} is less than one 96x96 patch (9216 pixels)")
    return value or None


def add_max_pixels(parser):
    """--max-pixels: images are shrunk to at most that many pixels before patches are cut."""
    from ctxpred.data.images import DEFAULT_MAX_PIXELS
    parser.add_argument("--max-pixels", type=pixel_budget, default=DEFAULT_MAX_PIXELS,
                        help="shrink images above this many pixels to it (aspect kept; JPEGs are "
                             "decoded at a reduced scale, so memory stays bounded) before "
                             "cutting patches (default: %(default)s; 0: full size)")


def add_seed(parser, what="random choices"):
    parser.add_argument("--seed", type=int, default=0,
                        help=f"seed of the {what}; the same seed gives the same result "
                             "(default: %(default)s)")


def add_gpu(parser):
    parser.add_argument("--gpu", type=int, default=None, metavar="DEVICE",
                        help="CUDA device to run the net on (default: the CPU)")


def add_set_builder_flags(parser, default_out):
    """--out, --photos and --cache of the data/ scripts that compose sets from the photo
    collection and the tuxpaint stamps."""
    from ctxpred.data.collection import DEFAULT_OUT, default_cache_dir
    parser.add_argument("--out", type=Path, default=default_out,
                        help="output folder (default: %(default)s)")
    parser.add_argument("--photos", type=Path, default=DEFAULT_OUT,
                        help="the photo collection used as backgrounds; made first if missing "
                             "(default: %(default)s)")
    parser.add_argument("--cache", type=Path, default=default_cache_dir(),
                        help="where the .deb is downloaded and unpacked (default: %(default)s)")
