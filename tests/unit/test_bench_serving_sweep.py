"""bench/serving.py's issue-7 additions: shared-prefix and chat-synthetic datasets, bursty arrivals, SLO and
goodput, flush-cache, progress, flags, sweep tables and PNG plots, and pd_vs_colocated.py's pure parts."""

from __future__ import annotations

import asyncio
import io
import json
import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"
REPO = BENCH_DIR.parent
if str(BENCH_DIR) not in sys.path:
    sys.path.append(str(BENCH_DIR))  # last: bench/kernels.py must not shadow the pd_kernels/ package

import pd_vs_colocated  # noqa: E402
import serving  # noqa: E402
from serving_lib import chat_synthetic as chat  # noqa: E402
from serving_lib.arrivals import arrival_gaps  # noqa: E402
from serving_lib.client import flush_cache  # noqa: E402
from serving_lib.compare import points, ratio, workload_table  # noqa: E402
from serving_lib.datasets import build_prompts  # noqa: E402
from serving_lib.metrics import compute_metrics  # noqa: E402
from serving_lib.plots import cdf_points, plot_run_cdfs, plot_sweep, select_rows, sweep_series  # noqa: E402
from serving_lib.progress import CounterProgress, NoProgress, make_progress  # noqa: E402
from serving_lib.records import RequestRecord  # noqa: E402
from serving_lib.report import format_table, result_json  # noqa: E402
from serving_lib.shared_prefix import SEPARATOR, shared_prefix_prompts  # noqa: E402
from serving_lib.slo import SLO, compute_goodput, is_good, parse_slo, request_values_ms  # noqa: E402
from test_bench_serving import TokenStreamTestDouble, make_cfg, run_cli  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    from sglang_pd.tools.make_tiny_model import write_tokenizer

    out = tmp_path_factory.mktemp("tok")
    write_tokenizer(out)
    return AutoTokenizer.from_pretrained(str(out))


# ---------------------------------------------------------------- datasets


def test_shared_prefix_ids_groups_really_share() -> None:
    prompts = shared_prefix_prompts(5, 4, 40, 7, 9, vocab_size=300, seed=3, special_ids=[0, 1])
    assert len(prompts) == 20 and all(p.prompt_len == 47 == len(p.input_ids or ()) for p in prompts)
    assert all(p.output_len == 9 and p.text is None for p in prompts)
    groups: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    for p in prompts:
        assert p.input_ids is not None and min(p.input_ids) >= 2 and max(p.input_ids) < 300
        groups.setdefault(p.input_ids[:40], []).append(p.input_ids[40:])
    assert len(groups) == 5 and all(len(qs) == 4 and len(set(qs)) == 4 for qs in groups.values())
    prefixes = [p.input_ids[:40] for p in prompts if p.input_ids]
    assert any(a != b for a, b in zip(prefixes[::4], prefixes[1::4], strict=True))  # shuffled, not in blocks
    assert prompts == shared_prefix_prompts(5, 4, 40, 7, 9, 300, 3, [0, 1])
    assert prompts != shared_prefix_prompts(5, 4, 40, 7, 9, 300, 4, [0, 1])


def test_shared_prefix_text_with_tokenizer(tokenizer: Any) -> None:
    prompts = shared_prefix_prompts(3, 3, 48, 8, 5, tokenizer.vocab_size, 0, tokenizer.all_special_ids, tokenizer)
    systems = {p.text.split(SEPARATOR)[0] for p in prompts if p.text}
    assert len(systems) == 3 and all(p.input_ids is None for p in prompts)
    for p in prompts:
        assert p.prompt_len == len(tokenizer.encode(p.text, add_special_tokens=False))
        assert 40 <= p.prompt_len <= 70
    cfg = make_cfg(
        dataset_name="generated-shared-prefix",
        gsp_num_groups=2,
        gsp_prompts_per_group=3,
        gsp_system_prompt_len=16,
        gsp_question_len=4,
        gsp_output_len=6,
        backend="openai-chat",
    )
    assert len(build_prompts(cfg, tokenizer, tokenizer.vocab_size)) == 6  # --num-prompts does not apply
    with pytest.raises(ValueError, match="needs --tokenizer"):
        build_prompts(cfg, None, 256)


