"""Print the latest results as Markdown tables: ``python -m benchmarks.report``.

Reads every JSON file the benchmarks wrote (``benchmarks/results`` unless ``--output-dir``
says otherwise) and prints what the README's figures section shows, so updating it after
a rerun is a copy and paste. A benchmark's own ``markdown(result)`` makes its table; one
without it gets the table of its targets. Needs neither Django nor a worker.
"""

import argparse
import importlib
import json
import sys
from pathlib import Path

from benchmarks.common import RESULTS_DIR, fmt


def environment_line(result: dict) -> str:
    """One line saying where and when a result was measured, with the machine's load."""
    env = result["environment"]
    load = env.get("load_average") or [None]
    after = env.get("load_average_after") or [None]
    return (
        f"{env['date']}, {env['cpu_count']} CPUs, Python {env['python']}, Celery {env['celery']},"
        f" Django {env['django']}, PostgreSQL {env['postgresql']}, Redis {env['redis']};"
        f" load average {fmt(load[0])} before, {fmt(after[0])} after"
    )


def targets_table(result: dict) -> list[str]:
    """Markdown rows of a result's targets: what any benchmark's table falls back to.

    >>> from benchmarks.common import target
    >>> print("\\n".join(targets_table({"targets": [target("p99", 12.0, "<=", 50, "ms")]})))
    | target | measured | limit | verdict |
    |---|---:|---|---|
    | p99 | 12.0 ms | <= 50 ms | **pass** |
    """
    rows = ["| target | measured | limit | verdict |", "|---|---:|---|---|"]
    for check in result["targets"]:
        unit = f" {check['unit']}" if check["unit"] else ""
        passed = "**pass**" if check["passed"] else "**FAIL**"
        rows.append(
            f"| {check['name']} | {fmt(check['value'])}{unit}"
            f" | {check['op']} {check['limit']}{unit} | {passed} |"
        )
    return rows


def table(result: dict) -> list[str]:
    """The Markdown rows of one result: its benchmark's ``markdown``, else its targets."""
    try:
        module = importlib.import_module(f"benchmarks.{result['benchmark']}")
    except ImportError:  # a result of a benchmark this checkout no longer has
        module = None
    return getattr(module, "markdown", targets_table)(result)


def markdown(folder: Path) -> str:
    """The Markdown figures of every result found in ``folder``."""
    sections = []
    for path in sorted(folder.glob("*.json")):
        result = json.loads(path.read_text(encoding="utf-8"))
        note = " (quick run: sizes too small to mean anything)" if result["quick"] else ""
        sections.append(
            f"#### {result['benchmark']}: {result['description']}{note}\n\n"
            f"_{environment_line(result)}._\n\n" + "\n".join(table(result))
        )
    return "\n\n".join(sections) + "\n"


def main(argv=None) -> int:
    """Command-line entry: print the Markdown of the latest results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR, help="where the JSON is")
    args = parser.parse_args(argv)
    text = markdown(args.output_dir)
    if not text.strip():
        print(f"no results in {args.output_dir}: run python -m benchmarks first", file=sys.stderr)
        return 1
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
