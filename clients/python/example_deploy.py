#!/usr/bin/env python3
"""Deploys an image and prints its progress, one line per update.

    python3 example_deploy.py --app hello --image stevedore-test/web:1 --port 8080
"""

import argparse
import sys

from stevedore_client import Stevedore, phase_name, pb


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="127.0.0.1:50051")
    parser.add_argument("--app", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--port", type=int, action="append", default=[])
    parser.add_argument("--token")
    args = parser.parse_args()

    client = Stevedore(args.server, token=args.token)
    last = None
    for update in client.deploy(args.app, args.image, ports=args.port):
        if update.heartbeat if hasattr(update, "heartbeat") else False:
            continue
        bar = "#" * int(update.total_progress * 20)
        print(f"[{bar:<20}] {update.total_progress:6.1%} {phase_name(update):<12} {update.message}")
        last = update
    client.close()
    if last is None or not last.HasField("result"):
        print("stream ended without a result", file=sys.stderr)
        return 2
    result = last.result
    for name, url in result.endpoints.items():
        print(f"endpoint {name}: {url}")
    if not result.success:
        d = result.diagnostics
        print(f"failed in {pb.Phase.Name(d.failed_phase)} ({d.step}): {result.message}", file=sys.stderr)
        for line in d.log_tail:
            print(f"  | {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
