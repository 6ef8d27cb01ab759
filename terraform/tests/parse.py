#!/usr/bin/env python3
"""Parse every given .tf file on its own with python-hcl2; list the ones that fail.

checkov exits 0 on a file with a syntax error, so scripts/check-terraform runs
this first. Exit status 0 when every file parses, 1 otherwise.
"""

import sys

import hcl2


def main(paths: list[str]) -> int:
    bad = 0
    for path in paths:
        try:
            with open(path, encoding="utf-8") as handle:
                hcl2.load(handle)
        except Exception as err:  # noqa: BLE001 - any parser error is a failure
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            print(f"  FAIL: {path}: {first}")
            bad += 1
    if not paths:
        print("  FAIL: no .tf files given")
        return 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
