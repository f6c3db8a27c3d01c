"""``osqueue status`` against a leader, a standby and nothing, and ``--discover``: the CLI
finding the leader in the store, as a user runs it."""

from __future__ import annotations

import json

import httpx

from tests.acceptance.conftest import Processes, free_port, healthy, wait_for

TIMINGS = {
    "BROKER_HEARTBEAT_INTERVAL_MS": "300",
    "BROKER_HEARTBEAT_TIMEOUT_MS": "3000",
}


def standby_names(url: str, leader: str) -> bool:
    try:
        body = httpx.get(f"{url}/readyz", timeout=1).json()
    except (httpx.HTTPError, ValueError):
        return False
    return bool(body.get("leader") == leader)


def test_status_tells_leader_from_standby(procs: Processes) -> None:
    leader_port, standby_port = free_port(), free_port()
    leader = f"http://127.0.0.1:{leader_port}"
    standby = f"http://127.0.0.1:{standby_port}"
    procs.start("broker", "--host", "127.0.0.1", "--port", str(leader_port), env=TIMINGS)
    wait_for(lambda: healthy(leader), 20, "the first broker to lead")
    procs.start(
        "broker", "--host", "127.0.0.1", "--port", str(standby_port), "--standby", env=TIMINGS
    )
    leader_address = leader.removeprefix("http://")
    wait_for(lambda: standby_names(standby, leader_address), 20, "the standby to look")

    led = procs.run("status", "--url", leader, "--json")
    assert led.returncode == 0, led.stderr
    facts = json.loads(led.stdout)
    assert facts["broker"]["role"] == "leader"
    assert facts["broker"]["leader"] == leader_address
    assert facts["broker"]["epoch"] == 1
    assert 0 <= facts["broker"]["heartbeatAgeMs"] < 3000
    assert facts["store"]["leader"] == leader_address  # STORAGE_URL is set for every process
    assert facts["store"]["brokerId"] == facts["broker"]["brokerId"]

    waiting = procs.run("status", "--url", standby, "--json")
    assert waiting.returncode == 3
    view = json.loads(waiting.stdout)["broker"]
    assert view["role"] == "standby"
    assert view["leader"] == leader_address
    assert view["leaderBrokerId"] == facts["broker"]["brokerId"]
    assert view["epoch"] == 1

    table = procs.run("status", "--url", standby)
    assert table.returncode == 3
    assert "standby" in table.stdout


def test_status_of_no_broker_exits_3(procs: Processes) -> None:
    result = procs.run("status", "--url", f"http://127.0.0.1:{free_port()}", "--json")
    assert result.returncode == 3
    assert json.loads(result.stdout)["broker"]["role"] == "unreachable"


def test_submit_discovers_the_leader_from_the_store(procs: Processes) -> None:
    nobody = procs.run("submit", '{"n": 1}', "--discover")
    assert nobody.returncode == 3
    assert "DiscoveryError" in nobody.stderr

    port = free_port()
    procs.start("broker", "--host", "127.0.0.1", "--port", str(port), env=TIMINGS)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: healthy(url), 20, "the broker to lead")
    # --url points nowhere: only the store can have named the broker.
    dead_end = f"http://127.0.0.1:{free_port()}"
    found = procs.run("submit", '{"n": 1}', "--discover", "--url", dead_end)
    assert found.returncode == 0, found.stderr
    job_id = found.stdout.strip()
    assert httpx.get(f"{url}/v1/jobs/{job_id}", timeout=5).status_code == 200
