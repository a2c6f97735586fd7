#!/usr/bin/env bash
# The workbook's two entry points on a fresh Debian machine (Python 3.11, root):
#   ./setup.sh demo   install everything, then run the whole workbook on the demo corpus
#   ./setup.sh test   install everything, then run the test suite
#   ./setup.sh install   install only
# Set RAWNET_NO_MBROLA=1 to skip the MBROLA voices (then the demo uses espeak-ng voices).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

apt_install() {
  # System tools: espeak-ng + MBROLA (demo voices), sox (audio effects), ffmpeg (m4a).
  [ "$(id -u)" = 0 ] || { echo "setup.sh: run as root for apt-get (or install espeak-ng sox ffmpeg yourself)"; return 0; }
  local pkgs="espeak-ng sox ffmpeg"
  # MBROLA lives in contrib/non-free: add those components beside the machine's own sources.
  if [ -z "${RAWNET_NO_MBROLA:-}" ] && [ ! -f /etc/apt/sources.list.d/rawnet-contrib.sources ] \
     && [ ! -f /etc/apt/sources.list.d/rawnet-contrib.list ]; then
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then      # deb822 (Debian 12 and later)
      sed 's/^Components: main$/Components: contrib non-free/' /etc/apt/sources.list.d/debian.sources \
        > /etc/apt/sources.list.d/rawnet-contrib.sources
    elif [ -f /etc/apt/sources.list ]; then                     # one-line style
      sed -n -E 's/^(deb [^#]*) main( .*)?$/\1 contrib non-free/p' /etc/apt/sources.list \
        > /etc/apt/sources.list.d/rawnet-contrib.list
    fi
  fi
  apt-get update -qq
  local missing=""
  for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  [ -z "$missing" ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
  if [ -z "${RAWNET_NO_MBROLA:-}" ]; then
    # Every packaged voice but cn1, bz1 and hn1, which espeak-ng cannot drive.
    local voices
    voices=$(apt-cache search '^mbrola-[a-z][a-z][0-9]$' | awk '{print $1}' | grep -vE 'mbrola-(cn1|bz1|hn1)$' || true)
    if [ -n "$voices" ]; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mbrola $voices \
        || echo "setup.sh: MBROLA voices unavailable; the demo corpus will use espeak-ng voices only"
    else
      echo "setup.sh: no MBROLA voices in this machine's Debian sources; using espeak-ng voices only"
    fi
  fi
}

py_install() {
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[dev]"
  .venv/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
}

main() {
  case "${1:-}" in
    install) apt_install; py_install ;;
    demo) apt_install; py_install; .venv/bin/python -m rawnet_lib.demo "${@:2}" ;;
    test) apt_install; py_install; .venv/bin/python -m pytest -q "${@:2}" ;;
    *) echo "usage: ./setup.sh demo|test|install"; return 2 ;;
  esac
}

# Parsed whole before it runs, so a `git pull` during a long demo cannot change it mid-way.
main "$@"
exit $?
