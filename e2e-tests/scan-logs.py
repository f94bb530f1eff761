#!/usr/bin/env python3
"""
After an e2e run: no client secret, API key or message body in any log mmgun wrote.

    e2e-tests/scan-logs.py [LOG_DIR] [CLIENTS_FILE] [SECRETS_FILE]

Looks for every client id of the run's clients file, every secret the tests listed in
SECRETS_FILE (out/state/secrets, one a line, when a test wrote it: the webhook signing key
and the webhook URL's password), anything shaped like an API key (mmk_…), and distinctive
phrases of the bodies the e2e suite sent (raw and quoted-printable). Fails, too, when the logs are missing or show no accepted submission,
so that an empty scan never passes.
"""

from __future__ import annotations

import pathlib
import re
import sys

HERE = pathlib.Path(__file__).resolve().parent
BODY_MARKERS = ("Grüße aus München", "Gr=C3=BC=C3=9Fe aus M=C3=BCnchen", "From the start of a line")
KEY = re.compile(r"mmk_[0-9a-f]{16}_[A-Za-z0-9_-]{20,}")


def main() -> int:
    logs = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "out" / "logs"
    clients = pathlib.Path(sys.argv[2]) if len(sys.argv) > 2 else HERE / "out" / "state" / "clients"
    listed = pathlib.Path(sys.argv[3]) if len(sys.argv) > 3 else HERE / "out" / "state" / "secrets"
    secrets = [line.strip() for line in clients.read_text().splitlines() if line.strip() and not line.startswith("#")]
    others = [line.strip() for line in listed.read_text().splitlines() if line.strip()] if listed.exists() else []
    files = sorted(logs.glob("*.log"))
    texts = {f.name: f.read_text(errors="replace") for f in files}
    if not secrets or not any("accepted submission" in t for t in texts.values()):
        print(f"scan-logs: nothing to scan in {logs} (no clients or no accepted submission logged)")
        return 1
    found = []
    for name, text in texts.items():
        for secret in secrets:
            if secret in text:
                found.append(f"{name}: a client id from {clients.name}")
        for secret in others:
            if secret in text:
                found.append(f"{name}: a secret from {listed.name} (webhook signing key or URL password)")
        for marker in BODY_MARKERS:
            if marker in text:
                found.append(f"{name}: message body text {marker!r}")
        if KEY.search(text):
            found.append(f"{name}: an API key")
    for line in found:
        print("scan-logs: LEAK in " + line)
    print(
        f"scan-logs: {len(files)} logs, {sum(len(t) for t in texts.values())} bytes, "
        f"{len(secrets) + len(others)} secrets looked for, {len(found)} leaks"
    )
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
