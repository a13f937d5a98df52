"""Fuzz the agent's HTTP API with Hypothesis: a real agent app (aiohttp test server, real QEMU
binary found on the host, no guest ever booted) gets random JSON bodies, types, names and query
strings on every route. Every answer must be a 4xx with a JSON error body — never a 5xx or a
traceback — and the agent's state (its VMs, the files in its state directory) must not change.

The read-only routes (``GET /host``, ``GET /vms``) answer 200 to any query string; ``POST
/bandwidth/sinks`` takes no input and opens a sink by design, so it is not fuzzed.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmferry.agent.host import AgentConfig, HostAgent
from vmferry.agent.server import build_app
from vmferry.qemu.argv import BootFiles
from vmferry.qemu.binary import find_qemu

TOKEN = "fuzz-token-0123456789abcdef"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}

# Every route with input, as (method, path template); {name} and {port} are fuzzed.
ROUTES = [
    ("POST", "/v1/vms"),
    ("GET", "/v1/vms/{name}"),
    ("DELETE", "/v1/vms/{name}"),
    ("GET", "/v1/vms/{name}/runstate"),
    ("POST", "/v1/vms/{name}/verify"),
    ("POST", "/v1/incoming"),
    ("POST", "/v1/vms/{name}/finish"),
    ("POST", "/v1/vms/{name}/abort"),
    ("POST", "/v1/vms/{name}/release-disk"),
    ("POST", "/v1/vms/{name}/migrate"),
    ("POST", "/v1/vms/{name}/switchover"),
    ("POST", "/v1/vms/{name}/postcopy"),
    ("POST", "/v1/vms/{name}/measure"),
    ("GET", "/v1/bandwidth/sinks/{port}"),
    ("POST", "/v1/bandwidth/probe"),
    ("GET", "/v1/vms/{name}/migration"),
    ("POST", "/v1/vms/{name}/cancel"),
    ("POST", "/v1/vms/{name}/handoff"),
    ("POST", "/v1/vms/{name}/resume-source"),
    ("POST", "/v1/vms/{name}/forget"),
    ("PUT", "/v1/vms"),
    ("GET", "/v1/{name}"),
]
READ_ONLY = [("GET", "/v1/host"), ("GET", "/v1/vms")]

# Keys the routes read, so that bodies reach past "unknown key" into the validators.
_KEYS = ["spec", "options", "uri", "nbd", "address", "port", "duration_ms", "name"]
_KEYS += ["memory_bytes", "vcpus", "workload", "disk", "max_bandwidth_bps", "downtime_limit_ms"]
_KEYS += ["timeout_s", "mechanism", "postcopy_ready", "multifd_channels", "xbzrle_cache_bytes"]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)  # JSON has no NaN; json.dumps would write a non-standard token
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=12,
)
bodies = (
    json_values.map(lambda v: json.dumps(v).encode())
    | st.dictionaries(st.sampled_from(_KEYS), json_values, max_size=5).map(
        lambda v: json.dumps(v).encode()
    )
    | st.binary(max_size=64)  # not JSON at all, or not UTF-8
    | st.just(b"")
)
names = st.text(min_size=1, max_size=40) | st.sampled_from(["vm1", "..", "a" * 300, "%00"])
ports = st.integers(min_value=-1, max_value=70000).map(str) | st.text(min_size=1, max_size=8)
queries = st.dictionaries(
    st.sampled_from(["since", "wait", "x"]) | st.text(max_size=5),
    st.sampled_from(["nan", "inf", "-inf", "-1", "1e309", "0x10", "", "1"]) | st.text(max_size=8),
    max_size=3,
)


@dataclass
class Harness:
    runner: asyncio.Runner
    client: TestClient[aiohttp.web.Request, aiohttp.web.Application]
    agent: HostAgent
    state_dir: Path

    def request(
        self, method: str, path: str, body: bytes, query: dict[str, str]
    ) -> tuple[int, object]:
        async def send() -> tuple[int, object]:
            async with self.client.request(
                method, path, data=body, params=query, headers=HEADERS
            ) as response:
                text = await response.text()
                return response.status, json.loads(text) if text else None

        return self.runner.run(send())

    def files(self) -> list[str]:
        return sorted(
            str(Path(root, f).relative_to(self.state_dir))
            for root, dirs, files in os.walk(self.state_dir)
            for f in dirs + files
        )


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    with tempfile.TemporaryDirectory(prefix="vmf-fuzz-") as tmp, asyncio.Runner() as runner:
        state_dir = Path(tmp) / "state"
        (state_dir / "vms").mkdir(parents=True)
        qemu = runner.run(find_qemu())
        # Boot files that do not exist: were a request ever to get as far as starting a guest,
        # QEMU would fail (a 5xx the test reports) instead of booting one.
        boot = BootFiles(Path(tmp) / "no-kernel", Path(tmp) / "no-initrd")
        config = AgentConfig("fuzz-host", state_dir, 4 << 30, "127.0.0.1")
        agent = HostAgent(config, qemu, boot, "tcg")

        async def start() -> TestClient[aiohttp.web.Request, aiohttp.web.Application]:
            client = TestClient(TestServer(build_app(agent, TOKEN)))
            await client.start_server()
            return client

        client = runner.run(start())
        try:
            yield Harness(runner, client, agent, state_dir)
        finally:
            runner.run(client.close())
            runner.run(agent.close())


def _check(harness: Harness, status: int, body: object, what: str) -> None:
    assert 400 <= status < 500, f"{what}: HTTP {status} {body}"
    assert isinstance(body, dict), f"{what}: {body!r}"
    error = body.get("error")
    assert isinstance(error, dict), f"{what}: {body!r}"
    assert isinstance(error.get("message"), str)
    assert "Traceback" not in error["message"], f"{what}: {error}"


_FUZZ = settings(
    max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_FUZZ
@given(
    route=st.sampled_from(ROUTES),
    name=names,
    port=ports,
    body=bodies,
    query=queries,
    method_override=st.none() | st.sampled_from(["PATCH", "PUT"]),  # no route has them
)
def test_malformed_requests_get_a_4xx_json_error_and_change_nothing(
    harness: Harness,
    route: tuple[str, str],
    name: str,
    port: str,
    body: bytes,
    query: dict[str, str],
    method_override: str | None,
) -> None:
    files_before = harness.files()
    method, template = route
    method = method_override or method
    path = template.format(name=quote(name, safe=""), port=quote(port, safe=""))
    status, answer = harness.request(method, path, body, query)
    _check(harness, status, answer, f"{method} {path} {body[:80]!r} {query}")
    assert harness.agent.list_vms() == []
    assert harness.files() == files_before


@settings(max_examples=60, deadline=None)
@given(route=st.sampled_from(READ_ONLY), query=queries, body=bodies)
def test_read_only_routes_ignore_junk(
    harness: Harness, route: tuple[str, str], query: dict[str, str], body: bytes
) -> None:
    status, answer = harness.request(route[0], route[1], body, query)
    assert status == 200, answer
    assert isinstance(answer, dict | list)


@pytest.mark.parametrize("wait", ["nan", "inf", "-inf", "1e309", "-5"])
def test_a_real_sink_refuses_non_finite_waits(harness: Harness, wait: str) -> None:
    status, answer = harness.request("POST", "/v1/bandwidth/sinks", b"", {})
    assert status == 201, answer
    assert isinstance(answer, dict)
    port = answer["port"]
    status, answer = harness.request("GET", f"/v1/bandwidth/sinks/{port}", b"", {"wait": wait})
    _check(harness, status, answer, f"sink wait={wait}")


@pytest.mark.parametrize("size", [64 * 1024 + 1, 512 * 1024])
def test_oversized_bodies_are_refused(harness: Harness, size: int) -> None:
    body = json.dumps({"spec": "x" * size}).encode()
    status, answer = harness.request("POST", "/v1/vms", body, {})
    _check(harness, status, answer, f"{size}-byte body")
    assert status in (400, 413)
