"""``python -m benchmarks``: the performance table of issue [6], measured in one run.

Every server runs in its own process and every load in another, so the figures are the
server's. Ratios compare rows measured in the same run; with ``--runs N`` each row is the
median of N runs. Nothing here passes or fails: it prints figures and targets.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from benchmarks import servers

console = Console()


def load(**spec: Any) -> dict[str, Any]:
    """Run one load scenario in its own process and return its figures."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.loadproc", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def bench_stats(port: int) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(f"http://127.0.0.1:{port}/bench/stats").json()
    return stats


@dataclass
class Row:
    id: str
    workload: str
    measured: str
    target: str
    met: bool | None


def median_of(runs: int, measure: Callable[[], dict[str, Any]], key: str) -> dict[str, Any]:
    results = [measure() for _ in range(runs)]
    results.sort(key=lambda r: r[key])
    return results[len(results) // 2]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rows: list[Row] = []
        self.figures: dict[str, float] = {}
        self.duration_s = args.duration_s

    def row(self, *fields: Any) -> None:
        self.rows.append(Row(*fields))
        r = self.rows[-1]
        status = "n/a" if r.met is None else ("met" if r.met else "MISSED")
        console.print(f"{r.id:>4} {r.workload:<58} {r.measured:<38} {r.target} [{status}]")

    # -- rows -------------------------------------------------------------------------

    def p0_p1(self) -> None:
        conns = 64
        with servers.start("baseline") as base:
            p0 = median_of(
                self.args.runs,
                lambda: load(
                    scenario="submit", port=base.port, connections=conns, duration_s=self.duration_s
                ),
                "rps",
            )
        with servers.start("broker") as broker:
            p1 = median_of(
                self.args.runs,
                lambda: load(
                    scenario="submit",
                    port=broker.port,
                    connections=conns,
                    duration_s=self.duration_s,
                ),
                "rps",
            )
            stats = bench_stats(broker.port)
        self.figures.update(p0=p0["rps"], p1=p1["rps"])
        ratio = p1["rps"] / p0["rps"]
        self.row(
            "P0",
            "trivial JSON POST on Starlette+uvicorn, 64 clients",
            f"{p0['rps']:.0f} req/s",
            "(yardstick)",
            None,
        )
        self.row(
            "P1",
            "single-job REST submits, 64 clients, memory store",
            f"{p1['rps']:.0f} jobs/s = {ratio:.0%} of P0, p99 {p1['p99_ms']:.1f} ms",
            ">= 70% of P0",
            ratio >= 0.70,
        )
        writes_per_1000 = stats["writes"] / max(1, p1["requests"] * self.args.runs) * 1000
        self.figures["p1_writes_per_1000"] = writes_per_1000
        self.row(
            "P1w",
            "storage writes per 1,000 submits (P1)",
            f"{writes_per_1000:.1f}",
            "(figure)",
            None,
        )

    def p2(self) -> None:
        with servers.start("broker") as broker:
            p2 = median_of(
                self.args.runs,
                lambda: load(
                    scenario="batch", port=broker.port, connections=4, batch_size=1000, total=120
                ),
                "jobs_per_s",
            )
        self.row(
            "P2",
            "batch submits of 1,000 jobs, 4 clients, 120 batches per run (one broker)",
            f"{p2['jobs_per_s']:.0f} jobs/s",
            ">= 50,000 jobs/s",
            p2["jobs_per_s"] >= 50_000,
        )

    def _drain(self, port: int, total: int, types: list[str] | None = None) -> dict[str, Any]:
        return load(scenario="drain", port=port, connections=8, total=total, types=types)

    def p3(self) -> None:
        total = self.args.jobs

        def once() -> dict[str, Any]:
            with servers.start("broker") as broker:
                load(
                    scenario="batch",
                    port=broker.port,
                    connections=1,
                    batch_size=1000,
                    total=total // 1000,
                )
                result = self._drain(broker.port, total)
                result["writes"] = bench_stats(broker.port)["writes"]
                return result

        p3 = median_of(self.args.runs, once, "jobs_per_s")
        self.figures["p3"] = p3["jobs_per_s"]
        ratio = p3["jobs_per_s"] / self.figures["p1"]
        self.row(
            "P3",
            "drain: claim + complete by 8 REST workers",
            f"{p3['jobs_per_s']:.0f} jobs/s = {ratio:.0%} of P1",
            ">= 35% of P1",
            ratio >= 0.35,
        )
        per_1000 = p3["writes"] / total * 1000
        self.row(
            "P3w",
            "storage writes per 1,000 jobs drained (incl. batch submit)",
            f"{per_1000:.1f}",
            "(figure)",
            None,
        )

    def p4(self) -> None:
        with servers.start("broker", "--latency-ms", "100") as broker:
            p4 = median_of(
                self.args.runs,
                lambda: load(
                    scenario="submit", port=broker.port, connections=256, duration_s=self.duration_s
                ),
                "rps",
            )
        ratio = p4["rps"] / self.figures["p1"]
        self.row(
            "P4",
            "P1 with 100 ms store latency, 256 clients",
            f"{p4['rps']:.0f} jobs/s = {ratio:.0%} of P1, p99 {p4['p99_ms']:.0f} ms",
            ">= 80% of P1, p99 <= 250 ms",
            ratio >= 0.8 and p4["p99_ms"] <= 250,
        )

    def p5(self) -> None:
        prefill = self.args.prefill
        with servers.start("broker", "--prefill", str(prefill)) as broker:
            before = bench_stats(broker.port)
            p5a = median_of(
                self.args.runs,
                lambda: load(
                    scenario="submit", port=broker.port, connections=64, duration_s=self.duration_s
                ),
                "rps",
            )
            # Each drain takes 4,000 of the jobs P5a submitted, so the 100,000 stay queued.
            p5b = median_of(
                self.args.runs,
                lambda: self._drain(broker.port, min(4000, p5a["requests"]), types=["bench"]),
                "jobs_per_s",
            )
            after = bench_stats(broker.port)
        ratio_a = p5a["rps"] / self.figures["p1"]
        ratio_b = p5b["jobs_per_s"] / self.figures["p3"]
        self.row(
            "P5a",
            f"P1 with {prefill:,} jobs queued",
            f"{p5a['rps']:.0f} jobs/s = {ratio_a:.0%} of P1",
            ">= 50% of P1",
            ratio_a >= 0.5,
        )
        self.row(
            "P5b",
            f"P3 with {prefill:,} jobs queued (claims by type)",
            f"{p5b['jobs_per_s']:.0f} jobs/s = {ratio_b:.0%} of P3",
            ">= 50% of P3",
            ratio_b >= 0.5,
        )
        # P5m is the broker holding the 100,000 jobs (read when it has loaded them and made
        # its first write); P5m+ is the same broker after P5a and P5b, whose submits added
        # tens of thousands of jobs more.
        for row, stats, what in (
            ("P5m", before, f"broker memory with {prefill:,} jobs queued"),
            ("P5m+", after, f"the same after P5a/P5b ({after['queued']:,} jobs queued)"),
        ):
            doc_mb = stats["lastWriteBytes"] / 1e6
            rss_mb = stats["rss"] / 1e6
            limit_mb = 3 * doc_mb + 100
            self.row(
                row,
                what,
                f"RSS {rss_mb:.0f} MB, document {doc_mb:.1f} MB",
                f"<= {limit_mb:.0f} MB (3x doc + 100)",
                rss_mb <= limit_mb,
            )

    def p6(self) -> None:
        seconds = self.args.p6_seconds
        consumers = self.args.p6_consumers
        with servers.start("broker", "--commit-interval-ms", "50") as broker:
            before = bench_stats(broker.port)["writes"]
            producer = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.loadproc",
                    json.dumps(
                        {
                            "scenario": "submit",
                            "port": broker.port,
                            "connections": 128,
                            "rate": 1000,
                            "duration_s": seconds,
                        }
                    ),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            # Little's law: 1,000 jobs/s with a claim and a complete of ~50 ms each keeps
            # about 100 jobs in flight, so a deployment runs that many consumers or more.
            drained = load(
                scenario="consume",
                port=broker.port,
                connections=consumers,
                wait_ms=1000,
                until_s=seconds + 0.5,
            )
            submitted = json.loads(producer.communicate()[0])["requests"]
            writes = bench_stats(broker.port)["writes"] - before
            jobs = drained["jobs"]
            # Every job counted was submitted, claimed and completed inside the window.
            per_1000 = writes / max(1, min(submitted, jobs)) * 1000
            self.row(
                "P6",
                f"1,000 jobs/s offered for {seconds} s, interval 50 ms, {consumers} "
                "long-poll consumers; writes / jobs submitted+claimed+completed",
                f"{per_1000:.1f} writes per 1,000 jobs ({submitted} submitted, {jobs} "
                f"drained, {writes} writes; claim-to-complete p99 {drained['p99_ms']:.0f} ms, "
                "claims wait up to 1 s)",
                "<= 60",
                per_1000 <= 60,
            )
        idle_s = 6
        with servers.start("broker", "--commit-interval-ms", "50") as broker:  # empty queue
            before = bench_stats(broker.port)["writes"]
            polled = load(
                scenario="poll_idle",
                port=broker.port,
                connections=50,
                interval_s=0.1,
                duration_s=idle_s,
            )
            writes = bench_stats(broker.port)["writes"] - before
        heartbeats = idle_s / 3 + 1
        self.row(
            "P6i",
            f"idle queue, 50 workers polling every 100 ms for {idle_s} s",
            f"{writes} writes for {polled['claims']} claims",
            f"<= {heartbeats:.0f} (leader heartbeats only)",
            writes <= heartbeats,
        )

    def p7(self) -> None:
        self._p7("rest", "P7")
        self._p7("ws", "P7ws")

    def _p7(self, transport: str, row: str) -> None:
        total = self.args.jobs
        with servers.start("broker") as broker:
            load(
                scenario="batch",
                port=broker.port,
                connections=1,
                batch_size=1000,
                total=total // 1000,
            )
            url = f"http://127.0.0.1:{broker.port}"
            started = time.monotonic()
            workers = [
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "osqueue",
                        "worker",
                        "--url",
                        url,
                        "-c",
                        "8",
                        "-H",
                        "bench=osqueue.handlers:noop",
                        "--log-level",
                        "warning",
                        "--transport",
                        transport,
                    ],
                )
                for _ in range(2)
            ]
            try:
                # The clock starts when the first job leaves the queue: starting Python and
                # importing osqueue (~1 s per process here) is not the runtime's cost per job.
                while bench_stats(broker.port)["queued"] == total:
                    time.sleep(0.01)
                first_done = time.monotonic()
                while bench_stats(broker.port)["queued"] > 0:
                    time.sleep(0.05)
                finished = time.monotonic()
            finally:
                for worker in workers:
                    worker.terminate()
                for worker in workers:
                    worker.wait(timeout=30)
        rate = total / (finished - first_done)
        with_start_up = total / (finished - started)
        ratio = rate / self.figures["p3"]
        self.row(
            row,
            f"2 `osqueue worker --transport {transport}` processes x 8 slots, no-op handler, "
            f"{total:,} jobs, timed from the first completed job",
            f"{rate:.0f} jobs/s = {ratio:.0%} of P3 ({with_start_up:.0f} jobs/s with "
            f"process start-up, {first_done - started:.1f} s)",
            ">= 80% of P3",
            ratio >= 0.8,
        )

    def p8(self) -> None:
        from benchmarks.transports import compare_transports

        for name, figures in compare_transports(self.args.jobs // 2).items():
            self.row(
                "P8",
                f"{name}: submit and drain via AsyncOsqueueClient (64 / 8 tasks)",
                f"submit {figures['submit']:.0f}/s, drain {figures['drain']:.0f} jobs/s",
                "(beside REST)",
                None,
            )

    def s3(self) -> None:
        """Issue [2]: submit and drain on S3 (moto in server mode), writes per 1,000 jobs."""
        from tests.plugins.emulators import MOTO_KEY_ID, MOTO_REGION, MOTO_SECRET, MotoS3Server

        moto = MotoS3Server()
        moto.start()
        try:
            bucket = moto.create_bucket()
            env = {
                "AWS_ACCESS_KEY_ID": MOTO_KEY_ID,
                "AWS_SECRET_ACCESS_KEY": MOTO_SECRET,
                "AWS_DEFAULT_REGION": MOTO_REGION,
                "S3_ENDPOINT_URL": moto.url,
            }
            options = ("--storage", f"s3://{bucket}/bench", "--commit-interval-ms", "50")
            with servers.start("broker", *options, env=env) as broker:
                submitted = load(
                    scenario="submit", port=broker.port, connections=64, duration_s=self.duration_s
                )
                drained = self._drain(broker.port, submitted["requests"])
                writes = bench_stats(broker.port)["writes"]
        finally:
            moto.stop()
        per_1000 = writes / max(1, drained["jobs"]) * 1000
        self.row(
            "S3",
            "submit (64 clients) then drain (8 workers) on moto S3, interval 50 ms",
            f"submit {submitted['rps']:.0f}/s, drain {drained['jobs_per_s']:.0f}/s, "
            f"{per_1000:.1f} writes per 1,000 jobs",
            "(figure)",
            None,
        )

    def table(self) -> None:
        table = Table(title="osqueue benchmarks (this machine, this run)")
        for column in ("id", "workload", "measured", "target", "status"):
            table.add_column(column)
        for r in self.rows:
            status = "" if r.met is None else ("met" if r.met else "MISSED")
            table.add_row(r.id, r.workload, r.measured, r.target, status)
        console.print(table)


ROWS = ["p0_p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8", "s3"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=1, help="median of this many runs per row")
    parser.add_argument("--duration-s", type=float, default=5.0, help="length of timed loads")
    parser.add_argument("--jobs", type=int, default=4000, help="jobs per drain")
    parser.add_argument("--prefill", type=int, default=100_000)
    parser.add_argument("--p6-seconds", type=int, default=30)
    parser.add_argument(
        "--p6-consumers", type=int, default=160, help="P6's long-poll claim+complete loops"
    )
    parser.add_argument("--only", default=",".join(ROWS), help="comma-separated rows")
    args = parser.parse_args()
    bench = Bench(args)
    for name in args.only.split(","):
        if name in ("p3", "p5", "p7") and "p1" not in bench.figures:
            bench.p0_p1()
        if name in ("p5", "p7") and "p3" not in bench.figures:
            bench.p3()
        getattr(bench, name)()
    bench.table()


if __name__ == "__main__":
    main()
