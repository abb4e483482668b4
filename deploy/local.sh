#!/usr/bin/env bash
# The one entry point for running hl7bridge from a checkout:
#
#   bash deploy/local.sh dev [ARGS...]     the bridge with an embedded ZooKeeper and broker
#   bash deploy/local.sh test [ARGS...]    ruff, mypy, then pytest (default: the whole suite, -q)
#
# On a fresh Debian 12 it first installs what is missing: ZooKeeper and Java
# (apt), python3-venv (apt), the virtualenv in .venv and the project into it
# (pip; again whenever pyproject.toml changes). Everything it says goes to
# stderr: `hl7bridge dev` keeps stdout for its `ready` line.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo_root/.venv"
stamp="$venv/.hl7bridge-installed"
zookeeper_jar=/usr/share/java/zookeeper.jar

say() { printf 'local.sh: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

usage() {
    cat >&2 <<'EOF'
usage: bash deploy/local.sh dev [hl7bridge dev ARGS...]
       bash deploy/local.sh test [pytest ARGS...]
EOF
    exit 2
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

apt_updated=no
apt_install() {
    say "installing Debian packages: $*"
    if [ "$apt_updated" = no ]; then
        as_root apt-get update >&2
        apt_updated=yes
    fi
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "$@" >&2
}

ensure_system_packages() {
    local wanted=()
    command -v python3 >/dev/null 2>&1 || wanted+=(python3 python3-venv)
    # The TLS tests make their certificates with the openssl command.
    command -v openssl >/dev/null 2>&1 || wanted+=(openssl)
    if ! command -v java >/dev/null 2>&1 || [ ! -f "$zookeeper_jar" ]; then
        wanted+=(zookeeper default-jre-headless)
    fi
    if [ "${#wanted[@]}" -gt 0 ]; then
        apt_install "${wanted[@]}"
    fi
}

ensure_venv() {
    if [ ! -x "$venv/bin/python" ]; then
        say "creating the virtualenv $venv"
        if ! python3 -m venv "$venv" >&2; then
            # Debian splits venv (and ensurepip) out of python3.
            rm -rf "$venv"
            apt_install python3-venv
            python3 -m venv "$venv" >&2
        fi
    fi
    if [ ! -f "$stamp" ] || [ "$repo_root/pyproject.toml" -nt "$stamp" ]; then
        say "installing hl7bridge and its test tools into $venv"
        (cd "$repo_root" && "$venv/bin/python" -m pip install --disable-pip-version-check \
            -e '.[test]' >&2)
        touch "$stamp"
    fi
}

run_tests() {
    cd "$repo_root"
    say "ruff check and format check"
    "$venv/bin/ruff" check .
    "$venv/bin/ruff" format --check .
    say "mypy (strict, on the files set in pyproject.toml)"
    "$venv/bin/mypy"
    say "pytest"
    if [ "$#" -eq 0 ]; then
        set -- -q
    fi
    "$venv/bin/python" -m pytest "$@"
}

[ "$#" -ge 1 ] || usage
command=$1
shift
case "$command" in
    dev | test) ;;
    *) usage ;;
esac

ensure_system_packages
ensure_venv

case "$command" in
    dev) exec "$venv/bin/hl7bridge" dev "$@" ;;
    test) run_tests "$@" ;;
esac
