"""Aggregation and the printed tables.

Runs in the orchestrator process only (``python -m benchmarks``). Turns the
raw child records into per workload x metric x runner statistics (median,
min, max over repeats), formats them as text tables with the ratios
phalanx/peer, and prints the three foundation figures and the overhead of
the ``phalanx.Executor`` adapter over the plain runtime.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from .runners import OPTIONAL_PEERS
from .workloads import Workload

__all__ = [
    "aggregate",
    "format_value",
    "format_workload",
    "foundation",
    "format_foundation",
    "adapter_overhead",
    "format_adapter_overhead",
]

#: width of one "median (min-max)" cell
CELL = 24
#: width of the metric label column
LABEL = 60


def format_value(value: float, unit: str) -> str:
    """A short human form: 3 significant digits, k/M for large counts."""
    if math.isinf(value):
        return "inf"
    if unit in ("tasks/s", "calls/s"):
        for div, suffix in ((1e6, "M"), (1e3, "k")):
            if abs(value) >= div:
                return f"{value / div:.3g}{suffix}"
        return f"{value:.3g}"
    if unit == "ratio":
        return f"{value:.2f}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _stats(values: Sequence[float]) -> dict[str, Any]:
    return {
        "values": list(values),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def aggregate(workload: Workload, quick: bool, runners: Sequence[str], records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Statistics of one workload's records: status per runner, values per metric."""
    status: dict[str, str] = {}
    reasons: dict[str, str] = {}
    for runner in runners:
        mine = [r for r in records if r["runner"] == runner]
        if not mine:
            status[runner] = "missing"
        elif any(r["status"] == "error" for r in mine):
            status[runner] = "error"
            reasons[runner] = next(r.get("error", "?") for r in mine if r["status"] == "error")
        elif all(r["status"] == "na" for r in mine):
            status[runner] = "na"
            reasons[runner] = mine[0].get("reason", "")
        else:
            status[runner] = "ok"
    # the remote part (run_one --remote) where it could not run: one line says why
    skipped = [r.get("reason", "") for r in records if r.get("remote") and r["status"] == "na"]
    metrics: dict[str, Any] = {}
    for metric in workload.metrics(quick):
        per_runner: dict[str, Any] = {}
        for runner in runners:
            values = [
                float(r["metrics"][metric.key])
                for r in records
                if r["runner"] == runner and r["status"] == "ok" and metric.key in r.get("metrics", {})
            ]
            if values:
                per_runner[runner] = _stats(values)
            else:
                na = [
                    r["info"]["na"][metric.key]
                    for r in records
                    if r["runner"] == runner and metric.key in r.get("info", {}).get("na", {})
                ]
                if na:
                    per_runner[runner] = {"na": na[0]}
        metrics[metric.key] = {
            "label": metric.label,
            "unit": metric.unit,
            "better": metric.better,
            "runners": per_runner,
        }
    # how many tasks each measurement timed (optional peers are sized by a probe: see workloads.peer_size)
    sizes: dict[str, dict[str, list[int]]] = {}
    for r in records:
        if r["status"] == "ok" and not r.get("remote"):
            for label, k in r.get("info", {}).get("sizes", {}).items():
                sizes.setdefault(r["runner"], {}).setdefault(label, []).append(int(k))
    return {"title": workload.heading(quick), "status": status, "reasons": reasons, "metrics": metrics,
            "remote_skipped": skipped[0] if skipped else None, "sizes": sizes}


def _cell(entry: dict[str, Any] | None, unit: str, status: str) -> str:
    if entry is not None and "median" in entry:
        med, lo, hi = (format_value(entry[k], unit) for k in ("median", "min", "max"))
        return med if lo == hi else f"{med} ({lo}-{hi})"
    if status == "error":
        return "FAILED"
    if status == "na":
        return "n/a (not implemented)"
    return "n/a"


