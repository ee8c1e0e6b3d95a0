"""Pack the runtime that benchmarks/gpu_check.sh needs on a lent GPU machine.

The GPU machine (../shared/reference/gpu.md) has the NVIDIA driver, the CUDA
13 libraries (in its PyTorch's nvidia wheels), glibc/libstdc++ and Python
3.12 with no Boost.Python; nothing can be installed there, and one call
carries at most 64 MiB with the working tree. pycaffe and Caffe's Python
layer are built here for Python 3.11, so the bundle carries:

- caffe/: the CUDA install of tools/build_caffe.sh (tool, library, pycaffe);
- deps/: the shared libraries Caffe needs beyond glibc, libstdc++, the driver
  and CUDA, found by following DT_NEEDED. Two leaves are replaced by stubs
  with the same soname and symbols that abort if called: OpenCV's imgcodecs
  (Caffe calls it only for its image-file layers, which ctxpred does not
  use; the real one pulls in GDAL, codecs and 120 libraries) and libcurl
  (HDF5 calls it only for files on S3);
- python/: a Python 3.11 runtime (interpreter, libpython, standard library);
- site/: the 3.11 packages the training path imports (numpy, Pillow,
  matplotlib, h5py, protobuf, tqdm...). cv2 is not carried: OpenCV's wheel
  is built for the stable ABI, so the GPU machine's own cv2 loads in 3.11.

Writes .gpu_bundle/runtime.tar.xz and .gpu_bundle/photos.tar (a subset of
data/photos) and prints the sizes. Usage:
    .venv/bin/python benchmarks/gpu_bundle.py --caffe PREFIX
"""
import argparse
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Provided by the GPU machine: glibc, the C++ runtime, the driver, CUDA, zlib.
SYSTEM = re.compile(r"^(linux-vdso|ld-linux|libc\.|libm\.|libpthread|libdl\.|librt\.|libresolv|"
                    r"libstdc\+\+|libgcc_s|libcuda\.|libcudart|libcublas|libcurand|libz\.)")
STUBBED = ("libopencv_imgcodecs.so.406", "libcurl.so.4", "libcurl-gnutls.so.4")
SITE_PACKAGES = ("numpy", "numpy.libs", "PIL", "pillow.libs", "matplotlib", "mpl_toolkits",
                 "kiwisolver", "contourpy", "cycler", "dateutil", "packaging", "pyparsing",
                 "six.py", "tqdm", "h5py", "h5py.libs", "google", "fontTools")
# Parts of those packages that the training path never imports or reads.
SITE_LEFT_OUT = {"tests", "distutils", "f2py", "sample_data", "afm", "pdfcorefonts"}
STDLIB_LEFT_OUT = {"site-packages", "test", "idlelib", "tkinter", "turtledemo", "ensurepip",
                   "lib2to3", "__pycache__"}


def needed(path):
    """DT_NEEDED entries of a shared object or executable."""
    out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)


def resolve(objects):
    """{soname: path} as the dynamic loader here resolves the objects' dependencies."""
    found = {}
    for path in objects:
        out = subprocess.run(["ldd", str(path)], capture_output=True, text=True).stdout
        found.update(re.findall(r"^\s*(\S+) => (/\S+)", out, flags=re.M))
    return found


def dependency_closure(roots, resolved):
    """Sonames reachable from ``roots`` through DT_NEEDED, not entering stubbed or system ones."""
    keep, todo = set(), [lib for root in roots for lib in needed(root)]
    while todo:
        name = todo.pop()
        if name in keep or SYSTEM.match(name) or name.startswith(("libpython3", "libcaffe")):
            continue
        keep.add(name)
        if name not in STUBBED:
            todo.extend(needed(resolved[name]))
    return keep


def symbols(path, defined):
    """{name: (version or '', kind, size)} of a shared object's dynamic symbols."""
    flag = "--defined-only" if defined else "--undefined-only"
    out = subprocess.run(["nm", "-D", "-S", flag, str(path)], capture_output=True, text=True).stdout
    table = {}
    for line in out.splitlines():
        fields = line.split()
        if not fields:
            continue
        name_version = fields[-1]
        name, _, version = name_version.partition("@")
        kind = fields[-2]
        size = int(fields[1], 16) if len(fields) == 4 else 0
        table[name] = (version.lstrip("@"), kind, size)
    return table


def build_stub(soname, real, consumers, destination):
    """A library named ``soname`` defining what ``consumers`` import from ``real``; calls abort."""
    provided = symbols(real, defined=True)
    wanted = {}
    for consumer in consumers:
        for name, (version, kind, _) in symbols(consumer, defined=False).items():
            if name in provided:
                wanted[name] = version or provided[name][0]
    lines = ["#include <stdio.h>", "#include <stdlib.h>",
             f'static void stub(const char *name) {{ fprintf(stderr, "{soname} is a stub in the '
             f'GPU-check runtime: %s was called\\n", name); abort(); }}']
    versions = {}
    for name, version in sorted(wanted.items()):
        _, kind, size = provided[name]
        if kind in "TtWi":
            lines.append(f'void {name}(void) {{ stub("{name}"); }}')
        else:
            lines.append(f"char {name}[{max(size, 8)}];")
        versions.setdefault(version, []).append(name)
    with tempfile.TemporaryDirectory() as work:
        source, script = Path(work) / "stub.c", Path(work) / "stub.map"
        source.write_text("\n".join(lines) + "\n")
        nodes = []
        for index, (version, names) in enumerate(sorted(versions.items())):
            exported = " ".join(name + ";" for name in names)
            local = "local: *;" if index == 0 else ""
            nodes.append(f"{version or 'STUB'} {{ global: {exported} {local} }};")
        script.write_text("\n".join(nodes) + "\n")
        command = ["gcc", "-shared", "-fPIC", "-o", str(destination / soname), str(source),
                   f"-Wl,-soname,{soname}"]
        if any(versions):
            command.append(f"-Wl,--version-script={script}")
        subprocess.run(command, check=True)
    return len(wanted)


