#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv. Safe to run any number of times:
#   1. create .venv with python3 (>= 3.10) if it is missing;
#   2. install torch + torchvision only if they do not import there;
#   3. `pip install -e '.[dev,integrations]'` only when pyproject.toml changed since the last successful install
#      (stamp: .venv/.samkit-pyproject.sha256) or samkit does not import from this checkout;
#   4. as root, try to install Fashion-MNIST (Debian package dataset-fashion-mnist) if it is absent;
#      failing that only warns: the tests never need the real data.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.samkit-pyproject.sha256"
LOG="$VENV/setup.log"
DATA_DIR=/usr/share/datasets/fashion-mnist

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

# Run a command quietly; on failure show the end of its output and stop.
quiet() {
    if ! "$@" >>"$LOG" 2>&1; then
        printf 'setup: error: command failed: %s\n' "$*" >&2
        tail -n 30 "$LOG" >&2
        exit 1
    fi
}

# 1. The virtual environment.
if [ ! -x "$PY" ]; then
    command -v python3 >/dev/null || die "python3 not found; install Python >= 3.10"
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || die "python3 is $(python3 -V 2>&1); samkit needs Python >= 3.10"
    say "creating .venv with $(python3 -V 2>&1)"
    python3 -m venv "$VENV" || die "python3 -m venv failed (on Debian: apt-get install python3-venv)"
fi
: >"$LOG"

# 2. PyTorch: pinned releases that pip finds on this kind of machine's disk.
if ! "$PY" -c 'import torch, torchvision' >/dev/null 2>&1; then
    case "$(uname -m)" in
        aarch64 | arm64) TORCH_PINS=(torch==2.9.1 torchvision==0.24.1) ;;
        *) TORCH_PINS=(torch==2.14.1 torchvision==0.29.1) ;;
    esac
    say "installing ${TORCH_PINS[*]} (about a minute)"
    quiet "$PY" -m pip install -q --disable-pip-version-check "${TORCH_PINS[@]}"
fi

# 3. samkit itself, editable, with the dev tools.
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
here_ok=0
"$PY" - "$ROOT/src/samkit" >/dev/null 2>&1 <<'PYEOF' && here_ok=1
import importlib.util, os, sys
spec = importlib.util.find_spec("samkit")
assert spec is not None and spec.submodule_search_locations is not None
paths = [os.path.realpath(p) for p in spec.submodule_search_locations]
assert os.path.realpath(sys.argv[1]) in paths
PYEOF
if [ "$want" != "$have" ] || [ "$here_ok" != 1 ]; then
    say "installing samkit (editable) with its dev and integrations extras"
    quiet "$PY" -m pip install -q --disable-pip-version-check -e ".[dev,integrations]"
    printf '%s\n' "$want" >"$STAMP"
fi

# 4. The real data set, for `samkit train` (optional).
if [ ! -d "$DATA_DIR" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing the Fashion-MNIST data set (apt-get install dataset-fashion-mnist)"
        if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
            && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; } \
            >>"$LOG" 2>&1; then
            say "warning: could not install dataset-fashion-mnist; the tests do not need it," \
                "but 'samkit train' does (or put the four IDX files in --data-dir)"
        fi
    else
        say "note: $DATA_DIR is missing; 'samkit train' needs it" \
            "(apt-get install dataset-fashion-mnist) or --data-dir"
    fi
fi

say "ready: .venv (torch $("$PY" -c "from importlib.metadata import version as v; print(v(\"torch\"))"))"
