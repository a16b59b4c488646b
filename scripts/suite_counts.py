#!/usr/bin/env python3
"""Sums what the pytest runs of one CI leg started (the JSON lines
``tests/suite_hygiene.write_counts`` appends) into one line.

    scripts/suite_counts.py STATS.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def summarise(path: Path) -> str:
    if not path.exists():
        return "(no pytest run reported)"
    total: dict[str, int] = {}
    for line in path.read_text().splitlines():
        for key, value in json.loads(line).items():
            if key != "pid":
                total[key] = total.get(key, 0) + value
    return (f"{total.get('engines', 0)} engines ({total.get('engine_drivers', 0)} drivers, "
            f"{total.get('fresh_engine_processes', 0)} fresh processes), "
            f"{total.get('servers', 0)} servers, "
            f"{total.get('two_host_servers', 0)} two-host launches, "
            f"{total.get('gloo_worlds', 0)} gloo worlds")


if __name__ == "__main__":
    print(summarise(Path(sys.argv[1])))