def _span(values: Sequence[int]) -> str:
    """``1,040`` or ``980-1,100`` (min-max over the repeats)."""
    lo, hi = min(values), max(values)
    return f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"


def _ratio_text(ratio: float, higher_is_better: bool) -> str:
    if ratio == 1.0:
        verdict = "same"
    else:
        verdict = "better" if (ratio > 1.0) == higher_is_better else "worse"
    return f"{ratio:.2f} ({verdict})"


def format_workload(workload: Workload, summary: dict[str, Any], quick: bool, runners: Sequence[str]) -> str:
    """One workload's section: medians (min-max) per metric x runner, then ratios."""
    lines = [f"{workload.id}  {workload.heading(quick)}"]
    if workload.note:
        lines.append(f"    {workload.note}")
    header = f"  {'metric [unit]':<{LABEL}} {'better':<7}" + "".join(f"{r:<{CELL}}" for r in runners)
    lines.append(header.rstrip())
    lines.append("  " + "-" * (len(header) - 2))
    status = summary["status"]
    for metric in workload.metrics(quick):
        entry = summary["metrics"][metric.key]["runners"]
        label = f"{metric.label} [{metric.unit}]"
        row = f"  {label:<{LABEL}} {metric.better:<7}" + "".join(
            f"{_cell(entry.get(r), metric.unit, status.get(r, 'missing')):<{CELL}}" for r in runners
        )
        lines.append(row.rstrip())
        # phalanx against every other runner; a phalanx variant (W5's inline) against the peers too
        for own in ("phalanx", "inline"):
            mine = entry.get(own, {}).get("median")
            ratios = []
            for peer in runners:
                theirs = entry.get(peer, {}).get("median")
                if peer in (own, "phalanx") or mine is None or not theirs:
                    continue
                ratios.append(f"vs {peer} {_ratio_text(mine / theirs, metric.higher_is_better)}")
            if ratios:
                lines.append(f"  {'':<{LABEL}} {own}/peer: " + ", ".join(ratios))
    sized = [f"{runner} " + ", ".join(f"{label} {_span(ks)}" for label, ks in summary.get("sizes", {})[runner].items())
             for runner in runners if runner in OPTIONAL_PEERS and summary.get("sizes", {}).get(runner)]
    if sized:
        lines.append(f"    tasks per measurement: {'; '.join(sized)}")
    for runner, reason in summary["reasons"].items():
        lines.append(f"    {runner}: {reason}")
    if summary.get("remote_skipped"):
        lines.append(f"    remote rows: {summary['remote_skipped']}")
    present = [r for r in runners if r not in ("phalanx", "inline", "static")]
    absent = summary.get("peers_absent") or []
    lines.append(f"    peers present: {', '.join(present) or 'none'}"
                 + (f"; not installed (skipped): {', '.join(absent)}" if absent else "")
                 + ("; static is the machine's ceiling, not a peer" if "static" in runners else ""))
    return "\n".join(lines)


def _median(summaries: dict[str, Any], wid: str, key: str, runner: str) -> float | None:
    try:
        return float(summaries[wid]["metrics"][key]["runners"][runner]["median"])
    except (KeyError, TypeError):
        return None


def foundation(summaries: dict[str, Any]) -> list[dict[str, Any]]:
    """The three figures of the foundation issue, phalanx next to ProcessPoolExecutor."""
    rows = [
        ("rt.submit in a loop, then gather (W1a)", "W1", "submit_tps", "submit_tps", "tasks/s", True),
        ("rt.map over 20,000 tiny items (W1b1) vs PPE.map chunksize=1", "W1", "map_default_tps",
         "map_default_tps", "tasks/s", True),
        ("  same, vs PPE.map chunksize=ceil(n/8) (W1b2)", "W1", "map_default_tps", "map_poolchunk_tps",
         "tasks/s", True),
        ("round trip submit().result(), median (W2)", "W2", "median_us", "median_us", "us", False),
    ]
    out = []
    for label, wid, mine_key, ppe_key, unit, higher in rows:
        mine = _median(summaries, wid, mine_key, "phalanx")
        ppe = _median(summaries, wid, ppe_key, "ppe")
        out.append({
            "figure": label.strip(),
            "unit": unit,
            "better": "higher" if higher else "lower",
            "phalanx": mine,
            "ppe": ppe,
            "ratio": None if mine is None or not ppe else mine / ppe,
        })
    return out


