"""`bench/run.py --quick` (what `make bench-quick` runs) on every test run, so that the benchmark
suite cannot rot: the same code paths as `make bench` on small sizes, every result checked
(stored sizes and sha256, page contents, stats totals). It asserts correctness, not speed."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_bench_quick_runs_every_scenario() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    for title in ("Uploads of 16 MiB", "Concurrent uploads", "Downloads", "Listing and stats",
                  "call, in one process (no gRPC, Envoy or token check)", "Small requests", "Profiles of the server",
                  "stats, 16 connections through Envoy", "16 concurrent gRPC uploads through Envoy",
                  "16 concurrent gRPC uploads through Envoy, the thread holding the GIL",
                  "constant grpc.aio handler", "Targets"):
        assert title in output, f"{title!r} missing from the output:\n{output[-3000:]}"
    # `make test` points the bench at the machine's PostgreSQL, as it points the tests.
    if os.environ.get("GALLERY_BENCH_POSTGRES_URL"):
        _, table, rest = output.partition("request on PostgreSQL (through Envoy, 16 connections)")
        assert table, output[-3000:]
        assert "stats, 20,000 events" in rest.split("\n\n")[0], rest[:3000]
