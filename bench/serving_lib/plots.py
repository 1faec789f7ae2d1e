"""PNG charts: latency CDFs of one run, and sweep charts (a metric against request rate, one line per tag).

    python -m bench.serving_lib.plots --input runs.jsonl [--input more.jsonl] --out-dir DIR \
        [--where labels.workload=long] [--prefix long_]

Sweep charts read the JSON lines ``bench/serving.py --output-file`` writes: x = ``request_rate``
(rows at rate inf are left out), one line per ``tag`` (``--tag pd`` / ``--tag colocated``), and
when several rows share a tag and rate the last one wins (a rerun replaces a point). Files:
``throughput_vs_rate.png`` (output tokens/s), ``p99_itl_vs_rate.png``, ``p99_ttft_vs_rate.png``,
``goodput_vs_rate.png`` (only when some row has a goodput), each name behind ``prefix``.
matplotlib is imported only when a chart is drawn (``pip install matplotlib``, or the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .records import RequestRecord

SWEEP_CHARTS: tuple[tuple[str, str, str], ...] = (
    # (JSON key, y-axis label, file stem)
    ("output_throughput", "output throughput (tok/s)", "throughput_vs_rate"),
    ("p99_itl_ms", "p99 inter-token latency (ms)", "p99_itl_vs_rate"),
    ("p99_ttft_ms", "p99 time to first token (ms)", "p99_ttft_vs_rate"),
    ("request_goodput", "goodput (req/s meeting the SLO)", "goodput_vs_rate"),
)
UNTAGGED = "untagged"


def _figure(width: float = 6.4, height: float = 4.2) -> Any:
    """A matplotlib Figure on the Agg canvas (no pyplot: no global state, no display needed)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise RuntimeError("plots need matplotlib: pip install matplotlib (or pip install -e '.[dev]')") from exc
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    return path


def cdf_points(samples_ms: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted samples and their empirical CDF values ``i / n`` (i = 1..n)."""
    xs = np.sort(np.asarray(samples_ms, dtype=np.float64))
    return xs, np.arange(1, xs.size + 1) / max(xs.size, 1)


def plot_run_cdfs(
    records: Sequence[RequestRecord], out_dir: str | Path, stem: str = "run", title: str = ""
) -> list[Path]:
    """``{stem}_{ttft,itl,e2e}_cdf.png`` of the successful requests; a metric without samples is skipped."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ok = [r for r in records if r.success]
    series = {
        "ttft": ("time to first token (ms)", [r.ttft * 1e3 for r in ok]),
        "itl": ("inter-token latency (ms)", [g * 1e3 for r in ok for g in r.itl]),
        "e2e": ("end-to-end latency (ms)", [r.latency * 1e3 for r in ok]),
    }
    written = []
    for name, (label, samples) in series.items():
        if not samples:
            continue
        fig = _figure()
        ax = fig.add_subplot()
        xs, ys = cdf_points(samples)
        ax.step(xs, ys, where="post")
        for q in (50, 90, 99):
            ax.axvline(float(np.percentile(xs, q)), linestyle=":", linewidth=0.8, color="gray")
        ax.set(
            xlabel=label,
            ylabel="fraction of samples",
            ylim=(0, 1.01),
            title=f"{title} {name.upper()} CDF (n={xs.size}; dotted: p50/p90/p99)".strip(),
        )
        ax.grid(alpha=0.3)
        written.append(_save(fig, out / f"{stem}_{name}_cdf.png"))
    return written


def load_rows(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    rows = []
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


def row_value(row: Mapping[str, Any], key: str) -> Any:
    """``key`` at the top level, or ``labels.NAME`` inside the row's labels."""
    if key.startswith("labels."):
        return (row.get("labels") or {}).get(key[len("labels.") :])
    return row.get(key)


def select_rows(rows: Iterable[Mapping[str, Any]], where: Mapping[str, str]) -> list[Mapping[str, Any]]:
    """Rows whose every ``where`` key (see row_value) equals the given value as a string."""
    return [r for r in rows if all(str(row_value(r, k)) == v for k, v in where.items())]


def sweep_series(rows: Iterable[Mapping[str, Any]], key: str) -> dict[str, list[tuple[float, float]]]:
    """tag -> [(rate, value)] sorted by rate; the last row of a (tag, rate) wins; null values dropped."""
    points: dict[str, dict[float, float | None]] = {}
    for r in rows:
        rate = r.get("request_rate")
        if not isinstance(rate, (int, float)):  # "inf" or missing: no place on a rate axis
            continue
        points.setdefault(r.get("tag") or UNTAGGED, {})[float(rate)] = r.get(key)
    return {tag: sorted((x, float(y)) for x, y in pts.items() if y is not None) for tag, pts in points.items()}


def plot_sweep(rows: Sequence[Mapping[str, Any]], out_dir: str | Path, prefix: str = "", title: str = "") -> list[Path]:
    """One PNG per metric of SWEEP_CHARTS that has data."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for key, label, stem in SWEEP_CHARTS:
        series = {t: pts for t, pts in sweep_series(rows, key).items() if pts}
        if not series:
            continue
        fig = _figure()
        ax = fig.add_subplot()
        for tag in sorted(series):
            xs, ys = zip(*series[tag], strict=True)
            ax.plot(xs, ys, marker="o", label=tag)
        ax.set(xlabel="request rate (req/s, Poisson)", ylabel=label, title=_chart_title(title, key, rows))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
        written.append(_save(fig, out / f"{prefix}{stem}.png"))
    return written


def _chart_title(title: str, key: str, rows: Sequence[Mapping[str, Any]]) -> str:
    if key != "request_goodput":
        return title
    slos = {json.dumps(r.get("goodput_slo"), sort_keys=True) for r in rows if r.get("goodput_slo")}
    if len(slos) != 1:
        return title
    slo = " ".join(f"{k}<={v:g}ms" for k, v in json.loads(slos.pop()).items())
    return f"{title} (SLO {slo})".strip()


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", action="append", required=True, help="JSON-lines file (repeatable)")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument(
        "--where",
        action="append",
        type=_key_value,
        default=[],
        help="keep rows with KEY=VALUE (KEY top-level or labels.NAME; repeatable)",
    )
    ap.add_argument("--prefix", default="", help="file name prefix")
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    rows = select_rows(load_rows(args.input), dict(args.where))
    try:
        written = plot_sweep(rows, args.out_dir, args.prefix, args.title)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    if not written:
        print("no rows with a numeric request_rate and data to plot", file=sys.stderr)
    return 0 if written else 1


if __name__ == "__main__":
    raise SystemExit(main())
