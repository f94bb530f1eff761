#!/usr/bin/env bash
# Forget an earlier end-to-end run: its logs, database, maildirs and port files (e2e-tests/out/).
# run.sh calls it first; run it by hand to reclaim the space. It stops no process: run.sh
# stops everything it started when it exits.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
rm -rf "$HERE/out"