def test_chat_synthetic_lengths_mean_clamp_and_seed() -> None:
    ins, outs = chat.chat_lengths(40000, 10**6, 10**6, 0.0, 8192, seed=0)
    assert abs(ins.mean() - chat.INPUT_MEAN) < 0.05 * chat.INPUT_MEAN  # the documented means, unclamped
    assert abs(outs.mean() - chat.OUTPUT_MEAN) < 0.05 * chat.OUTPUT_MEAN
    assert np.median(ins) < ins.mean() and ins.min() >= chat.MIN_LEN  # right-skewed, floored
    ins, outs = chat.chat_lengths(5000, 512, 300, 0.25, 1000, seed=1)
    long = ins > 512
    assert outs.max() <= 300 and ins[~long].max() <= 512 and ins.min() >= 4
    assert abs(long.mean() - 0.25) < 0.03 and ins[long].min() >= 500 and ins[long].max() <= 1000
    assert set(chat.chat_lengths(50, 2, 3, 0.0, 8, 0)[0]) <= {2}  # a max below MIN_LEN wins
    a = chat.chat_synthetic_prompts(30, 256, 64, 0.1, 512, vocab_size=500, seed=5)
    assert a == chat.chat_synthetic_prompts(30, 256, 64, 0.1, 512, 500, 5)
    assert a != chat.chat_synthetic_prompts(30, 256, 64, 0.1, 512, 500, 6)
    assert all(p.input_ids is not None and len(p.input_ids) == p.prompt_len for p in a)
    cfg = make_cfg(
        dataset_name="chat-synthetic",
        num_prompts=30,
        random_input_len=256,
        random_output_len=64,
        chat_long_fraction=0.1,
        chat_long_input_len=512,
        seed=5,
    )
    assert build_prompts(cfg, None, 500) == a


def test_burstiness_keeps_the_mean_changes_the_spread() -> None:
    for b in (0.25, 4.0):
        gaps = np.array(arrival_gaps(2.0, 40000, 0, burstiness=b))
        assert abs(gaps.mean() - 0.5) < 0.5 * 0.05
        assert abs(gaps.std() / gaps.mean() - 1 / math.sqrt(b)) < 0.08  # gamma: CV = 1 / sqrt(shape)
    assert arrival_gaps(2.0, 50, 1) == arrival_gaps(2.0, 50, 1, burstiness=1.0)


# ---------------------------------------------------------------- SLO and goodput


def rec(ttft: float, latency: float, out: int, itl: Sequence[float], ok: bool = True) -> RequestRecord:
    return RequestRecord(ok, "" if ok else "HTTP 500: boom", 10, out, ttft, tuple(itl), latency)


def test_parse_slo() -> None:
    assert parse_slo(["ttft:2000", "tpot:50"]) == SLO(ttft=2000.0, tpot=50.0)
    assert parse_slo(["e2el:900", "ITL:150", "itl_p99:80"]) == SLO(e2e=900.0, itl=150.0, itl_p99=80.0)
    assert parse_slo(["ttft:2000", "itl:150"]).describe() == "ttft<=2000ms itl<=150ms"
    for bad in (["ttft"], ["foo:1"], ["ttft:abc"], ["tpot:0"], []):
        with pytest.raises(ValueError):
            parse_slo(bad)


def test_request_goodness() -> None:
    steady = rec(0.5, 0.5 + 0.02 * 99, 100, [0.02] * 99)
    stall = rec(0.5, 0.5 + 0.02 * 98 + 0.4, 100, [0.02] * 98 + [0.4])  # one 400 ms stall
    assert request_values_ms(stall)["itl"] == pytest.approx(400.0)
    assert request_values_ms(stall)["itl_p99"] == pytest.approx(np.percentile([20.0] * 98 + [400.0], 99))
    assert is_good(steady, SLO(itl=150)) and not is_good(stall, SLO(itl=150))  # the max catches the stall
    assert is_good(stall, SLO(tpot=30))  # ... which the mean per-token time hides
    assert is_good(stall, SLO(ttft=500)) and not is_good(stall, SLO(ttft=499))  # bounds are inclusive
    assert is_good(rec(0.1, 0.1, 1, []), SLO(tpot=1, itl=1))  # one token: no TPOT, no gaps
    assert not is_good(rec(0.0, 0.1, 0, [], ok=False), SLO(ttft=10_000))
    records = [steady, stall, rec(0.1, 0.1, 1, []), rec(0.0, 0.1, 0, [], ok=False)]
    g = compute_goodput(records, duration=2.0, slo=SLO(ttft=1000, itl=150))
    assert (g.good, g.total, g.request_goodput, g.attainment_pct) == (2, 4, 1.0, 50.0)
    m = compute_metrics(records, 2.0, SLO(ttft=1000, itl=150))
    assert m.goodput == g and compute_metrics(records, 2.0).goodput is None


