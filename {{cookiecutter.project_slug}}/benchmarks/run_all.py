"""Run every benchmark in turn: ``python -m benchmarks [--quick] [--only NAME ...]``.

Default sizes take about three minutes on two cores; ``--quick`` runs tiny sizes (a smoke
test: the figures mean nothing). The exit status is 1 when a benchmark could not run, and,
with ``--strict``, also when one missed its target.
"""

import sys
import time
import traceback

from benchmarks import cancel_latency, cascade, checkpoint, common, node_cost, throughput

#: Every benchmark, in the order they run.
BENCHMARKS = {
    checkpoint.NAME: checkpoint,
    throughput.NAME: throughput,
    node_cost.NAME: node_cost,
    cancel_latency.NAME: cancel_latency,
    cascade.NAME: cascade,
}


def run_all(names=None, *, quick: bool = False, output_dir=None) -> dict[str, dict | None]:
    """Run the benchmarks ``names`` (all by default); return each result, ``None`` if it failed."""
    common.setup()
    results: dict[str, dict | None] = {}
    for name in names or BENCHMARKS:
        module = BENCHMARKS[name]
        sizes = dict(module.QUICK if quick else module.DEFAULTS)
        print(f"\n== {name} {'(quick) ' if quick else ''}==", flush=True)
        try:
            results[name] = module.run(**sizes, quick=quick, output_dir=output_dir)
        except Exception:
            traceback.print_exc()
            results[name] = None
    return results


def main(argv=None) -> int:
    """Command-line entry: run, print a one-line verdict per benchmark, return the exit status."""
    parser = common.argument_parser("Run every benchmark of task signalling.")
    parser.add_argument(
        "--only", nargs="+", choices=list(BENCHMARKS), help="run only these benchmarks"
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 when a target is missed"
    )
    args = parser.parse_args(argv)
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
