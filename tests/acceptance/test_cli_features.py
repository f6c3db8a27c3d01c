"""The queue features from the command line: job lookup and cancellation, dead letters,
batch and scheduled submits, and worker retry policies, each in a subprocess against one
broker process (the tests use job types of their own, so they share it)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from osqueue.cli import main
from tests.acceptance.conftest import Processes, free_port, healthy, wait_for


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    """CLI processes in one directory, against one broker: ``BROKER_URL`` is set."""
    processes = Processes(tmp_path_factory.mktemp("cli"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    processes.env.update(BROKER_URL=url, JOB_HEARTBEAT_TIMEOUT_MS="2000",
                         BROKER_HEARTBEAT_INTERVAL_MS="300")  # fmt: skip
    processes.start("broker", "--host", "127.0.0.1", "--port", str(port))
    try:
        wait_for(lambda: healthy(url), 20, "the broker to lead")
        yield processes
    finally:
        processes.stop_all()


def url(cli: Processes) -> str:
    return cli.env["BROKER_URL"]


def run_json(cli: Processes, *args: str, env: dict[str, str] | None = None) -> Any:
    result = cli.run(*args, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def get_job(cli: Processes, job_id: str) -> Any:
    """A job as the broker answers it over REST (cheaper than a CLI process)."""
    return httpx.get(f"{url(cli)}/v1/jobs/{job_id}").json()


def submit(cli: Processes, body: dict[str, Any]) -> str:
    job_id: str = httpx.post(f"{url(cli)}/v1/jobs", json=body).json()["jobId"]
    return job_id


def bury(cli: Processes, job_type: str, error: str) -> str:
    """A job of ``job_type`` claimed once and failed for good, over REST."""
    job_id = submit(cli, {"payload": {"error": error}, "type": job_type, "maxAttempts": 1})
    claimed = httpx.post(f"{url(cli)}/v1/jobs/claim", json={"workerId": "w", "types": [job_type]})
    assert claimed.json()["jobId"] == job_id
    failed = httpx.post(f"{url(cli)}/v1/jobs/{job_id}/fail", json={"workerId": "w", "error": error})
    assert failed.status_code == 204
    return job_id


def test_dead_letters_list_show_requeue_purge(cli: Processes) -> None:
    a = bury(cli, "resize", "ValueError: too big")
    b = bury(cli, "resize", "ValueError: too small")
    c = bury(cli, "email", "SMTPError: 550")
    live = submit(cli, {"payload": 1, "type": "not-dead"})

    listed = run_json(cli, "dead", "list", "--transport", "ws")
    assert [j["id"] for j in listed["jobs"]] == [a, b, c]
    assert listed["deadTotal"] == 3
    assert {j["reason"] for j in listed["jobs"]} == {"exhausted"}
    only_email = run_json(cli, "dead", "list", "--type", "email")
    assert [j["id"] for j in only_email["jobs"]] == [c]
    table = cli.run("dead", "list", env={"COLUMNS": "160"})
    assert table.returncode == 0 and a in table.stdout and "SMTPError: 550" in table.stdout
    assert "3 dead jobs kept, 3 ever" in table.stdout

    shown = run_json(cli, "dead", "show", c, "--transport", "connect")
    assert (shown["status"], shown["lastError"], shown["payload"]) == (
        "dead", "SMTPError: 550", {"error": "SMTPError: 550"},
    )  # fmt: skip
    not_dead = cli.run("dead", "show", live)
    assert not_dead.returncode == 1 and "is not dead (status unclaimed)" in not_dead.stderr

    nothing_named = cli.run("dead", "requeue")
    assert nothing_named.returncode == 2 and "--all" in nothing_named.stderr
    assert run_json(cli, "dead", "requeue", "--id", a) == {"requeued": 1}
    assert get_job(cli, a)["attempts"] == 0
    assert run_json(cli, "dead", "requeue", "--id", b, "--type", "email") == {"requeued": 0}
    assert get_job(cli, c)["status"] == "dead"
    assert run_json(cli, "dead", "requeue", "--type", "email") == {"requeued": 1}
    assert cli.run("dead", "requeue", "--all").stdout.strip() == "requeued 1 dead jobs"

    bury(cli, "thumbnail", "again")
    assert cli.run("dead", "purge", input_text="n\n").returncode == 1, "asks first"
    assert run_json(cli, "dead", "purge", "--yes") == {"purged": 1}
    stats = run_json(cli, "stats")
    assert (stats["dead"], stats["deadTotal"]) == (0, 4)


def test_job_lookup_and_cancel_reach_a_running_worker(cli: Processes) -> None:
    queued = submit(cli, {"payload": {"seconds": 30}, "type": "nap-queued", "priority": -5})
    running = submit(cli, {"payload": {"seconds": 30}, "type": "sleep"})
    worker = cli.start("worker", "--types", "sleep", "--heartbeat-interval-s", "0.3")
    wait_for(lambda: get_job(cli, running)["status"] == "in_progress", 20,
             "the worker to claim the job")  # fmt: skip

    held = run_json(cli, "job", running, "--transport", "connect")
    assert (held["status"], held["attempts"], held["maxAttempts"]) == ("in_progress", 1, 3)
    assert held["workerId"] and held["heartbeat"] >= held["createdAt"]
    text = cli.run("job", running, env={"COLUMNS": "160"}).stdout
    assert "in_progress" in text and "1 of 3" in text and '{"seconds":30}' in text

    assert cli.run("cancel", queued).stdout.strip() == f"cancelled job {queued}"
    assert run_json(cli, "cancel", running, "--transport", "ws") == {
        "jobId": running, "cancelled": True,
    }  # fmt: skip
    wait_for(lambda: f"lost the lease on job {running}" in cli.output(worker), 10,
             "the worker to stop the cancelled job at its next heartbeat")  # fmt: skip
    gone = cli.run("job", running)
    assert gone.returncode == 1 and "JobNotFoundError" in gone.stderr
    assert get_job(cli, queued)["_tag"] == "JobNotFoundError"
    again = cli.run("cancel", running)
    assert again.returncode == 1 and "JobNotFoundError" in again.stderr
    stats = run_json(cli, "stats")
    assert stats["inProgress"] == 0 and stats["completedTotal"] == 0


def test_submit_batch_file_and_stdin(cli: Processes, tmp_path: Path) -> None:
    lines = [
        {"payload": {"n": 1}, "type": "batch-a", "priority": 5},
        {"payload": {"n": 2}, "maxAttempts": 0},
        {"payload": {"n": 3}, "delayMs": 60_000, "idempotencyKey": "batch-3"},
        {"payload": {"n": 4}, "idempotencyKey": "batch-3"},
        {"payload": {"n": 5}, "prio": 1},
        {"payload": {"id": 123456789012345678901234567890}},  # not to become a float
    ]
    batch = tmp_path / "jobs.jsonl"
    batch.write_text("\n".join(json.dumps(line) for line in lines) + "\n\nnot json\n")

    result = cli.run("submit", "--batch", str(batch), "--type", "batch-default", "--json",
                     "--transport", "connect")  # fmt: skip
    assert result.returncode == 1, "a refused line makes the exit code 1"
    rows = json.loads(result.stdout)["results"]
    assert [r["line"] for r in rows] == [1, 2, 3, 4, 5, 6, 8]
    first, zero_attempts, delayed, duplicate, unknown, too_big, not_json = rows
    assert not first["duplicate"] and not delayed["duplicate"]
    assert duplicate == {"line": 4, "jobId": delayed["jobId"], "duplicate": True}
    assert "maxAttempts" in zero_attempts["error"]["message"]
    assert "'prio'" in unknown["error"]["message"]
    assert "not valid JSON" in not_json["error"]["message"]
    assert "$.payload.id" in too_big["error"]["message"]
    assert "64 bits" in too_big["error"]["message"]
    a = get_job(cli, first["jobId"])
    assert (a["type"], a["priority"]) == ("batch-a", 5), "a line's own fields win"
    c = get_job(cli, delayed["jobId"])
    assert c["type"] == "batch-default" and c["runAt"] > c["createdAt"] + 50_000

    piped = "\n".join(json.dumps({"payload": n}) for n in range(3))
    table = cli.run("submit", "--batch", "-", "--type", "batch-stdin", "--priority", "2",
                    input_text=piped, env={"COLUMNS": "160"})  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert "<stdin>: 3 submitted, 0 duplicates, 0 refused" in table.stdout
    listing = httpx.get(f"{url(cli)}/v1/jobs").json()["jobs"]
    stdin_jobs = [j for j in listing if j["type"] == "batch-stdin"]
    assert [j["payload"] for j in stdin_jobs] == [0, 1, 2]
    assert {j["priority"] for j in stdin_jobs} == {2}
    big = cli.run("submit", "123456789012345678901234567890")
    assert big.returncode != 0 and "64 bits" in big.stdout + big.stderr, "refused, not rounded"
    usage = cli.run("submit", '{"x": 1}', "--batch", str(batch))
    assert usage.returncode == 2 and "one of them" in usage.stderr


def test_submit_scheduled_delayed_and_keyed(cli: Processes) -> None:
    run_at = int(time.time() * 1000) + 3_600_000
    scheduled = run_json(cli, "submit", "{}", "--type", "later", "--run-at", str(run_at))
    assert get_job(cli, scheduled["jobId"])["runAt"] == run_at
    iso = run_json(cli, "submit", "{}", "--type", "later", "--run-at", "2099-01-01T00:00:00+01:00")
    assert get_job(cli, iso["jobId"])["runAt"] == 4070905200000
    naive = cli.run("submit", "{}", "--run-at", "2099-01-01T00:00:00")
    assert naive.returncode == 2 and "timezone" in naive.stderr

    first = cli.run("submit", '{"order": 1}', "--key", "order-1", "--transport", "ws")
    again = cli.run("submit", '{"order": 2}', "--key", "order-1", "--transport", "ws")
    job_id = first.stdout.strip()
    assert again.stdout.strip() == f"{job_id} (duplicate of an earlier submit)"
    assert get_job(cli, job_id)["payload"] == {"order": 1}


def test_worker_retry_policy_option(cli: Processes) -> None:
    job_id = submit(cli, {"payload": {"message": "nope"}, "type": "fail", "maxAttempts": 3})
    bad = cli.run("worker", "--retry", "fail=sometimes")
    assert bad.returncode == 2 and "TYPE=fixed:DELAY_S" in bad.stderr
    worker = cli.start("worker", "--types", "fail", env={"WORKER_RETRY": "fail=fixed:60 *=fixed:1"})

    def failed_once() -> bool:
        return get_job(cli, job_id).get("lastError") is not None

    wait_for(failed_once, 20, "the first failure")
    reported_ms = int(time.time() * 1000)
    job = get_job(cli, job_id)
    assert (job["status"], job["attempts"], job["lastError"]) == (
        "unclaimed", 1, "RuntimeError: nope",
    )  # fmt: skip
    # fixed:60 for this type; the broker's own backoff would be at most 1 s
    assert 55_000 < job["runAt"] - reported_ms <= 60_000
    assert "failed job" in cli.output(worker)


@pytest.mark.parametrize(
    "command",
    [["job"], ["cancel"], ["dead"], ["dead", "list"], ["dead", "show"], ["dead", "requeue"],
     ["dead", "purge"], ["submit"], ["worker"]],
)  # fmt: skip
def test_help_of_the_feature_commands_shows_examples(command: list[str]) -> None:
    result = CliRunner().invoke(main, [*command, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    assert "Examples:" in result.output
    if command == ["worker"]:
        for variable in ("WORKER_RETRY", "WORKER_CLAIM_WAIT_MS", "WORKER_HEARTBEAT_INTERVAL_S"):
            assert variable in result.output