def test_goodput_in_table_and_json() -> None:
    slo = SLO(ttft=1000, itl=150)
    records = [rec(0.1, 1.0, 10, [0.1] * 9), rec(0.2, 0.6, 4, [0.5, 0.01, 0.01])]
    cfg = make_cfg(slo=slo, tag="pd", labels=(("workload", "long"),))
    m = compute_metrics(records, 2.0, slo)
    table = format_table(cfg, m)
    for row in (
        "Tag:",
        "Request goodput (req/s):                 0.50",
        "SLO attainment (%):                      50.00",
        "ttft<=1000ms itl<=150ms",
        "P90 TTFT (ms):",
        "P90 TPOT (ms):",
        "P90 ITL (ms):",
        "P99 E2E Latency",
    ):
        assert row in table
    row = json.loads(json.dumps(result_json(cfg, "m", m, flush_status="ok"), allow_nan=False))
    assert (row["tag"], row["labels"], row["flush_cache"]) == ("pd", {"workload": "long"}, "ok")
    assert row["goodput_slo"] == {"ttft": 1000.0, "itl": 150.0} and row["good_requests"] == 1
    assert row["request_goodput"] == 0.5 and row["slo_attainment_pct"] == 50.0
    for stat in ("mean", "median", "p90", "p99"):
        for metric in ("ttft", "tpot", "itl", "e2e_latency"):
            assert isinstance(row[f"{stat}_{metric}_ms"], float)
    plain = result_json(make_cfg(), "m", compute_metrics(records, 2.0))
    assert plain["request_goodput"] is None and plain["tag"] is None and plain["labels"] == {}


# ---------------------------------------------------------------- flush-cache, progress, flags


async def _flush_against(statuses: list[int]) -> tuple[str, int]:
    import aiohttp
    from aiohttp.test_utils import TestServer

    calls = {"n": 0}

    async def handler(request: web.Request) -> web.Response:
        status = statuses[min(calls["n"], len(statuses) - 1)]
        calls["n"] += 1
        return web.Response(status=status, text="busy" if status != 200 else "Cache flushed.\n")

    app = web.Application()
    app.router.add_post("/flush_cache", handler)
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as session:
        result = await flush_cache(session, str(server.make_url("")).rstrip("/"), {}, attempts=4, retry_s=0.01)
    return result, calls["n"]


def test_flush_cache_retries_busy_and_tolerates_foreign_servers() -> None:
    assert asyncio.run(_flush_against([200])) == ("ok", 1)
    assert asyncio.run(_flush_against([400, 400, 200])) == ("ok", 3)  # busy while warm-up drains
    assert asyncio.run(_flush_against([404])) == ("unsupported", 1)
    result, calls = asyncio.run(_flush_against([400]))
    assert calls == 4 and result.startswith("failed: HTTP 400")
    assert asyncio.run(_flush_against([500]))[1] == 1  # not "busy": no retry


def test_progress_counter_and_disabled() -> None:
    out = io.StringIO()
    bar = CounterProgress(3, out, interval_s=3600)
    for _ in range(3):
        bar.tick()
    bar.close()
    assert out.getvalue().startswith("\r3/3 requests done") and out.getvalue().endswith("\n")  # only the last tick
    assert isinstance(make_progress(3, disabled=True), NoProgress)


def test_flags_to_config() -> None:
    args = serving.build_parser().parse_args(
        [
            "--dataset-name",
            "generated-shared-prefix",
            "--gsp-num-groups",
            "3",
            "--gsp-prompts-per-group",
            "2",
            "--gsp-system-prompt-len",
            "100",
            "--gsp-question-len",
            "10",
            "--gsp-output-len",
            "7",
            "--flush-cache",
            "--goodput",
            "ttft:2000",
            "itl:150",
            "--tag",
            "pd",
            "--label",
            "workload=long",
            "--label",
            "run=a=b",
            "--burstiness",
            "0.5",
            "--request-rate",
            "4",
            "--disable-tqdm",
        ]
    )
    cfg = serving.config_from_args(args)
    assert (cfg.gsp_num_groups, cfg.gsp_prompts_per_group, cfg.gsp_system_prompt_len) == (3, 2, 100)
    assert (cfg.gsp_question_len, cfg.gsp_output_len, cfg.flush_cache, cfg.burstiness) == (10, 7, True, 0.5)
    assert cfg.slo == SLO(ttft=2000, itl=150) and cfg.tag == "pd"
    assert cfg.labels == (("workload", "long"), ("run", "a=b")) and cfg.plot_dir is None
    chat_args = serving.build_parser().parse_args(["--dataset-name", "chat-synthetic", "--chat-long-fraction", "0.2"])
    assert serving.config_from_args(chat_args).chat_long_fraction == 0.2
    for bad in (
        ["--goodput", "ttft"],
        ["--label", "novalue"],
        ["--chat-long-fraction", "2"],
        ["--gsp-num-groups", "0"],
    ):
        with pytest.raises(SystemExit):
            serving.main(bad)


