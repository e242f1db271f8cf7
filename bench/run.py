"""Run every benchmark in bench/ in turn (what `make bench` does); each prints its own table.

Figures go into BENCHMARKS.md with the command that produced them. Benchmarks report ratios
against a floor measured in the same run, so a loaded or slow machine moves both sides.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# Pipeline order first (build, then boot, then provision and groups); any other bench_*.py after them,
# so a new benchmark runs in `make bench` without being listed here.
FIRST = ("bench_build.py", "bench_flatten.py", "bench_boot.py", "bench_provision.py", "bench_describe.py",
         "bench_load.py", "bench_group.py")


def main() -> int:
    here = Path(__file__).resolve().parent
    failed = 0
    rest = sorted(p.name for p in here.glob("bench_*.py") if p.name not in FIRST)
    for name in [n for n in FIRST if (here / n).exists()] + rest:
        print(f"\n## {name}\n", flush=True)
        failed += subprocess.run([sys.executable, str(here / name)]).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
