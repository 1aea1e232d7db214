"""Run every benchmark in turn: ``python -m benchmarks [--quick] [--only NAME ...]``.

Every benchmark is a module of this folder found by :func:`benchmarks.common.discover`:
adding one is adding its file. Default sizes take a few minutes on two cores; ``--quick``
runs tiny sizes (a smoke test: the figures mean nothing). The exit status is 1 when a
benchmark could not run, and, with ``--strict``, also when one missed its target.
"""

import sys
import time
import traceback

from benchmarks import common


def run_all(names=None, *, quick: bool = False, output_dir=None) -> dict[str, dict | None]:
    """Run the benchmarks ``names`` (all by default); return each result, ``None`` if it failed."""
    common.setup()
    benchmarks = common.discover()
    results: dict[str, dict | None] = {}
    for name in names or benchmarks:
        print(f"\n== {name} {'(quick) ' if quick else ''}==", flush=True)
        try:
            results[name] = common.run(benchmarks[name], quick=quick, output_dir=output_dir)
        except Exception:
            traceback.print_exc()
            results[name] = None
    return results


def main(argv=None) -> int:
    """Command-line entry: run, print a one-line verdict per benchmark, return the exit status."""
    parser = common.argument_parser("Run every benchmark of task signalling.")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks")
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 when a target is missed"
    )
    args = parser.parse_args(argv)
    common.setup()
    unknown = sorted(set(args.only or ()) - set(common.discover()))
    if unknown:
        parser.error(
            f"no benchmark named {', '.join(unknown)}; there are {', '.join(common.discover())}"
        )
    started = time.monotonic()
    results = run_all(args.only, quick=args.quick, output_dir=args.output_dir)
    print(f"\n== summary ({time.monotonic() - started:.0f} s) ==")
    for name, payload in results.items():
        verdict = "ERROR" if payload is None else ("PASS" if payload["passed"] else "FAIL")
        print(f"  {verdict}  {name}")
    if any(payload is None for payload in results.values()):
        return 1
    if args.strict and not all(payload["passed"] for payload in results.values()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