def test_cli_gsp_goodput_flush_plot(tmp_path: Path) -> None:
    with TokenStreamTestDouble(ttft=0.02, itl=0.005) as server:  # the double has no /flush_cache: a foreign server
        proc, row = run_cli(
            server.port,
            tmp_path / "r.jsonl",
            "--dataset-name",
            "generated-shared-prefix",
            "--gsp-num-groups",
            "2",
            "--gsp-prompts-per-group",
            "3",
            "--gsp-system-prompt-len",
            "20",
            "--gsp-question-len",
            "4",
            "--gsp-output-len",
            "5",
            "--flush-cache",
            "--request-rate",
            "200",
            "--goodput",
            "ttft:5000",
            "itl:1000",
            "--tag",
            "pd",
            "--label",
            "workload=gsp",
            "--plot",
            str(tmp_path / "png"),
        )
    assert proc.returncode == 0, proc.stderr
    assert "POST /flush_cache: unsupported" in proc.stderr
    assert row is not None and row["completed"] == 6 and row["total_input_tokens"] == 6 * 24
    assert row["flush_cache"] == "unsupported" and row["slo_attainment_pct"] == 100.0
    assert (
        row["tag"] == "pd" and row["labels"] == {"workload": "gsp"} and row["gsp_num_groups"] == row["num_prompts"] - 4
    )
    pngs = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert {
        "pd_gsp_rate200_ttft_cdf.png",
        "pd_gsp_rate200_itl_cdf.png",
        "pd_gsp_rate200_e2e_cdf.png",
        "gsp_throughput_vs_rate.png",
        "gsp_goodput_vs_rate.png",
    } <= set(pngs)


# ---------------------------------------------------------------- plots and comparison tables


def sweep_rows() -> list[dict[str, Any]]:
    rows = []
    for tag, itl, tput in (("pd", 20.0, 900.0), ("colocated", 50.0, 1000.0)):
        for rate in (1.0, 2.0, 4.0):
            rows.append(
                {
                    "tag": tag,
                    "labels": {"workload": "long"},
                    "request_rate": rate,
                    "completed": 10,
                    "failed": 0,
                    "p99_itl_ms": itl * rate,
                    "p99_ttft_ms": 100 * rate,
                    "output_throughput": tput * rate,
                    "request_goodput": 1.0 / rate,
                    "slo_attainment_pct": 100.0 / rate,
                    "goodput_slo": {"ttft": 3000.0, "itl": 150.0},
                }
            )
    rows.append({**rows[0], "p99_itl_ms": 7.0})  # a rerun of (pd, 1.0): replaces the first
    rows.append({**rows[1], "request_rate": "inf"})  # no place on a rate axis
    rows.append({**rows[1], "labels": {"workload": "mixed"}, "request_rate": 8.0})
    return rows


def test_sweep_series_and_select() -> None:
    rows = select_rows(sweep_rows(), {"labels.workload": "long"})
    assert len(rows) == 8
    series = sweep_series(rows, "p99_itl_ms")
    assert series["pd"] == [(1.0, 7.0), (2.0, 40.0), (4.0, 80.0)] and len(series["colocated"]) == 3
    assert sweep_series([{"request_rate": 1, "x": None}], "x") == {"untagged": []}
    xs, ys = cdf_points([3.0, 1.0, 2.0])
    assert list(xs) == [1.0, 2.0, 3.0] and list(ys) == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_plot_sweep_and_cdfs_write_pngs(tmp_path: Path) -> None:
    written = plot_sweep(select_rows(sweep_rows(), {"labels.workload": "long"}), tmp_path, "long_", "long")
    assert sorted(p.name for p in written) == [
        "long_goodput_vs_rate.png",
        "long_p99_itl_vs_rate.png",
        "long_p99_ttft_vs_rate.png",
        "long_throughput_vs_rate.png",
    ]
    assert all(p.read_bytes().startswith(PNG_MAGIC) and p.stat().st_size > 5000 for p in written)
    only_itl = [{"tag": "pd", "request_rate": 1.0, "p99_itl_ms": 5.0, "request_goodput": None}]
    assert [p.name for p in plot_sweep(only_itl, tmp_path / "b")] == ["p99_itl_vs_rate.png"]  # no data, no chart
    records = [rec(0.1 * i, 0.5 + 0.1 * i, 5, [0.01 * i] * 4) for i in range(1, 20)]
    cdfs = plot_run_cdfs(records, tmp_path / "cdf", "x")
    assert sorted(p.name for p in cdfs) == ["x_e2e_cdf.png", "x_itl_cdf.png", "x_ttft_cdf.png"]
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in cdfs)


