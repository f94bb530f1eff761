#!/usr/bin/env python3
"""
The hand-off mode's light load (issue 17): POSTs --messages messages to /send at a steady
--rate (default 10 a second) over one keep-alive connection, message i to the one
recipient ``h<i>@alpha.bench.test``, and records for each the time its 200 arrived
(``time.monotonic()``, comparable with the sink's times on Linux).

    handoff.py --port P --messages N --rate R --result FILE [--client-id ID]

The result file (JSON): {"answered": {recipient: monotonic time of the 200}, "errors": N}.
Only the standard library. Each request is sent at its slot (start + i / rate), or at once
if the previous answer came after it, so the load stays light whatever the latencies.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--client-id", default="demo-client-0123456789abcdef")
    parser.add_argument("--result", required=True)
    args = parser.parse_args(argv)
    connection = http.client.HTTPConnection(args.host, args.port, timeout=30)
    answered: dict[str, float] = {}
    errors = 0
    start = time.monotonic()
    for i in range(args.messages):
        slot = start + i / args.rate
        wait = slot - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        recipient = f"h{i}@alpha.bench.test"
        body = json.dumps(
            {
                "client_id": args.client_id,
                "sender": "bench@sender.bench.test",
                "recipients": [recipient],
                "subject": f"hand-off {i}",
                "body": "a sign-in code: 123456\n",
            }
        ).encode()
        try:
            connection.request("POST", "/send", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            at = time.monotonic()
        except (OSError, http.client.HTTPException):
            errors += 1
            connection.close()
            continue
        if response.status == 200:
            answered[recipient] = at
        else:
            errors += 1
    connection.close()
    with open(args.result, "w") as out:
        json.dump({"answered": answered, "errors": errors, "seconds": round(time.monotonic() - start, 3)}, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
