#!/usr/bin/env python3
"""Watch a document and print it whenever someone else changes it.

    python examples/python/watch.py --config meridian-dev-data/client.toml notes

Then, in another terminal:

    meridian doc set --config meridian-dev-data/client.toml notes title "hello"

Stop with Ctrl-C (or pass --count N to stop after N changes).
"""

import argparse
import queue
import sys

import meridian


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="client.toml (meridian dev writes one)")
    parser.add_argument("--count", type=int, default=0, help="stop after this many changes")
    parser.add_argument("doc", help="document id")
    args = parser.parse_args()

    changes: "queue.Queue[list]" = queue.Queue(maxsize=1024)
    with meridian.Client.from_config(args.config) as client:
        doc = client.open(args.doc)
        doc.wait_synced(30)
        print("synced", doc.to_json(), flush=True)
        # The callback runs on a background thread: hand the heads to the main one.
        doc.on_change(lambda heads: changes.put(heads))
        seen = 0
        try:
            while args.count == 0 or seen < args.count:
                heads = changes.get()
                seen += 1
                print("change", ",".join(h[:12] for h in heads), doc.to_json(), flush=True)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
