"""Failover with real broker processes: kill -9, SIGSTOP (split brain, F07), SIGTERM (F06 b).

Two ``python -m osqueue broker --standby`` processes share one store (a file directory, or
a bucket on the moto S3 server); whichever wins the empty document leads. Twenty clients
submit with idempotency keys and eight workers process jobs, all in this process and all
finding the broker through :class:`~osqueue.client.discovery.StoreDiscovery`. Then the
leader dies one of three ways and the standby has to take over.

Afterwards (failure-cases.md): every acknowledged submit is completed exactly once, or
still queued, or dead after exactly ``maxAttempts`` claims (I1); no job completes twice and
no id appears twice in the state (I2); no job is handed out more than ``maxAttempts`` times
and no attempt twice (I4). The time from the leader's death to the new leader's takeover
write (its first commit) is printed and must stay within the leader timeout + 2 s.

Timings are short: leader heartbeat every 300 ms, leader timeout 3 s, job timeout 2 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import random
import signal
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from osqueue.client import AsyncOsqueueClient, ClientRetry
from osqueue.client.discovery import StoreDiscovery
from osqueue.errors import BrokerLeadershipError, LeaseLostError, OsqueueError
from osqueue.storage import STATE_KEY, FileStorage, Storage
from osqueue.worker import JobContext, Worker
from tests.acceptance.conftest import Processes, free_port
from tests.plugins.emulators import MOTO_KEY_ID, MOTO_REGION, MOTO_SECRET, MotoS3Server, S3Factory

pytestmark = pytest.mark.slow

LEADER_HEARTBEAT_MS = 300
LEADER_TIMEOUT_S = 3.0
JOB_TIMEOUT_MS = 2000
TAKEOVER_BUDGET_S = LEADER_TIMEOUT_S + 2.0
CLIENTS = 20
WORKERS = 8
MAX_ATTEMPTS = 3
JOB_TYPE = "failover"

#: Bounded waits for things that happen in other processes.
START_S = 30.0
SETTLE_S = 15.0
DRAIN_S = 20.0


def broker_env(storage_env: dict[str, str]) -> dict[str, str]:
    return {
        **storage_env,
        "BROKER_HOST": "127.0.0.1",
        "BROKER_HEARTBEAT_INTERVAL_MS": str(LEADER_HEARTBEAT_MS),
        "BROKER_HEARTBEAT_TIMEOUT_MS": str(int(LEADER_TIMEOUT_S * 1000)),
        "JOB_HEARTBEAT_TIMEOUT_MS": str(JOB_TIMEOUT_MS),
        "OSQUEUE_LOG_LEVEL": "info",
    }


async def until(
    condition: Callable[[], Any],
    timeout_s: float,
    what: str,
    poll_s: float = 0.05,
    *,
    required: bool = True,
) -> Any:
    """Poll an observable condition (sync or async) until it is truthy and return its value;
    past ``timeout_s`` fail the test naming ``what`` (or return None if not ``required``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            if required:
                pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
            return None
        await asyncio.sleep(poll_s)


async def read_document(storage: Storage) -> dict[str, Any]:
    found = await storage.read(STATE_KEY)
    if found is None:
        return {"jobs": [], "dead": []}
    doc: dict[str, Any] = orjson.loads(found.data)  # strict: no NaN, no duplicate keys
    return doc


# -- the brokers ----------------------------------------------------------------------------


@dataclass
class BrokerProcess:
    proc: subprocess.Popen[str]
    url: str
    log: Callable[[], str]

    async def readiness(self, http: httpx.AsyncClient) -> tuple[int, dict[str, Any]] | None:
        try:
            response = await http.get(f"{self.url}/readyz", timeout=1.0)
        except httpx.HTTPError:
            return None
        return response.status_code, response.json()

    async def leading(self, http: httpx.AsyncClient) -> dict[str, Any] | None:
        ready = await self.readiness(http)
        return ready[1] if ready is not None and ready[0] == 200 else None


async def start_pair(
    procs: Processes, env: dict[str, str], http: httpx.AsyncClient
) -> tuple[BrokerProcess, BrokerProcess]:
    """Two standbys on one store; returns (leader, standby) once both are up."""
    brokers = []
    for _ in range(2):
        port = free_port()
        proc = procs.start("broker", "--port", str(port), "--standby", env=env)
        brokers.append(
            BrokerProcess(proc, f"http://127.0.0.1:{port}", lambda p=proc: procs.output(p))
        )

    async def settled() -> tuple[BrokerProcess, BrokerProcess] | None:
        ready = [await b.readiness(http) for b in brokers]
        if any(r is None for r in ready):
            return None
        leaders = [b for b, r in zip(brokers, ready, strict=True) if r is not None and r[0] == 200]
        if len(leaders) != 1:
            return None
        standby = next(b for b in brokers if b is not leaders[0])
        standby_view = ready[brokers.index(standby)]
        assert standby_view is not None
        if standby_view[1].get("leader") != leaders[0].url.removeprefix("http://"):
            return None  # the standby has not looked at the store yet
        return leaders[0], standby

    pair: tuple[BrokerProcess, BrokerProcess] = await until(
        settled, START_S, "a leader and a standby"
    )
    return pair


# -- the load: clients submitting, workers working, a monitor reading the store -------------


@dataclass
class Load:
    """Twenty submitters, eight workers and a store monitor, with everything they saw."""

    discovery: StoreDiscovery
    first_url: str
    storage: Storage
    acked: dict[str, str] = field(default_factory=dict)  # idempotency key -> job id
    duplicates: int = 0
    submit_errors: Counter[str] = field(default_factory=Counter)
    claims: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    keys_of_job: dict[str, str] = field(default_factory=dict)
    completed: Counter[str] = field(default_factory=Counter)
    #: Jobs whose complete got no answer: it may have landed all the same.
    uncertain: set[str] = field(default_factory=set)
    seen_leaders: list[tuple[str | None, int]] = field(default_factory=list)
    stop_submitting: asyncio.Event = field(default_factory=asyncio.Event)
    stop_monitoring: asyncio.Event = field(default_factory=asyncio.Event)
    workers: list[Worker] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    clients: list[AsyncOsqueueClient] = field(default_factory=list)

    def client(self) -> AsyncOsqueueClient:
        made = AsyncOsqueueClient(
            self.first_url,
            discover=self.discovery,
            timeout_s=1.5,  # a paused broker holds requests: give up on it and rediscover
            retry=ClientRetry(deadline_s=20.0, base_s=0.05, cap_s=0.5),
        )
        self.clients.append(made)
        return made

    async def start(self) -> None:
        for n in range(CLIENTS):
            self.tasks.append(asyncio.create_task(self._submitter(n)))
        for n in range(WORKERS):
            worker = Worker(
                self.client(),
                {JOB_TYPE: self._handle},
                concurrency=4,
                worker_id=f"w{n}",
                heartbeat_interval_s=0.4,
                poll_min_s=0.02,
                poll_max_s=0.2,
                on_claim=self._on_claim,
                on_complete=self._on_complete,
                on_failure=self._on_failure,
            )
            self.workers.append(worker)
            self.tasks.append(asyncio.create_task(worker.run(install_signal_handlers=False)))
        self.tasks.append(asyncio.create_task(self._monitor()))

    async def _submitter(self, n: int) -> None:
        client = self.client()
        count = 0
        key = f"c{n}-{count}"
        while not self.stop_submitting.is_set():
            try:
                receipt = await client.submit_with_receipt(
                    {"key": key}, type=JOB_TYPE, max_attempts=MAX_ATTEMPTS, idempotency_key=key
                )
            except OsqueueError as exc:
                self.submit_errors[exc.tag] += 1  # not acknowledged; the same key goes again
            else:
                if key in self.acked and self.acked[key] != receipt.job_id:
                    pytest.fail(f"key {key} answered {receipt.job_id}, before {self.acked[key]}")
                self.duplicates += receipt.duplicate
                self.acked[key] = receipt.job_id
                count += 1
                key = f"c{n}-{count}"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_submitting.wait(), 0.1)

    @staticmethod
    async def _handle(ctx: JobContext[Any]) -> None:
        await asyncio.sleep(random.choice((0.01, 0.05, 0.2, 0.8)))

    def _on_claim(self, ctx: JobContext[Any]) -> None:
        self.claims[ctx.job_id].append(ctx.attempt)
        key = ctx.raw_payload["key"]
        if self.keys_of_job.setdefault(ctx.job_id, key) != key:
            pytest.fail(f"job {ctx.job_id} claimed with two different payloads")

    def _on_complete(self, ctx: JobContext[Any], result: Any) -> None:
        self.completed[ctx.job_id] += 1

    def _on_failure(self, ctx: JobContext[Any], error: BaseException) -> None:
        # Handlers never raise here, so this is a lost lease (nothing landed), a broker that
        # did not lead (nothing landed), or a complete whose outcome is unknown.
        if not isinstance(error, LeaseLostError | BrokerLeadershipError):
            self.uncertain.add(ctx.job_id)

    async def _monitor(self) -> None:
        """Record (brokerId, epoch) of the stored document as it changes."""
        while not self.stop_monitoring.is_set():
            with contextlib.suppress(OsqueueError):
                doc = await read_document(self.storage)
                seen = (doc.get("brokerId"), int(doc.get("epoch") or 0))
                if not self.seen_leaders or self.seen_leaders[-1] != seen:
                    self.seen_leaders.append(seen)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_monitoring.wait(), 0.05)

    async def drained(self) -> bool:
        """Every acknowledged job completed, or gone after a complete that got no answer."""
        pending = [j for j in self.acked.values() if not self.completed[j]]
        if any(j not in self.uncertain for j in pending):
            return False
        live = {job["id"] for job in (await read_document(self.storage))["jobs"]}
        return not live.intersection(pending)

    async def finish(self) -> None:
        """Stop submitting, let the workers drain (bounded), then shut down."""
        self.stop_submitting.set()
        # Not required: a lost job never completes, and check_invariants names it.
        await until(self.drained, DRAIN_S, "the queue to drain", 0.1, required=False)
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop every task (workers give back what they hold) and close the clients."""
        self.stop_submitting.set()
        self.stop_monitoring.set()
        for worker in self.workers:
            worker.request_stop()
        await asyncio.gather(*self.tasks)
        self.tasks.clear()
        for client in self.clients:
            await client.close()


@contextlib.asynccontextmanager
async def running(load: Load) -> AsyncIterator[Load]:
    await load.start()
    try:
        yield load
    finally:
        await load.shutdown()


# -- the invariants -------------------------------------------------------------------------


def check_invariants(load: Load, doc: dict[str, Any]) -> None:
    live = {job["id"]: job for job in doc["jobs"]}
    dead = {job["id"]: job for job in doc.get("dead", [])}

    # I2: no id twice in the state, no job completed twice.
    assert len(live) == len(doc["jobs"]), "a job id appears twice in jobs"
    assert len(dead) == len(doc.get("dead", [])), "a job id appears twice in dead"
    assert not live.keys() & dead.keys(), "a job is both live and dead"
    twice = {job_id: n for job_id, n in load.completed.items() if n > 1}
    assert not twice, f"jobs completed more than once: {twice}"

    # I4: no job handed out more than maxAttempts times, and no attempt handed out twice.
    for job_id, attempts in load.claims.items():
        assert len(attempts) <= MAX_ATTEMPTS, f"job {job_id} handed out {attempts}"
        assert len(set(attempts)) == len(attempts), f"job {job_id} attempts repeated {attempts}"
        assert max(attempts) <= MAX_ATTEMPTS, f"job {job_id} attempts {attempts}"

    # One job per idempotency key.
    job_of_key = {load.keys_of_job[j]: j for j in load.keys_of_job}
    assert len(job_of_key) == len(load.keys_of_job), "an idempotency key made two jobs"
    assert len(set(load.acked.values())) == len(load.acked), "two keys answered one job"

    # I1: every acknowledged submit is completed once, still queued, or dead after
    # exactly maxAttempts claims. A complete that got no answer may have landed: the job
    # is then gone, and the store's completedTotal counts it.
    missing = []
    for key, job_id in load.acked.items():
        if load.completed[job_id] == 1 or job_id in live:
            continue
        if job_id in dead and dead[job_id]["attempts"] == MAX_ATTEMPTS:
            continue
        missing.append((key, job_id, load.claims.get(job_id)))
    lost = [m for m in missing if m[1] not in load.uncertain]
    assert not lost, f"{len(lost)} acknowledged submits lost, e.g. {lost[:5]}"
    silent = doc["completedTotal"] - sum(load.completed.values())
    assert len(missing) <= silent <= len(load.uncertain), (
        f"completedTotal {doc['completedTotal']}: {silent} completions without an answer, "
        f"but {len(missing)} jobs missing and {len(load.uncertain)} completes unanswered"
    )


def check_leader_history(load: Load, old_id: str, new_id: str) -> None:
    """Epochs never go back, and once the new leader is seen the old one never writes."""
    epochs = [epoch for _, epoch in load.seen_leaders]
    assert epochs == sorted(epochs), f"epoch went back: {load.seen_leaders}"
    ids = [broker_id for broker_id, _ in load.seen_leaders]
    assert new_id in ids, f"the new leader never appeared: {load.seen_leaders}"
    assert old_id not in ids[ids.index(new_id) :], f"old leader wrote again: {load.seen_leaders}"


# -- the scenarios --------------------------------------------------------------------------


def file_lock_is_free(store_dir: Path) -> bool:
    """Whether no process holds the file store's lock, shared or exclusive (a paused
    reader would hold up writers, a paused writer everyone)."""
    lock = store_dir / ".versions" / f"{STATE_KEY}.lock"
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


async def pause(proc: subprocess.Popen[str], store_dir: Path | None) -> None:
    """SIGSTOP the leader, but not while it holds the file store's lock: a writer paused
    inside the lock would stop every other process too (the file store is for one machine
    and relies on live processes), which is not the split brain this test is about."""
    for _ in range(50):
        proc.send_signal(signal.SIGSTOP)
        if store_dir is None or file_lock_is_free(store_dir):
            return
        proc.send_signal(signal.SIGCONT)
        await asyncio.sleep(0.01)
    pytest.fail("the leader always held the file store's lock")


async def resume_and_step_down(
    old: BrokerProcess, new: BrokerProcess, epoch: int, http: httpx.AsyncClient
) -> None:
    """F07: the paused leader resumes, its first write fails, it names the new leader."""
    old.proc.send_signal(signal.SIGCONT)
    new_address = new.url.removeprefix("http://")

    async def steps_down() -> bool:
        ready = await old.readiness(http)
        # Until its first write after the pause fails, the old leader answers 503 without a
        # leader (its last write is older than the leader timeout); then it names the new
        # leader, and once it has read the store as a standby, the new epoch too.
        if ready is None or ready[0] != 503:
            return False
        body = ready[1]
        assert body["_tag"] == "BrokerLeadershipError"
        return body.get("leader") == new_address and body.get("epoch") == epoch

    await until(steps_down, SETTLE_S, "the old leader to name the new one")


async def clean_exit(old: BrokerProcess, new: BrokerProcess, takeover_s: float) -> None:
    """F06 b: the old leader exits 0 and the standby took over without waiting."""
    await until(lambda: old.proc.poll() is not None, SETTLE_S, "the old leader to exit", 0.02)
    assert old.proc.returncode == 0, old.log()
    assert takeover_s < LEADER_TIMEOUT_S, "the standby waited for the leader timeout"
    assert "no broker leads" in new.log()


async def make_leader_die(scenario: str, old: BrokerProcess, store_dir: Path | None) -> float:
    """kill -9, SIGSTOP or SIGTERM the leader; returns the wall-clock time of its death."""
    died_at = time.time()
    if scenario == "kill":
        old.proc.send_signal(signal.SIGKILL)
    elif scenario == "pause":
        await pause(old.proc, store_dir)
    else:
        old.proc.send_signal(signal.SIGTERM)
    return died_at


async def run_failover(
    scenario: str,
    procs: Processes,
    storage_env: dict[str, str],
    storage: Storage,
    store_dir: Path | None = None,
) -> None:
    """Run one scenario under load, then check the invariants and the leader history."""
    began = time.monotonic()
    phases: dict[str, float] = {}

    def phase(name: str) -> None:
        phases[name] = round(time.monotonic() - began, 2)

    async with httpx.AsyncClient() as http:
        old, new = await start_pair(procs, broker_env(storage_env), http)
        old_facts = await old.leading(http)
        assert old_facts is not None
        phase("started")
        load = Load(StoreDiscovery(storage, min_interval_s=0.1), old.url, storage)
        async with running(load):
            await until(lambda: len(load.completed) >= 20, SETTLE_S, "work before the failure")
            phase("loaded")

            died_at = await make_leader_die(scenario, old, store_dir)
            facts = await until(
                lambda: new.leading(http), TAKEOVER_BUDGET_S + 10, "the standby to lead", 0.02
            )
            takeover_s = (facts["takeoverAt"] - died_at * 1000) / 1000
            phase("took over")
            print(f"\n[{scenario}] takeover {takeover_s:.3f} s after the leader's death")
            assert facts["epoch"] == old_facts["epoch"] + 1
            assert takeover_s <= TAKEOVER_BUDGET_S

            acked, done = len(load.acked), len(load.completed)
            await until(lambda: len(load.acked) >= acked + 10, SETTLE_S, "the new leader's acks")
            if scenario == "pause":
                await resume_and_step_down(old, new, facts["epoch"], http)
            elif scenario == "term":
                await clean_exit(old, new, takeover_s)
            await until(lambda: len(load.completed) >= done + 10, SETTLE_S, "work after it")
            phase("worked on")
            await load.finish()
            phase("drained")

    doc = await read_document(storage)
    assert doc["brokerId"] == facts["brokerId"]
    check_invariants(load, doc)
    check_leader_history(load, old_facts["brokerId"], facts["brokerId"])
    if scenario == "pause":
        old_log = old.log()
        assert old_log.count(" leads at ") == 1, old_log  # never registered itself again
        assert "stepping down" in old_log, old_log
        assert new.proc.poll() is None and old.proc.poll() is None  # I3: both still run
    print(
        f"[{scenario}] acked {len(load.acked)} submits ({load.duplicates} answered as "
        f"duplicates after a retry), completed {len(load.completed)} "
        f"(+{len(load.uncertain)} completes unanswered), submit errors "
        f"{dict(load.submit_errors)}, leaders seen {load.seen_leaders}, phases {phases}"
    )


SCENARIOS = ["kill", "pause", "term"]


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_failover_on_the_file_store(scenario: str, procs: Processes, tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    storage = FileStorage(store_dir)
    await run_failover(scenario, procs, {"STORAGE_URL": f"file://{store_dir}"}, storage, store_dir)


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_failover_on_s3(
    scenario: str,
    procs: Processes,
    moto_s3: MotoS3Server,
    s3_bucket: str,
    s3_storage_factory: S3Factory,
) -> None:
    env = {
        "STORAGE_URL": f"s3://{s3_bucket}/failover",
        "S3_ENDPOINT_URL": moto_s3.url,
        "S3_REGION": MOTO_REGION,
        "AWS_ACCESS_KEY_ID": MOTO_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": MOTO_SECRET,
    }
    await run_failover(scenario, procs, env, s3_storage_factory("failover"))
