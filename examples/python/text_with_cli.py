#!/usr/bin/env python3
"""Edit one collaborative text from Python and from the Rust CLI at the same time.

    python examples/python/text_with_cli.py --config meridian-dev-data/client.toml \
        --meridian target/release/meridian notes/shared-text

Python appends words at the end of the text while `meridian doc splice` inserts words
at its start, concurrently. Both sides then print the text: Automerge merges the edits,
so the two views are the same and contain every word.
"""

import argparse
import json
import subprocess
import sys
import threading
import time

import meridian


def cli_view(binary: str, config: str, doc: str) -> dict:
    out = subprocess.run(
        [binary, "doc", "get", "--config", config, doc],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout
    return json.loads(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="client.toml (meridian dev writes one)")
    parser.add_argument("--meridian", default="meridian", help="the meridian binary")
    parser.add_argument("--words", type=int, default=5, help="words each side writes")
    parser.add_argument("doc", help="document id")
    args = parser.parse_args()

    with meridian.Client.from_config(args.config) as client:
        doc = client.open(args.doc)
        doc.wait_synced(30)
        if "text" not in doc.to_dict():
            doc.put_text(["text"], "|")
        doc.wait_durable(30)

        def rust_side():
            for i in range(args.words):
                subprocess.run(
                    [args.meridian, "doc", "splice", "--config", args.config, args.doc,
                     "text", "0", "0", f"rust{i} "],
                    check=True, capture_output=True, timeout=60,
                )

        rust = threading.Thread(target=rust_side)
        rust.start()
        for i in range(args.words):
            end = len(doc.to_dict()["text"])
            doc.splice_text(["text"], end, 0, f" py{i}")
            time.sleep(0.05)
        rust.join()
        doc.wait_durable(30)

        # Wait until this client has heard every CLI edit.
        deadline = time.monotonic() + 30
        view = cli_view(args.meridian, args.config, args.doc)
        while doc.to_dict() != view and time.monotonic() < deadline:
            time.sleep(0.1)
            view = cli_view(args.meridian, args.config, args.doc)
        print("python:", doc.to_dict()["text"])
        print("cli:   ", view["text"])
        return 0 if doc.to_dict() == view else 1


if __name__ == "__main__":
    sys.exit(main())
