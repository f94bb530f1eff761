#!/usr/bin/env bash
# Builds the image that holds every component of the system (and the unit tests): mini-mailgun/bundle.
set -euo pipefail
cd "$(dirname "$0")"
docker build -t mini-mailgun/bundle "$@" .