def test_plots_module_cli(tmp_path: Path) -> None:
    src = tmp_path / "runs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in sweep_rows()))
    cmd = [
        sys.executable,
        "-m",
        "bench.serving_lib.plots",
        "--input",
        str(src),
        "--out-dir",
        str(tmp_path / "o"),
        "--where",
        "labels.workload=long",
        "--prefix",
        "long_",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.split()) == 4 and (tmp_path / "o" / "long_p99_itl_vs_rate.png").exists()


def test_workload_table_ratios() -> None:
    rows = sweep_rows()
    assert set(points(rows, "long")) == {(t, r) for t in ("pd", "colocated") for r in (1.0, 2.0, 4.0)}
    assert ratio(1.0, 2.0) == 0.5 and ratio(1.0, 0) is None and ratio(None, 1.0) is None
    table = workload_table(rows, "long").splitlines()
    assert len(table) == 2 + 3 and table[0].startswith("| rate req/s | ok pd | ok colocated | p99 ITL ms pd |")
    assert table[2].startswith("| 1 | 10/10 | 10/10 | 7.0 | 50.0 | 0.14x | 100 | 100 | 1.00x | 900 | 1000 | 0.90x |")
    mixed = workload_table(rows, "mixed").splitlines()
    assert mixed[2].startswith("| 8 | 10/10 | not run | 40.0 | n/a | n/a | ") and "(no data)" in workload_table(
        rows, "chat"
    )


# ---------------------------------------------------------------- pd_vs_colocated.py, the parts that need no cluster


def test_pd_vs_colocated_points_are_the_same_for_both_systems(tmp_path: Path) -> None:
    args = pd_vs_colocated.parse_args(["--bench-arg=--random-input-len=32", "--worker-arg=--mem-fraction-static=0.85"])
    assert args.systems == ["pd", "colocated"] and args.workloads == ["long", "mixed"] and args.device == "cuda"
    assert args.goodput == ["ttft:3000", "itl:150"] and args.worker_arg == ["--mem-fraction-static=0.85"]
    assert pd_vs_colocated.num_prompts(args, 0.5) == 24 and pd_vs_colocated.num_prompts(args, 3.0) == 120
    cmds = {
        s: pd_vs_colocated.bench_command(
            args, "http://r", s, "long", 2.0, 128256, tmp_path / "raw.jsonl", ("machine=m", "command=python x --y=z")
        )
        for s in ("pd", "colocated")
    }
    strip = [x for x in cmds["pd"] if x not in ("pd",)]
    assert strip == [x for x in cmds["colocated"] if x != "colocated"]  # only the tag differs
    cmd = cmds["pd"]
    for flag in ("--flush-cache", "--goodput", "--tag", "--output-file"):
        assert flag in cmd
    assert cmd[cmd.index("--random-vocab-size") + 1] == "128256" and cmd[cmd.index("--num-prompts") + 1] == "80"
    assert cmd[-3:] == ["--disable-tqdm", "--random-input-len", "32"]  # --bench-arg comes last: it wins
    parsed = serving.build_parser().parse_args(cmd[2:])
    assert parsed.random_input_len == 32 and parsed.random_range_ratio == 0.5
    assert serving.parse_labels(parsed.label) == (("workload", "long"), ("machine", "m"), ("command", "python x --y=z"))
    with pytest.raises(SystemExit):
        pd_vs_colocated.parse_args(["--systems", "pd,nope"])
    path, extra, vocab = pd_vs_colocated.prepare_model(pd_vs_colocated.parse_args([]))
    assert extra == ["--load-format=dummy"] and vocab == 128256 and (Path(path) / "config.json").exists()
