#!/usr/bin/env python3
"""Assemble ctxpred's default collection of real photographs into
OUT/train/, OUT/heldout/ and OUT/manifest.json (JPEG tiles of 400k-1M
pixels; the split is by source photo, fixed in --sources).

Sources: scikit-image's sample photos and wallpaper photos from the
Debian packages in --sources, fetched without root by
  cd CACHE && apt-get download PACKAGE
and unpacked there by 'dpkg-deb -x'. A collection that already
matches its manifest is left as it is (a warm run takes ~0.1 s).
The library side is ctxpred/data/collection.py.
"""
import argparse
import logging
import os
import sys
import time
from pathlib import Path

from ctxpred.data.collection import (DEFAULT_OUT, DEFAULT_SOURCES, CollectionError,
                                     default_cache_dir, make_collection)

log = logging.getLogger("make_collection")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__,
        epilog="To train on your own photos instead, point the training tools at "
               "your folder, glob, image list or LMDB; this collection is only a default.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="output folder (default: %(default)s)")
    parser.add_argument("--sources", type=Path, default=DEFAULT_SOURCES,
                        help="JSON list of source photos and the held-out split "
                             "(default: %(default)s)")
    parser.add_argument("--cache", type=Path, default=default_cache_dir(),
                        help="where .deb files are downloaded and unpacked "
                             "(default: %(default)s)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="threads that cut photos (default: %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild even if the collection is current")
    parser.add_argument("--quiet", action="store_true", help="print only errors")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(message)s")
    started = time.monotonic()
    try:
        manifest, rebuilt = make_collection(args.out, args.sources, args.cache,
                                            args.workers, args.force)
    except CollectionError as error:
        print(f"make_collection: error: {error}", file=sys.stderr)
        return 2
    counts = manifest["counts"]
    log.info("%s %s: %d train / %d heldout images (%.1f s)",
             "built" if rebuilt else "up to date:", args.out.resolve(),
             counts["train"], counts["heldout"], time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
