#!/usr/bin/env bash
# The one install script: `make setup` and docker/Dockerfile both run it, so CI exercises the
# exact steps the image uses.
#   docker/setup.sh system        apt packages only (root installs them; otherwise print the command, exit 2)
#   docker/setup.sh venv DIR      create DIR (a venv) and install the project with its pinned dependencies
#   docker/setup.sh all DIR       both (what `make setup` runs)
# Image build (docker/Dockerfile; two steps so that code edits do not reinstall torch and FFCV):
#   docker/setup.sh image-deps DIR     apt build + runtime packages (python3 too when the base has none),
#                                      user 1000, venv DIR over the base image's python, the pinned
#                                      dependencies (torch from $TORCH_INDEX_URL when set), then the compilers
#                                      removed
#   docker/setup.sh image-project DIR  the project itself (non-editable, no dev extras), then `pip check`
set -euo pipefail

# FFCV builds against opencv4 + libturbojpeg found through pkg-config; Fashion-MNIST feeds the demo;
# prometheus is the real server the metrics tests scrape with.
APT_PACKAGES=(pkg-config libturbojpeg0-dev libopencv-dev dataset-fashion-mnist prometheus)

# Image: the default base (debian:bookworm-slim) ships no compiler, and FFCV compiles one C++ file at install time.
IMAGE_BUILD_PACKAGES=(build-essential pkg-config libturbojpeg0-dev libopencv-dev)
# A base without python (debian:bookworm-slim) gets the distribution's: python3 (3.11 on Debian 12) and its venv
# module stay in the image; the headers (python3-dev, for FFCV's extension) go with the compilers.
IMAGE_PYTHON_PACKAGES=(python3 python3-venv)
# pip's opencv-python (an FFCV dependency, imported by ffcv.fields) needs libGL and GLib to import cv2.
IMAGE_RUNTIME_PACKAGES=(ca-certificates libgl1 libglib2.0-0)
# Installed when the base's distribution has it: lets the demo's conversion Job run without a download.
IMAGE_OPTIONAL_PACKAGES=(dataset-fashion-mnist)
IMAGE_UID=1000

system() {
    local missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: missing system packages; run: sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
        exit 2
    fi
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
}

venv() {
    local dir=$1 root extras=${EXTRAS:-dev}
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    # Reinstall only when pyproject.toml changed since the last successful install (idempotent, fast).
    local stamp="$dir/.installed-$(sha256sum "$root/pyproject.toml" | cut -c1-16)-$extras"
    [ -f "$stamp" ] && return 0
    [ -x "$dir/bin/python" ] || python3 -m venv "$dir"
    "$dir/bin/python" -m pip install -q --upgrade pip
    "$dir/bin/python" -m pip install -q -e "$root[$extras]"
    rm -f "$dir"/.installed-*
    touch "$stamp"
}

# ---------------------------------------------------------------------------------------------------
# Image steps (run as root inside `docker build`; they never touch a developer machine).

_base_python() {
    # pytorch/pytorch images put conda's python first on PATH as `python`; plain Debian/Ubuntu has python3
    # (debian:bookworm-slim has none until image-deps installs it).
    command -v python || command -v python3 || { echo "setup: the base image has no python" >&2; return 2; }
}

# The deb packages that provide the shared libraries FILE links against (so they survive the purge).
_packages_of_libs() {
    local file=$1 lib
    ldd "$file" | awk '$3 ~ /^\// {print $3}' | while read -r lib; do
        # usrmerge: ldd may say /lib/... while dpkg recorded /usr/lib/... (or the other way round)
        dpkg-query -S "$lib" 2>/dev/null || dpkg-query -S "/usr$lib" 2>/dev/null \
            || dpkg-query -S "$(readlink -f "$lib")" 2>/dev/null || true
    done | cut -d: -f1 | sort -u
}

