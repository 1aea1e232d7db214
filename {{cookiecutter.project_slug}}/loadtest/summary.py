"""The storm's summary: what ``<label>-summary.json`` holds, read from Locust's statistics
(the requests, and the storm's own metrics the locustfile fires as requests of kinds
``STORM``, ``SIBLING``, ``WORKFLOW``, ``CANCEL``, ``REVOKE`` and ``OUTAGE``), with the
verdict of ``verdict.gate``."""

from __future__ import annotations

from typing import Any

import verdict
from locust.env import Environment


def metric(environment: Environment, kind: str, name: str):
    """The statistics entry of one metric (``None`` before its first sample)."""
    return environment.stats.entries.get((name, kind))


def count(environment: Environment, kind: str, name: str) -> int:
    """How many samples of one metric."""
    found = metric(environment, kind, name)
    return found.num_requests if found is not None else 0


def percentiles(entry) -> dict[str, float]:
    """Count, p50, p95, p99 and max of one entry, in ms."""
    return {
        "count": entry.num_requests,
        "p50_ms": entry.get_response_time_percentile(0.50),
        "p95_ms": entry.get_response_time_percentile(0.95),
        "p99_ms": entry.get_response_time_percentile(0.99),
        "max_ms": entry.max_response_time,
    }


def summarise(environment: Environment, storm: Any, elapsed: float) -> dict[str, Any]:
    """The run's summary from Locust's statistics and the storm's own metrics (``storm``:
    the locustfile's ``Storm``: its options, deadlines and in-flight samples)."""
    options = storm.options
    stats = environment.stats
    latency_kind = "REVOKE" if options.storm_mode == "revoke" else "CANCEL"
    outcomes = {
        name: percentiles(entry)
        for (name, kind), entry in sorted(stats.entries.items())
        if kind == latency_kind
    }
    http = [entry for (_, kind), entry in stats.entries.items() if kind in ("GET", "POST")]
    requests = sum(entry.num_requests for entry in http)
    flows = count(environment, "STORM", "started") + count(environment, "SIBLING", "ok")
    flows += count(environment, "SIBLING", "collateral")
    counts = {
        "started": count(environment, "STORM", "started"),
        "cancelled": count(environment, "STORM", "cancelled"),
        "honoured": count(environment, "STORM", "honoured"),
        "unhonoured": count(environment, "STORM", "unhonoured"),
        "cutoff": count(environment, "STORM", "cutoff"),
        "siblings_ok": count(environment, "SIBLING", "ok"),
        "siblings_failed": count(environment, "SIBLING", "collateral"),
        "siblings_cutoff": count(environment, "SIBLING", "cutoff"),
        "workflows": count(environment, "WORKFLOW", "honoured")
        + count(environment, "WORKFLOW", "unhonoured"),
        "workflows_honoured": count(environment, "WORKFLOW", "honoured"),
        "http_requests": requests,
        "http_failures": sum(entry.num_failures for entry in http),
        "outage_answers": sum(
            entry.num_requests for (_, kind), entry in stats.entries.items() if kind == "OUTAGE"
        ),
    }
    honoured_entry = metric(environment, "STORM", "honoured")
    failures = [
        {"error": str(error.error)[:300], "name": error.name, "count": error.occurrences}
        for error in sorted(stats.errors.values(), key=lambda e: -e.occurrences)[:25]
    ]
    label = options.storm_label or ("baseline" if options.storm_mode == "revoke" else "storm")
    summary = {
        "mode": options.storm_mode,
        "label": label,
        "host": environment.host,
        "users": options.num_users,
        "elapsed_s": round(elapsed, 1),
        "counts": counts,
        "honoured_per_s": round(counts["honoured"] / elapsed, 1) if elapsed > 0 else 0.0,
        "http_per_s": round(requests / elapsed, 1) if elapsed > 0 else 0.0,
        "requests_per_flow": round(requests / flows, 2) if flows else None,
        "tasks_in_flight": {
            "mean": round(sum(storm.samples) / len(storm.samples), 1) if storm.samples else 0.0,
            "max": max(storm.samples, default=0),
        },
        "outcomes": outcomes,
        "running_share": verdict.share_running(outcomes),
        "client_stop_seen": percentiles(honoured_entry) if honoured_entry else None,
        "latency_source": (
            "client: revoke request sent to REVOKED seen"
            if options.storm_mode == "revoke"
            else "server: cancel requested to task stopped (database clock)"
        ),
        "deadlines_s": {step: storm.deadlines.seconds(step) for step in verdict.LADDER},
        "max_cooperative_p99_ms": options.storm_max_p99_ms,
        "failures": failures,
    }
    cancel_mode = options.storm_mode == "cancel"
    gate = verdict.gate(counts, outcomes, options.storm_max_p99_ms)
    summary["gate"] = gate if cancel_mode else []
    summary["passed"] = not summary["gate"] if cancel_mode else None
    return summary
