#!/usr/bin/env bash
# System packages the window and the tests need, installed from Debian when missing.
# Only acts as root on a Debian-like system; elsewhere it says what to install.
set -euo pipefail
# Qt itself, even offscreen (the report printer, the tests).
qt=(libegl1 libgl1 libxkbcommon0 libfontconfig1 libdbus-1-3 libglib2.0-0 fonts-dejavu-core)
# Qt's xcb platform plugin: what the window needs on a real X display. Without
# libxcb-cursor0 (and the others) it exits with "Could not load the Qt platform plugin xcb".
xcb=(libx11-xcb1 libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1
    libxcb-randr0 libxcb-render-util0 libxcb-render0 libxcb-shape0 libxcb-shm0 libxcb-sync1
    libxcb-xfixes0 libxcb-xinerama0 libxcb-xkb1)
# The tests: a virtual X display for the window under xcb, pdftoppm for the report's pages.
tests=(xvfb poppler-utils)
pkgs=("${qt[@]}" "${xcb[@]}" "${tests[@]}")
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    echo "cytoedge: the window and its tests need these system packages: ${missing[*]}" >&2
fi
