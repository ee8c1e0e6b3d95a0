"""Wall time and peak memory of tools/magic_init.py -cs -d on the groupless CaffeNet.

Runs, in a child process, the project page's magic init without a loaded
model (every layer of prototxt/groupless_caffenet.prototxt initialised from
data, 227x227 input), then -cs:

  python tools/magic_init.py -q -cs -d IMAGES -nit 10 -bs 16 \\
      prototxt/groupless_caffenet.prototxt OUT.caffemodel

and prints the wall time and the peak resident memory (ru_maxrss of the
child processes, from resource.getrusage), plus the load average before and
after (the timings are wall-clock: other busy processes slow them down).

Run from the checkout after `make setup`: python benchmarks/magic_init.py
"""
import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=str(REPO / "data/photos/train/*.jpg"),
                        help="image glob for -d (default: the default photo collection)")
    parser.add_argument("--prototxt", default=str(REPO / "prototxt/groupless_caffenet.prototxt"),
                        help="net to initialise (default: the groupless CaffeNet)")
    parser.add_argument("--type", default="elwise", help="-t of magic_init (default: %(default)s)")
    parser.add_argument("-nit", type=int, default=10, help="batches (default: %(default)s)")
    parser.add_argument("-bs", type=int, default=16, help="batch size (default: %(default)s)")
    parser.add_argument("--show-output", action="store_true",
                        help="also print magic_init's own output (the summary table)")
    args = parser.parse_args(argv)
    print(f"load average before: {' '.join(f'{load:.2f}' for load in os.getloadavg())} "
          f"on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, str(REPO / "tools" / "magic_init.py"), "-q", "-cs",
                   "-d", args.images, "-t", args.type, "-nit", str(args.nit), "-bs", str(args.bs),
                   args.prototxt, str(Path(folder, "out.caffemodel"))]
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"magic_init failed ({result.returncode}):\n{result.stderr[-3000:]}")
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: KiB
    if args.show_output:
        print(result.stdout)
    print(f"magic_init -cs -d, {Path(args.prototxt).name}, -t {args.type}, -nit {args.nit} "
          f"-bs {args.bs}: wall time {wall:.1f} s, peak memory {peak_mb:.0f} MiB")
    print(f"load average after: {' '.join(f'{load:.2f}' for load in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
