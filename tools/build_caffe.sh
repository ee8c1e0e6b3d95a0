#!/usr/bin/env bash
# Build BVLC Caffe (pycaffe, Python layer, LMDB, HDF5, OpenCV, OpenBLAS) from a
# pinned PyPI source, patched by tools/caffe_patches/, into a cache folder
# outside the checkout, and link it into a Python virtual environment.
#
# Run `tools/build_caffe.sh --help` for the options.
set -euo pipefail

readonly SOURCE_PACKAGE=brocolli-caffe
readonly SOURCE_VERSION=3.0.0   # BVLC Caffe master 9b891540, see ../shared/reference
readonly SOURCE_SHA256=ad7ba487552f4343df25044a9fa14812a96add48ea2ff993b53bf2dafe8248e2
readonly DEBIAN_PACKAGES="build-essential cmake libprotobuf-dev protobuf-compiler \
libgoogle-glog-dev libgflags-dev libhdf5-dev liblmdb-dev libleveldb-dev libsnappy-dev \
libopencv-dev libopenblas-dev libboost-system-dev libboost-thread-dev \
libboost-filesystem-dev libboost-python-dev libboost-regex-dev ccache"
# CMake options of every build; with the patches, the flavour and the Python
# version they make up the cache key.
readonly CMAKE_OPTIONS=(
  -DCMAKE_BUILD_TYPE=Release -DBLAS=Open
  -DBUILD_python=ON -Dpython_version=3 -DBUILD_python_layer=ON
  -DUSE_OPENCV=ON -DUSE_LMDB=ON -DUSE_LEVELDB=ON -DUSE_HDF5=ON
  -DBUILD_docs=OFF -DBUILD_matlab=OFF
)

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
patch_dir="$here/caffe_patches"

python=""
cuda=0
cuda_arch=""          # default chosen from the toolkit's major version below
cuda_toolkit=auto
jobs=$(nproc)
cache="${CTXPRED_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ctxpred}"

usage() {
  cat <<EOF
Usage: tools/build_caffe.sh [options]

Builds Caffe ${SOURCE_VERSION} (PyPI sdist ${SOURCE_PACKAGE}, BVLC master 9b891540)
with the patches in tools/caffe_patches/ and installs it under
  ${cache}/caffe-<cpu|cuda>-<key>/
where <key> hashes the source, the patches, the build options and the Python
version, so a second run finds the finished install and takes seconds. The
build happens in a temporary folder that is moved into place only when
complete; an interrupted or corrupt install is rebuilt.

When --python names a virtual environment's interpreter, the install is linked
into it: a ctxpred_caffe.pth file makes 'import caffe' work, and a 'caffe'
wrapper in the venv's bin/ runs the command-line tool with the venv's
site-packages on PYTHONPATH (needed by Python layers under 'caffe train').

Options:
  --python PY      interpreter to build pycaffe for and to link into
                   (default: .venv/bin/python of the checkout if present,
                   else python3). numpy must be installed in it.
  --cuda           build with CUDA (CPU_ONLY=OFF, no cuDNN). The toolkit is
                   the one of nvcc on PATH (CUDA 12.x or 13.x) when it also
                   has cuBLAS and cuRAND; otherwise the CUDA 13.0 wheels
                   pinned in tools/cuda_wheels.txt are installed from PyPI
                   into the cache (no root needed; tools/cuda_toolkit.py).
                   Needs no GPU or driver to build.
  --cuda-toolkit auto|pypi|DIR
                   where the toolkit comes from: auto (above), pypi (always
                   the pinned wheels), or a toolkit root DIR (default: auto).
  --cuda-arch LIST compute capabilities to build for, e.g. "90" or "80;90"
                   (default for CUDA 13: 75;80;86;89;90;100;120, Turing and
                   newer; for CUDA 12: 60;70;75;80;86;89;90). Fewer
                   architectures build faster: each one adds minutes.
  --jobs N         parallel compile jobs (default: nproc = ${jobs}).
  --cache DIR      cache folder (default: ${cache}; env CTXPRED_CACHE).
  --print-prefix   print the install folder the options select and exit.
  -h, --help       show this help.

Missing Debian packages are installed with apt-get when run as root;
otherwise the script prints the apt-get line to run and exits with status 2.
EOF
}