def copy_tree(source, destination, left_out=frozenset()):
    shutil.copytree(source, destination, symlinks=True,
                    ignore=lambda folder, names: [n for n in names
                                                  if n in left_out or n == "__pycache__"])


def pack(caffe_prefix, out, train_photos, heldout_photos):
    caffe_prefix = Path(caffe_prefix)
    out.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as stage_name:
        stage = Path(stage_name)
        for part in ("bin", "lib", "python"):
            copy_tree(caffe_prefix / part, stage / "caffe" / part, {"cmake", "pkgconfig"})
        shutil.copy(caffe_prefix / "build_info.json", stage / "caffe")
        roots = [caffe_prefix / "bin" / "caffe", caffe_prefix / "python" / "caffe" / "_caffe.so",
                 *sorted((caffe_prefix / "lib").glob("libcaffe.so.*.*"))]
        resolved = resolve(roots)
        deps = stage / "deps"
        deps.mkdir()
        libraries = dependency_closure(roots, resolved)
        for soname in sorted(libraries - set(STUBBED)):
            shutil.copy(resolved[soname], deps / soname)
        for soname in sorted(libraries & set(STUBBED)):
            consumers = [deps / n for n in libraries - set(STUBBED) if soname in needed(deps / n)]
            consumers += [r for r in roots if soname in needed(r)]
            count = build_stub(soname, resolved[soname], consumers, deps)
            print(f"  stub {soname}: {count} symbols")
        # Python 3.11: interpreter, libpython and the standard library.
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        (stage / "python" / "bin").mkdir(parents=True)
        (stage / "python" / "lib").mkdir()
        shutil.copy(Path(sys.base_prefix) / "bin" / "python3.11", stage / "python" / "bin")
        shutil.copy(stdlib.parent / "libpython3.11.so.1.0", stage / "python" / "lib")
        copy_tree(stdlib, stage / "python" / "lib" / "python3.11",
                  STDLIB_LEFT_OUT | {f"config-3.11-{sys.implementation._multiarch}"})
        site = Path(sysconfig.get_paths()["purelib"])
        for name in SITE_PACKAGES:
            source = site / name
            if name == "fontTools":   # pure-Python fallbacks stand in for its Cython modules
                shutil.copytree(source, stage / "site" / name, ignore=shutil.ignore_patterns(
                    "__pycache__", "*.so", "*.c"))
            elif source.is_dir():
                copy_tree(source, stage / "site" / name, SITE_LEFT_OUT)
            elif source.exists():
                shutil.copy(source, stage / "site" / name)
        for info in site.glob("*.dist-info"):
            copy_tree(info, stage / "site" / info.name)
        # Wheels' libraries were rewritten by auditwheel: stripping breaks them.
        for part in ("caffe", "deps", "python"):
            subprocess.run(f"find {stage / part} -type f \\( -name '*.so*' -o -perm -u+x \\) "
                           "-exec strip --strip-unneeded {} + 2>/dev/null", shell=True)
        sizes = {part.name: sum(f.stat().st_size for f in part.rglob("*") if f.is_file())
                 for part in stage.iterdir()}
        runtime = out / "runtime.tar.xz"
        subprocess.run(f"tar -C {stage} -cf - . | xz -T0 -6 > {runtime}", shell=True, check=True)
    photos = out / "photos.tar"
    with tarfile.open(photos, "w") as archive:
        for folder, count in (("train", train_photos), ("heldout", heldout_photos)):
            for path in sorted((REPO / "data" / "photos" / folder).iterdir())[:count]:
                archive.add(path, f"photos/{folder}/{path.name}")
    return sizes, {p.name: p.stat().st_size for p in (runtime, photos)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--caffe", required=True,
                        help="a CUDA install prefix of tools/build_caffe.sh")
    parser.add_argument("--out", default=str(REPO / ".gpu_bundle"), help="output folder")
    parser.add_argument("--train-photos", type=int, default=120, help="training photos carried")
    parser.add_argument("--heldout-photos", type=int, default=30, help="held-out photos carried")
    args = parser.parse_args(argv)
    unpacked, packed = pack(args.caffe, Path(args.out), args.train_photos, args.heldout_photos)
    mib = 1 << 20
    for name, size in sorted(unpacked.items()):
        print(f"  unpacked {name:8s} {size / mib:7.1f} MiB")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True).stdout
    tree = sum((REPO / p).stat().st_size for p in tracked.decode().split("\0") if p and
               (REPO / p).is_file())
    for name, size in packed.items():
        print(f"  {name:16s} {size / mib:7.1f} MiB")
    total = tree + sum(packed.values())
    print(f"  working tree {tree / mib:.1f} MiB; carried in all {total / mib:.1f} MiB of 64")
    return 0 if total < 64 * mib else 1


if __name__ == "__main__":
    sys.exit(main())