def format_foundation(rows: list[dict[str, Any]]) -> str:
    """The foundation figures as a small table."""
    width = 72
    lines = [
        "Foundation figures (medians, same run; ratio = phalanx/PPE)",
        f"  {'figure':<{width}} {'phalanx':>10} {'PPE':>10}  ratio",
    ]
    for row in rows:
        mine = "n/a" if row["phalanx"] is None else format_value(row["phalanx"], row["unit"])
        ppe = "n/a" if row["ppe"] is None else format_value(row["ppe"], row["unit"])
        ratio = "n/a" if row["ratio"] is None else _ratio_text(row["ratio"], row["better"] == "higher")
        label = f"{row['figure']} [{row['unit']}]"
        lines.append(f"  {label:<{width}} {mine:>10} {ppe:>10}  {ratio}")
    return "\n".join(lines)


def adapter_overhead(summaries: dict[str, Any]) -> list[dict[str, Any]]:
    """``phalanx.Executor`` next to the ``phalanx.Runtime`` it wraps (W1, W2), with the cost per task.

    ``extra_us`` is what the adapter adds per task: the difference of the
    time per task (1/rate) for throughputs, of the latencies for round trips.
    """
    rows = [
        ("submit in a loop, then gather (W1a)", "W1", "submit_tps", "submit_tps", "tasks/s", True),
        ("map, same chunksize ceil(n/8) (W1b2)", "W1", "map_poolchunk_tps", "map_poolchunk_tps", "tasks/s", True),
        ("map, each one's default (W1b1: chunksize=1 vs auto)", "W1", "map_default_tps", "map_default_tps",
         "tasks/s", True),
        ("round trip submit().result(), median (W2)", "W2", "median_us", "median_us", "us", False),
        ("round trip submit().result(), p99 (W2)", "W2", "p99_us", "p99_us", "us", False),
    ]
    out = []
    for label, wid, executor_key, runtime_key, unit, higher in rows:
        executor = _median(summaries, wid, executor_key, "executor")
        runtime = _median(summaries, wid, runtime_key, "phalanx")
        extra: float | None = None
        if executor and runtime:
            extra = (1e6 / executor - 1e6 / runtime) if higher else executor - runtime
        out.append({
            "figure": label,
            "unit": unit,
            "better": "higher" if higher else "lower",
            "executor": executor,
            "runtime": runtime,
            "ratio": None if executor is None or not runtime else executor / runtime,
            "extra_us": extra,
        })
    return out


def format_adapter_overhead(rows: list[dict[str, Any]]) -> str:
    """The adapter figures as a small table."""
    width = 60
    lines = [
        "phalanx.Executor adapter vs phalanx.Runtime (medians, same run; ratio = Executor/Runtime)",
        f"  {'figure':<{width}} {'Executor':>10} {'Runtime':>10}  {'ratio':<16} extra per task",
    ]
    for row in rows:
        executor = "n/a" if row["executor"] is None else format_value(row["executor"], row["unit"])
        runtime = "n/a" if row["runtime"] is None else format_value(row["runtime"], row["unit"])
        ratio = "n/a" if row["ratio"] is None else _ratio_text(row["ratio"], row["better"] == "higher")
        extra = "n/a" if row["extra_us"] is None else f"{row['extra_us']:+.1f} us"
        label = f"{row['figure']} [{row['unit']}]"
        lines.append(f"  {label:<{width}} {executor:>10} {runtime:>10}  {ratio:<16} {extra}")
    return "\n".join(lines)
