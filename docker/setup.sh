#!/usr/bin/env bash
# The one install script: `make setup` and docker/Dockerfile both run it, so CI exercises the
# exact steps the image uses.
#   docker/setup.sh system        apt packages only (root installs them; otherwise print the command, exit 2)
#   docker/setup.sh venv DIR      create DIR (a venv) and install the project with its pinned dependencies
#   docker/setup.sh all DIR       both (what `make setup` runs)
set -euo pipefail

# FFCV builds against opencv4 + libturbojpeg found through pkg-config; Fashion-MNIST feeds the demo;
# prometheus is the real server the metrics tests scrape with.
APT_PACKAGES=(pkg-config libturbojpeg0-dev libopencv-dev dataset-fashion-mnist prometheus)

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

case "${1:-}" in
    system) system ;;
    venv) venv "${2:?venv DIR}" ;;
    all) system; venv "${2:?all DIR}" ;;
    *) echo "usage: $0 {system|venv DIR|all DIR}" >&2; exit 2 ;;
esac
