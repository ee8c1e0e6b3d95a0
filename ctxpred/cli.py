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
(and layer or value) at fault; no traceback.
"""
import sys
import warnings

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
    KeyboardInterrupt 130. Warnings (a skipped image, ignored files) print as
    one line each, ``warning: ...``."""
    warnings.formatwarning = _one_line_warning
    try:
        return main(argv) or DONE
    except (OSError, ValueError, RuntimeError) as error:
        return fail(error, exit_code(error))
    except KeyboardInterrupt:
        return fail("interrupted", INTERRUPTED)
