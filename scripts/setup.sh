# Sourced by scripts/test and scripts/serve: what a fresh machine needs before devicegate runs.
# shellcheck shell=bash

# install_debian_packages NAME...: apt-get the named packages, as root or through sudo.
install_debian_packages() {
  [ $# -gt 0 ] || return 0
  echo "==> installing $* with apt-get"
  local as_root=()
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "devicegate: need root or sudo to install $*; install them and run again" >&2
      exit 1
    fi
    as_root=(sudo)
  fi
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# ensure_venv EXTRA [GROUP...]: .venv with devicegate installed in editable mode with the given
# extra and dependency groups (Debian's python3 needs python3-venv for that; it is installed when
# missing).
ensure_venv() {
  local python=${PYTHON:-python3}
  if [ ! -x .venv/bin/python ]; then
    if ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
      install_debian_packages python3-venv
    fi
    echo "==> creating .venv"
    "$python" -m venv .venv
  fi
  local extra=$1 groups=()
  shift
  for group in "$@"; do groups+=(--group "$group"); done
  echo "==> installing devicegate[$extra] $*"
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  # pip reads dependency groups (PEP 735) from version 25.1 on; the upgrade above brings it.
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extra]" "${groups[@]}"
}