print_prefix=0
while [ $# -gt 0 ]; do
  case "$1" in
    --python) python="$2"; shift 2 ;;
    --cuda) cuda=1; shift ;;
    --cuda-arch) cuda_arch="$2"; shift 2 ;;
    --cuda-toolkit) cuda_toolkit="$2"; shift 2 ;;
    --jobs) jobs="$2"; shift 2 ;;
    --cache) cache="$2"; shift 2 ;;
    --print-prefix) print_prefix=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "build_caffe.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done

say() { echo "[build_caffe] $*" >&2; }
die() { echo "[build_caffe] error: $*" >&2; exit 1; }

if [ -z "$python" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
command -v "$python" >/dev/null || die "Python interpreter '$python' not found"
python=$(command -v "$python")

# A toolkit root is usable when it has nvcc, the runtime, cuBLAS and cuRAND.
toolkit_is_complete() {
  [ -x "$1/bin/nvcc" ] && [ -f "$1/include/cuda_runtime.h" ] && [ -f "$1/include/cublas_v2.h" ] &&
  [ -f "$1/include/curand.h" ] && ls "$1"/lib*/libcublas.so >/dev/null 2>&1 &&
  ls "$1"/lib*/libcurand.so >/dev/null 2>&1
}

if [ "$cuda" = 1 ]; then
  case "$cuda_toolkit" in
    auto)
      nvcc=$(command -v nvcc || true)
      cuda_root=""
      if [ -n "$nvcc" ]; then
        # nvcc may be a wrapper script: ask it where it lives.
        cuda_root=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
        top=$(cd /tmp && "$nvcc" -dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
        [ -n "$top" ] && cuda_root=$(readlink -f "$top")
      fi
      if [ -n "$cuda_root" ] && toolkit_is_complete "$cuda_root"; then
        say "using the CUDA toolkit of $nvcc ($cuda_root)"
      else
        [ -n "$nvcc" ] && say "the CUDA toolkit at ${cuda_root:-$nvcc} lacks cuBLAS or cuRAND: using the pinned PyPI wheels"
        cuda_toolkit=pypi
      fi ;;
    pypi) ;;
    *) cuda_root=$(readlink -f "$cuda_toolkit")
       toolkit_is_complete "$cuda_root" || die "--cuda-toolkit $cuda_toolkit: not a CUDA toolkit root with bin/nvcc, cuda_runtime.h, cuBLAS and cuRAND" ;;
  esac
  if [ "$cuda_toolkit" = pypi ]; then
    mkdir -p "$cache"
    cuda_root=$(PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$python" "$here/cuda_toolkit.py" \
                  --cache "$cache" --python "$python") ||
      die "could not install the CUDA toolkit wheels (message above); nothing was left in $cache"
  fi
  cuda_version=$("$cuda_root/bin/nvcc" --version | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p')
  [ -n "$cuda_version" ] || die "cannot read the CUDA version from $cuda_root/bin/nvcc --version"
  case "$cuda_version" in
    13.*) default_arch="75;80;86;89;90;100;120" ;;
    12.*) default_arch="60;70;75;80;86;89;90" ;;
    *) die "CUDA $cuda_version at $cuda_root is not supported: use CUDA 12.x or 13.x (or --cuda-toolkit pypi)" ;;
  esac
  cuda_arch=${cuda_arch:-$default_arch}
  flavour=cuda
else
  flavour=cpu
fi

