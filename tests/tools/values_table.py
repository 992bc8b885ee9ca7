#!/usr/bin/env python3
"""The README's table of chart values, generated from the `# --` comments in
charts/airouter/values.yaml (helm-docs style: a `# --` comment documents the key below it).

    python3 tests/tools/values_table.py          # print the table
    python3 tests/tools/values_table.py --write  # rewrite it in README.md between the markers

tests/e2e/test_chart.py fails when README.md holds anything else."""

from __future__ import annotations

import json
import pathlib
import re
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
VALUES = ROOT / "charts" / "airouter" / "values.yaml"
README = ROOT / "README.md"
START, END = "<!-- values-table:start -->", "<!-- values-table:end -->"
KEY = re.compile(r"^(\s*)([A-Za-z0-9_]+):(.*)$")


def rows() -> list[tuple[str, str, str]]:
    values = yaml.safe_load(VALUES.read_text())
    out, stack, doc = [], [], None
    for line in VALUES.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            doc = [stripped[4:].strip()]
            continue
        if doc is not None and stripped.startswith("#"):
            doc.append(stripped[1:].strip())
            continue
        m = KEY.match(line)
        if not m:
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        if doc is not None:
            path = [k for _, k in stack]
            value = values
            for k in path:
                value = value[k]
            default = json.dumps(value, ensure_ascii=False)
            out.append((".".join(path), default, " ".join(doc)))
            doc = None
    return out


def table() -> str:
    lines = ["| value | default | |", "|---|---|---|"]
    for key, default, doc in rows():
        escaped = doc.replace("|", "\\|")
        lines.append(f"| `{key}` | `{default}` | {escaped} |")
    return "\n".join(lines)


def main() -> int:
    text = table()
    if "--write" in sys.argv:
        readme = README.read_text()
        start, end = readme.index(START) + len(START), readme.index(END)
        README.write_text(readme[:start] + "\n" + text + "\n" + readme[end:])
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
