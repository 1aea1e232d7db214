"""Print the latest results as Markdown tables: ``python -m benchmarks.report``.

Reads the JSON files the benchmarks wrote (``benchmarks/results`` unless ``--output-dir``
says otherwise) and prints what the README's figures section shows, so updating it after
a rerun is a copy and paste. Needs neither Django nor a worker.
"""

import argparse
import json
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _verdict(result: dict, name: str) -> str:
    check = next(c for c in result["targets"] if c["name"] == name)
    return (
        f"{check['op']} {_fmt(float(check['limit']), 2).rstrip('0').rstrip('.')} {check['unit']}: "
        + ("**pass**" if check["passed"] else "**FAIL**")
    )


def environment_line(result: dict) -> str:
    """One line saying where and when a result was measured, with the machine's load."""
    env = result["environment"]
    load = env.get("load_average") or [None]
    after = env.get("load_average_after") or [None]
    return (
        f"{env['date']}, {env['cpu_count']} CPUs, Python {env['python']}, Celery {env['celery']},"
        f" Django {env['django']}, PostgreSQL {env['postgresql']}, Redis {env['redis']};"
        f" load average {_fmt(load[0])} before, {_fmt(after[0])} after"
    )


def checkpoint_table(result: dict) -> list[str]:
    """Markdown rows for the checkpoint benchmark."""
    r = result["results"]
    return [
        "| call, inside a running task | ns per call (p50) | fastest batch | target |",
        "|---|---:|---:|---|",
        f"| `checkpoint()`, nothing pending | {_fmt(r['checkpoint_ns'])}"
        f" | {_fmt(r['checkpoint_ns_per_call']['min'])}"
        f" | {_verdict(result, 'checkpoint cost per call (p50)')} |",
        f"| `checkpoint()`, task thread's CPU time | {_fmt(r.get('checkpoint_cpu_ns'))}"
        f" | {_fmt((r.get('checkpoint_cpu_ns_per_call') or {}).get('min'))} | |",
        f"| `AbortableTask.is_aborted()` (baseline) | {_fmt(r['is_aborted_ns'], 0)}"
        f" | {_fmt(r['is_aborted_ns_per_call']['min'], 0)} | |",
        f"| ratio is_aborted / checkpoint | {_fmt(r['ratio_is_aborted_over_checkpoint'], 0)}x"
        f" | {_fmt(r.get('ratio_of_minimums'), 0)}x"
        f" | {_verdict(result, 'is_aborted / checkpoint (p50)')} |",
    ]


def throughput_table(result: dict) -> list[str]:
    """Markdown rows for the throughput benchmark."""
    r = result["results"]
    rows = [
        "| no-op task, prefork concurrency 2 | tasks/s p50 (min, max) | CPU ms per 1000 tasks"
        " (of it PostgreSQL) | worker runtime µs p50 |",
        "|---|---:|---:|---:|",
    ]
    phases = [("", r)] + ([(", run records off", r["records_off"])] if "records_off" in r else [])
    labels = {"signal_aware": "`SignalAwareTask`", "plain": "plain Celery task (baseline)"}
    for suffix, phase in phases:
        for kind in ("signal_aware", "plain"):
            rate = phase["tasks_per_second"][kind]
            cpu = phase["cpu_ms_per_1000_tasks"][kind]
            runtime = r["worker_runtime_us"][kind]["p50"] if not suffix else None
            rows.append(
                f"| {labels[kind]}{suffix} | {_fmt(rate['p50'])} ({_fmt(rate['min'])}, "
                f"{_fmt(rate['max'])}) | {_fmt(cpu['total'], 0)} ({_fmt(cpu['postgres'], 0)})"
                f" | {_fmt(runtime, 0)} |"
            )
    rows.append("")
    rows.append(
        f"Throughput ratio (medians) **{_fmt(r['ratio_of_medians'], 3)}**, target"
        f" {_verdict(result, 'throughput ratio (medians)')}; paired rounds"
        f" {_fmt(r['paired_ratio']['min'], 3)} to {_fmt(r['paired_ratio']['max'], 3)}; CPU ratio"
        f" {_fmt(r['cpu_ratio'], 3)}."
        + (
            f" Without run records: ratio {_fmt(r['records_off']['ratio_of_medians'], 3)},"
            f" CPU ratio {_fmt(r['records_off']['cpu_ratio'], 3)}."
            if "records_off" in r
            else ""
        )
    )
    return rows