py_version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
# CUDA-only patches (tools/caffe_patches/cuda/) and the toolkit version enter
# the key of CUDA builds only, so the CPU install is unaffected by them.
patches=("$patch_dir"/*.patch)
[ "$cuda" = 0 ] || patches+=("$patch_dir"/cuda/*.patch)
key=$( { echo "$SOURCE_PACKAGE $SOURCE_VERSION $SOURCE_SHA256 $flavour $py_version";
         if [ "$cuda" = 1 ]; then echo "cuda $cuda_version $cuda_arch"; fi
         printf '%s\n' "${CMAKE_OPTIONS[@]}"; cat "${patches[@]}"; } | sha256sum | cut -c1-12)
prefix="$cache/caffe-$flavour-$key"
if [ "$print_prefix" = 1 ]; then echo "$prefix"; exit 0; fi

# A finished install has its marker, the library, the tool and the Python
# extension, and imports; anything less is rebuilt.
install_is_complete() {
  [ -f "$prefix/.complete" ] && [ -x "$prefix/bin/caffe" ] &&
  [ -f "$prefix/python/caffe/_caffe.so" ] && ls "$prefix"/lib/libcaffe.so* >/dev/null 2>&1 &&
  PYTHONPATH="$prefix/python" GLOG_minloglevel=2 "$python" -c 'import caffe' >/dev/null 2>&1
}

link_into_venv() {
  local venv_prefix site
  venv_prefix=$("$python" -c 'import sys; print(sys.prefix if sys.prefix != sys.base_prefix else "")')
  if [ -z "$venv_prefix" ]; then
    say "$python is not a virtual environment: set PYTHONPATH=$prefix/python to import caffe"
    return
  fi
  site=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$prefix/python" > "$site/ctxpred_caffe.pth"
  # The tool embeds the base interpreter, which ignores the venv: a
  # sitecustomize on its PYTHONPATH adds the venv's site-packages, .pth files
  # included (editable installs, pycaffe), ahead of the base ones.
  mkdir -p "$venv_prefix/lib/caffe-tool-site"
  cat > "$venv_prefix/lib/caffe-tool-site/sitecustomize.py" <<EOF
import site
import sys

_base = list(sys.path)
site.addsitedir("$site")
sys.path[:] = [p for p in sys.path if p not in _base] + _base
EOF
  cat > "$venv_prefix/bin/caffe" <<EOF
#!/bin/sh
# Caffe's command-line tool with this venv's Python packages, for Python
# layers under 'caffe train'. Generated by tools/build_caffe.sh.
export PYTHONPATH="$venv_prefix/lib/caffe-tool-site\${PYTHONPATH:+:\$PYTHONPATH}"
exec "$prefix/bin/caffe" "\$@"
EOF
  chmod +x "$venv_prefix/bin/caffe"
  say "linked into $venv_prefix (ctxpred_caffe.pth, bin/caffe)"
}

if install_is_complete; then
  say "Caffe already built: $prefix"
  link_into_venv
  echo "$prefix"
  exit 0
fi
[ -e "$prefix" ] && { say "incomplete or broken install at $prefix: rebuilding"; rm -rf "$prefix"; }

missing=$(for p in $DEBIAN_PACKAGES; do
  dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
done | tr '\n' ' ')
if [ -n "${missing// /}" ]; then
  if [ "$(id -u)" = 0 ]; then
    say "installing Debian packages: $missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >&2
  else
    echo "[build_caffe] missing Debian packages. Run:" >&2
    echo "  sudo apt-get install -y --no-install-recommends $missing" >&2
    exit 2
  fi
fi

"$python" -c 'import numpy' 2>/dev/null || die "numpy is not installed in $python (CMake reads its headers): $python -m pip install numpy"

mkdir -p "$cache/src"
tarball="$cache/src/$SOURCE_PACKAGE-$SOURCE_VERSION.tar.gz"
if [ ! -f "$tarball" ] || ! echo "$SOURCE_SHA256  $tarball" | sha256sum -c --quiet 2>/dev/null; then
  say "downloading $SOURCE_PACKAGE==$SOURCE_VERSION from PyPI"
  rm -f "$tarball"
  "$python" -m pip download -q --no-deps --no-binary :all: -d "$cache/src" "$SOURCE_PACKAGE==$SOURCE_VERSION" >&2
  echo "$SOURCE_SHA256  $tarball" | sha256sum -c --quiet || die "checksum mismatch for $tarball"
fi

work=$(mktemp -d "$cache/build-XXXXXX")
trap 'rm -rf "$work"' EXIT
tar -xzf "$tarball" -C "$work"
src="$work/$SOURCE_PACKAGE-$SOURCE_VERSION"
for p in "${patches[@]}"; do
  patch -d "$src" -p1 --quiet --forward < "$p" || die "patch $(basename "$p") does not apply"
done

py_include=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
py_library=$("$python" -c 'import os, sysconfig; print(os.path.join(sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")))')
[ -f "$py_include/Python.h" ] && [ -e "$py_library" ] ||
  die "$python has no development files (Python.h, $py_library); on Debian: sudo apt-get install python3-dev"
cmake_args=("${CMAKE_OPTIONS[@]}"
  -DPYTHON_EXECUTABLE="$python" -DPYTHON_INCLUDE_DIR="$py_include" -DPYTHON_LIBRARY="$py_library"
  -DCMAKE_INSTALL_PREFIX="$prefix")
if [ "$cuda" = 1 ]; then
  cmake_args+=(-DCPU_ONLY=OFF -DUSE_CUDNN=OFF -DCUDA_ARCH_NAME=Manual
               "-DCUDA_ARCH_BIN=${cuda_arch//;/ }" -DCUDA_ARCH_PTX=""
               -DCUDA_TOOLKIT_ROOT_DIR="$cuda_root")
else
  cmake_args+=(-DCPU_ONLY=ON)
fi
if command -v ccache >/dev/null; then
  cmake_args+=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
  # Paths relative to the temporary folder, so rebuilds hit the cache.
  export CCACHE_BASEDIR="$work"
  if [ "$cuda" = 1 ]; then
    # FindCUDA calls nvcc directly: a wrapper sends the .cu files through ccache too.
    printf '#!/bin/sh\nexec ccache "%s" "$@"\n' "$cuda_root/bin/nvcc" > "$work/nvcc-ccache"
    chmod +x "$work/nvcc-ccache"
    cmake_args+=(-DCUDA_NVCC_EXECUTABLE="$work/nvcc-ccache")
  fi
  say "using ccache"
fi

say "configuring ($flavour) in $work"
cmake -S "$src" -B "$work/build" "${cmake_args[@]}" > "$work/configure.log" 2>&1 ||
  { tail -40 "$work/configure.log" >&2; die "cmake configure failed (log above)"; }
say "compiling with $jobs jobs (a few minutes on 2 cores)"
# Staged install (DESTDIR): run paths name the final folder, which only
# appears once the build is complete.
make -C "$work/build" -j"$jobs" install DESTDIR="$work/stage" > "$work/build.log" 2>&1 ||
  { grep -B5 -A20 -m3 "error" "$work/build.log" >&2 || tail -60 "$work/build.log" >&2; die "build failed (log above)"; }

staged="$work/stage$prefix"
cp "$work/build.log" "$staged/build.log"
printf '{"source": "%s==%s", "cuda": %s, "cuda_version": "%s", "cuda_arch": "%s", "cuda_root": "%s", "python": "%s"}\n' \
  "$SOURCE_PACKAGE" "$SOURCE_VERSION" "$([ "$cuda" = 1 ] && echo true || echo false)" \
  "${cuda_version:-}" "${cuda_arch:-}" "${cuda_root:-}" "$py_version" > "$staged/build_info.json"
touch "$staged/.complete"
mv "$staged" "$prefix"
install_is_complete || die "the new install at $prefix does not import; see $prefix"
say "installed $prefix"
link_into_venv
echo "$prefix"
