#!/usr/bin/env python3
"""Check that terraform/README.md documents every variable and output.

Each module directory has a section headed "### `<path>`" in the README; every
variable and output of that module must appear there in backticks.
Exit status 0 when nothing is missing, 1 otherwise.
"""

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hcleval import ModuleConfig  # noqa: E402

TERRAFORM = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
DOCUMENTED = [
    "modules/jurisdiction",
    "modules/jurisdiction/modules/region",
    "modules/cell",
    "modules/quic-lb",
    "modules/tls-listener",
    "modules/router",
    "modules/edge",
    "examples/eu-us",
]


def main() -> int:
    with open(os.path.join(TERRAFORM, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    missing = []
    for path in DOCUMENTED:
        match = re.search(rf"^### `{re.escape(path)}`\n(.*?)(?=^##)", readme, re.S | re.M)
        if match is None:
            missing.append(f"{path}: no section")
            continue
        section = match.group(1)
        config = ModuleConfig.load(os.path.join(TERRAFORM, path))
        for kind, names in (("variable", config.variables), ("output", config.outputs)):
            for name in names:
                if f"`{name}`" not in section:
                    missing.append(f"{path}: {kind} {name}")
    for item in missing:
        print(f"  FAIL: README.md does not document {item}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
