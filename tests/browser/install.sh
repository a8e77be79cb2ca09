#!/usr/bin/env bash
# What the browser tier (tests/test_browser.py) needs beside requirements.txt: Debian's Chromium, Playwright
# to drive it, and the two Jupyter front ends it opens. Playwright's own browser download is not used: it
# needs the internet, and the tier launches the system's /usr/bin/chromium.
set -euo pipefail
if ! command -v chromium >/dev/null; then
  sudo=$([ "$(id -u)" = 0 ] || echo sudo)
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq chromium
fi
python -m pip install -q playwright "jupyterlab>=4" "notebook>=7"