image_deps() {
    local dir=$1 root base_py optional=() pkg
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    [ "$(id -u)" -eq 0 ] || { echo "setup: image-deps runs as root inside docker build" >&2; exit 2; }
    export DEBIAN_FRONTEND=noninteractive
    # What the base already has stays, whatever this step removes later (see the purge below).
    local before
    mapfile -t before < <(dpkg-query -W -f='${db:Status-Abbrev}${Package}\n' | awk '/^ii/ {print substr($0, 4)}')
    apt-get update -q
    for pkg in "${IMAGE_OPTIONAL_PACKAGES[@]}"; do
        apt-cache show "$pkg" >/dev/null 2>&1 && optional+=("$pkg")
    done
    local build=("${IMAGE_BUILD_PACKAGES[@]}") runtime=("${IMAGE_RUNTIME_PACKAGES[@]}")
    if base_py=$(_base_python 2>/dev/null); then
        # FFCV's extension needs Python.h: conda's python ships it, a distribution python needs python3-dev;
        # a distribution python without ensurepip cannot make the venv (Debian/Ubuntu split it into python3-venv).
        [ -f "$("$base_py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] \
            || build+=(python3-dev)
        "$base_py" -c 'import ensurepip' 2>/dev/null || runtime+=(python3-venv)
    else
        runtime+=("${IMAGE_PYTHON_PACKAGES[@]}")
        build+=(python3-dev)
    fi
    apt-get install -y -q --no-install-recommends "${build[@]}" "${runtime[@]}" "${optional[@]}"
    base_py=$(_base_python)
    echo "setup: base python $base_py ($("$base_py" -c 'import sys; print(sys.version.split()[0])'))"

    # Non-root user 1000 (the pod runs as uid 1000 whatever the name; some bases already have one).
    getent group "$IMAGE_UID" >/dev/null || groupadd -g "$IMAGE_UID" app
    getent passwd "$IMAGE_UID" >/dev/null || useradd -l -M -d /tmp -s /bin/bash -u "$IMAGE_UID" -g "$IMAGE_UID" app

    # --system-site-packages: the base image's torch (same pinned version) is reused instead of
    # downloading ~5 GB of CUDA wheels again; pip installs only what is missing or differs.
    [ -x "$dir/bin/python" ] || "$base_py" -m venv --system-site-packages "$dir"
    "$dir/bin/python" -m pip install --no-cache-dir -q --upgrade pip
    local deps
    deps=$("$dir/bin/python" - "$root/pyproject.toml" <<'EOF'
import sys
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip vendors a TOML reader
    from pip._vendor import tomli as tomllib
with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["dependencies"]))
EOF
)
    mapfile -t deps <<<"$deps"
    # TORCH_INDEX_URL (docker build --build-arg): the pinned torch/torchvision from another index first, e.g.
    # https://download.pytorch.org/whl/cu126 for drivers older than 580; the next install keeps them (same version).
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        local torch_pins=()
        mapfile -t torch_pins < <(printf '%s\n' "${deps[@]}" | grep -E '^(torch|torchvision)==')
        "$dir/bin/python" -m pip install --no-cache-dir -q --index-url "$TORCH_INDEX_URL" "${torch_pins[@]}"
    fi
    "$dir/bin/python" -m pip install --no-cache-dir -q "${deps[@]}"

    # Keep the libraries FFCV's extension links (OpenCV core/imgproc, turbojpeg) and the base's own packages;
    # drop the compilers and headers this step added. Recommends must not keep them (libc6-dev recommends
    # gcc), hence RecommendsImportant=false, which is safe because every pre-existing package is manual.
    local so keep purge=()
    so=$("$dir/bin/python" -c 'import ffcv._libffcv as m; print(m.__file__)')
    mapfile -t keep < <(_packages_of_libs "$so")
    apt-mark manual "${before[@]}" "${keep[@]}" "${runtime[@]}" "${optional[@]}" >/dev/null
    for pkg in "${build[@]}"; do
        printf '%s\n' "${before[@]}" | grep -qx "$pkg" || purge+=("$pkg")
    done
    [ ${#purge[@]} -eq 0 ] || apt-get purge -y -q --auto-remove -o APT::AutoRemove::RecommendsImportant=false \
        -o APT::AutoRemove::SuggestsImportant=false "${purge[@]}" >/dev/null
    ! command -v g++ >/dev/null || echo "setup: note: a C++ compiler remains (the base image has one)" >&2
    "$dir/bin/python" -c 'import ffcv.libffcv, cv2' \
        || { echo "setup: FFCV lost a shared library in the purge" >&2; exit 1; }
    apt-get clean
    rm -rf /var/lib/apt/lists/* /root/.cache
}

image_project() {
    local dir=$1 root
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    "$dir/bin/python" -m pip install --no-cache-dir -q --no-deps "$root"
    # `pip check` also sees the base image's own packages (conda bases often carry unrelated conflicts),
    # so it only warns; the import check below is the hard gate.
    "$dir/bin/python" -m pip check || echo "setup: warning: pip check reported conflicts (see above)" >&2
    (cd / && "$dir/bin/python" - "$root/pyproject.toml" <<'EOF'
import re, sys
import boto3, ffcv.libffcv, kubernetes, prometheus_client, torch, torchvision, yaml  # noqa: F401
from trainer.config import list_recipes
pin = re.search(r'"torch==([^"]+)"', open(sys.argv[1]).read()).group(1)
if torch.__version__.split("+")[0] != pin:
    sys.exit(f"setup: the image has torch {torch.__version__}, pyproject.toml pins {pin}")
print(f"setup: torch {torch.__version__} (CUDA {torch.version.cuda}), {len(list_recipes())} recipes installed")
EOF
    )
    rm -rf "$root/build" "$root"/*.egg-info /root/.cache
}

case "${1:-}" in
    system) system ;;
    venv) venv "${2:?venv DIR}" ;;
    all) system; venv "${2:?all DIR}" ;;
    image-deps) image_deps "${2:?image-deps DIR}" ;;
    image-project) image_project "${2:?image-project DIR}" ;;
    *) echo "usage: $0 {system|venv DIR|all DIR|image-deps DIR|image-project DIR}" >&2; exit 2 ;;
esac