def cancel_latency_table(result: dict) -> list[str]:
    """Markdown rows for the cancel-latency benchmark."""
    r = result["results"]
    p = result["parameters"]
    rows = [
        "| how the task is stopped | shape | p50 ms | p99 ms | stopped, right process | target |",
        "|---|---|---:|---:|---|---|",
    ]
    shapes = {
        "cooperative": f"checkpoint every {p['checkpoint_every_s'] * 1000:g} ms",
        "interrupted": f"`time.sleep`, cancel_grace {p['cancel_grace_s']:g} s",
        "killed": f"`sum(range(...))` holding the GIL, kill_after {p['kill_after_s']:g} s",
    }
    for step, figures in r["ladder"].items():
        latency = figures["latency_ms"]
        verdict = _verdict(result, f"{step} p99")
        rows.append(
            f"| cancel → {step} | {shapes[step]} | {_fmt(latency['p50'])} | {_fmt(latency['p99'])}"
            f" | {figures['right_process']}/{figures['trials']} | {verdict} |"
        )
    revoke_shapes = {"sleep": "`time.sleep`", "gil": "`sum(range(...))` holding the GIL"}
    for case, figures in r["revoke_terminate"].items():
        shape, signal = case.split("_", 1)
        stopped = figures["to_stopped_ms"]
        rows.append(
            f"| `revoke(terminate=True, signal={signal})` (baseline) | {revoke_shapes[shape]}"
            f" | {_fmt(stopped['p50'])} | {_fmt(stopped['p99'])}"
            f" | {figures['stopped']}/{figures['trials']} stopped,"
            f" {figures['right_process']}/{figures['trials']} right process"
            f" (REVOKED shown after {_fmt(figures['to_revoked_ms']['p50'])} ms p50) | |"
        )
    return rows


def cascade_table(result: dict) -> list[str]:
    """Markdown rows for the cascade benchmark."""
    r, p = result["results"], result["parameters"]
    chord, wide = r["chord"], r["wide"]
    return [
        "| what | p50 | p99 | checked | target |",
        "|---|---:|---:|---|---|",
        f"| cascade cancel of a {p['chord_tasks']}-task chord: cancel → last task stopped (ms)"
        f" | {_fmt(chord['latency_ms']['p50'])} | {_fmt(chord['latency_ms']['p99'])}"
        f" | {chord['all_stopped_body_never_ran']}/{chord['trials']} all stopped, body never ran"
        f" | {_verdict(result, 'chord p99')} |",
        f"| cascade over {p['wide_tasks']} recorded tasks: the caller's time (ms)"
        f" | {_fmt(wide['ms']['p50'])} | {_fmt(wide['ms']['p99'])}"
        f" | {wide['statements']} SQL statements ({wide['statements_per_task']:g} per task)"
        f" | {_verdict(result, 'wide cascade of ' + str(p['wide_tasks']) + ': statements')} |",
    ]


def markdown(folder: Path) -> str:
    """The Markdown figures of every result found in ``folder``."""
    sections = []
    for name, title, table in (
        ("checkpoint", "Checkpoint cost", checkpoint_table),
        ("throughput", "Throughput", throughput_table),
        ("cancel_latency", "Cancel latency", cancel_latency_table),
        ("cascade", "Cascade", cascade_table),
    ):
        result = _load(folder, name)
        if result is None:
            continue
        note = " (quick run: sizes too small to mean anything)" if result["quick"] else ""
        sections.append(
            f"#### {title}{note}\n\n_{environment_line(result)}._\n\n" + "\n".join(table(result))
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
