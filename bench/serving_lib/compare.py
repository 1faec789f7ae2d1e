"""Side-by-side tables of two systems over a request-rate sweep (bench/pd_vs_colocated.py), from JSON lines.

A row belongs to system ``tag`` and workload ``labels.workload``; for each (system, workload, rate)
the last row wins, so a rerun of a point replaces it. Ratios are system / baseline (pd / colocated):
below 1 is better for latencies, above 1 better for throughput and goodput.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Row = Mapping[str, Any]

# (JSON key, column title, number format)
COMPARED: tuple[tuple[str, str, str], ...] = (
    ("p99_itl_ms", "p99 ITL ms", "{:.1f}"),
    ("p99_ttft_ms", "p99 TTFT ms", "{:.0f}"),
    ("output_throughput", "out tok/s", "{:.0f}"),
    ("request_goodput", "goodput req/s", "{:.2f}"),
)


def points(rows: Iterable[Row], workload: str) -> dict[tuple[str, float], Row]:
    """(tag, rate) -> the last row of ``workload`` at that numeric rate."""
    out: dict[tuple[str, float], Row] = {}
    for r in rows:
        rate = r.get("request_rate")
        if (r.get("labels") or {}).get("workload") == workload and isinstance(rate, (int, float)) and r.get("tag"):
            out[(str(r["tag"]), float(rate))] = r
    return out


def ratio(value: Any, base: Any) -> float | None:
    if not isinstance(value, (int, float)) or not isinstance(base, (int, float)) or base == 0:
        return None
    return float(value) / float(base)


def _fmt(value: Any, spec: str) -> str:
    return spec.format(value) if isinstance(value, (int, float)) else "n/a"


def _ok(row: Row | None) -> str:
    if row is None:
        return "not run"
    return f"{row.get('completed', 0)}/{row.get('completed', 0) + row.get('failed', 0)}"


def workload_table(rows: Iterable[Row], workload: str, system: str = "pd", baseline: str = "colocated") -> str:
    """Markdown: one line per rate that either system ran; columns per COMPARED metric: system, baseline, ratio."""
    pts = points(rows, workload)
    rates = sorted({rate for (tag, rate) in pts if tag in (system, baseline)})
    head = ["rate req/s", f"ok {system}", f"ok {baseline}"]
    for _, title, _ in COMPARED:
        head += [f"{title} {system}", f"{title} {baseline}", f"{system}/{baseline}"]
    head += [f"SLO % {system}", f"SLO % {baseline}"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for rate in rates:
        a, b = pts.get((system, rate)), pts.get((baseline, rate))
        cells = [f"{rate:g}", _ok(a), _ok(b)]
        for key, _, spec in COMPARED:
            va, vb = (a or {}).get(key), (b or {}).get(key)
            r = ratio(va, vb)
            cells += [_fmt(va, spec), _fmt(vb, spec), f"{r:.2f}x" if r is not None else "n/a"]
        cells += [
            _fmt((a or {}).get("slo_attainment_pct"), "{:.0f}"),
            _fmt((b or {}).get("slo_attainment_pct"), "{:.0f}"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if not rates:
        lines.append("| (no data) |")
    return "\n".join(lines)


def summary_markdown(
    title: str, facts: Sequence[tuple[str, str]], tables: Mapping[str, str], notes: Sequence[str] = ()
) -> str:
    """A RESULTS.md section: heading, ``- key: value`` facts, one table per workload, notes."""
    out = [f"## {title}", ""]
    out += [f"- {k}: {v}" for k, v in facts]
    for workload, table in tables.items():
        out += ["", f"### workload `{workload}`", "", table]
    if notes:
        out += [""] + list(notes)
    return "\n".join(out) + "\n"
