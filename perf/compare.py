"""`python -m perf.compare`: the app's CPU a request against another revision's, both at once.

On this shared 2-core VM one `perf.app_cost` run moves ±10% from one minute to the next, more
than most changes are worth. Two runs at the same time, one per checkout, share whatever the
machine is doing, and their ratio held within ±3% in the runs of `perf/README.md`. The other
revision is checked out into a temporary git worktree and run with this checkout's virtualenv,
so compare revisions with the same lock file.

    .venv/bin/python -m perf.compare                      # working tree against HEAD
    .venv/bin/python -m perf.compare --base fa0ee77 --rounds 4 -- --version v1-forest
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_FIGURE = re.compile(r"([0-9.]+) µs of CPU a request")


def _start(checkout: Path, app_cost_args: list[str]) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "perf.app_cost", *app_cost_args]
    return subprocess.Popen(command, cwd=checkout, stderr=subprocess.PIPE, text=True)


def _figure(process: subprocess.Popen[str]) -> float:
    _, stderr = process.communicate()
    found = _FIGURE.search(stderr)
    if process.returncode != 0 or found is None:
        raise SystemExit(f"perf.app_cost failed:\n{stderr[-2000:]}")
    return float(found.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.compare", description=__doc__)
    parser.add_argument("--base", default="HEAD", help="the revision to compare against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("app_cost_args", nargs="*", help="after --: passed to perf.app_cost")
    args = parser.parse_args(argv)
    passed = args.app_cost_args or ["--requests", "30000", "--concurrency", "32"]
    with tempfile.TemporaryDirectory(prefix="tenantserve-compare-") as folder:
        base = Path(folder) / "base"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(base), args.base],
            cwd=ROOT, check=True, capture_output=True,
        )  # fmt: skip
        try:
            ratios = []
            for round_ in range(1, args.rounds + 1):
                runs = [_start(base, passed), _start(ROOT, passed)]
                before, after = (_figure(run) for run in runs)
                ratios.append(after / before)
                print(f"round {round_}: {args.base} {before:.1f} µs, this checkout {after:.1f} µs, "
                      f"ratio {after / before:.3f}")  # fmt: skip
            print(f"median ratio {statistics.median(ratios):.3f} over {len(ratios)} rounds")
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(base)],
                cwd=ROOT, check=False, capture_output=True,
            )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
