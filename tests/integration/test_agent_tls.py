"""The agent API over TLS: a lab's agents answer only HTTPS clients that trust the lab's CA and
hold the cluster token; everything else is refused before any route runs."""

from __future__ import annotations

import shutil
import ssl
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from vmferry.agent.client import AgentClient, AgentUnreachable
from vmferry.agent.tls import client_context
from vmferry.cli.main import main
from vmferry.controller.inventory import Inventory
from vmferry.core.errors import ConfigError
from vmferry.lab.cluster import lab_down, lab_up
from vmferry.lab.pki import make_ca

GIB = 1024**3

# Every kind of route: reads, writes, a VM route, and a path that does not exist.
ROUTES = [
    ("GET", "/v1/host"),
    ("GET", "/v1/vms"),
    ("POST", "/v1/vms"),
    ("DELETE", "/v1/vms/vm1"),
    ("POST", "/v1/incoming"),
    ("POST", "/v1/bandwidth/sinks"),
    ("GET", "/v1/nowhere"),
]


@pytest_asyncio.fixture
async def tls_lab() -> AsyncIterator[Path]:
    """A lab directory taken down on the test's own loop (its agents' transports close there)."""
    directory = Path(tempfile.mkdtemp(prefix="vmf-"))
    try:
        yield directory
    finally:
        await lab_down(directory)
        shutil.rmtree(directory, ignore_errors=True)


async def _status(url: str, method: str, path: str, tls: ssl.SSLContext, token: str | None) -> int:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as session,
        session.request(method, url + path, headers=headers, json={"spec": {}}) as response,
    ):
        body = await response.json()
        assert isinstance(body, dict)
        return response.status


@pytest.mark.qemu
@pytest.mark.usefixtures("guest_image")
@pytest.mark.asyncio
async def test_agents_refuse_plain_http_unknown_ca_and_bad_tokens(
    tls_lab: Path, tmp_path: Path
) -> None:
    lab_dir = tls_lab
    inventory = await lab_up(1, lab_dir=lab_dir, memory_per_host_bytes=GIB)
    assert Inventory.load(lab_dir).ca_file == lab_dir / "tls" / "ca.pem"
    host = inventory.hosts[0]
    assert host.url.startswith("https://127.0.0.1:")
    assert inventory.ca_file is not None
    trusted = client_context(inventory.ca_file)

    # The right CA and token: served.
    async with AgentClient(host.name, host.url, inventory.token, inventory.ca_file) as client:
        assert (await client.host_info()).host == host.name

    # Plain HTTP to the HTTPS port: no answer at all, not even an error page.
    plain = "http://" + host.url.removeprefix("https://")
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.get(
                f"{plain}/v1/host", headers={"Authorization": f"Bearer {inventory.token}"}
            ) as response:
                await response.read()

    # A CA that did not sign the agent's certificate: the client refuses the agent.
    other_ca = make_ca(tmp_path / "other")
    async with AgentClient(host.name, host.url, inventory.token, other_ca.cert_file) as client:
        with pytest.raises(AgentUnreachable, match="certificate verify failed"):
            await client.host_info()
    # No CA at all for an https:// agent: refused before connecting.
    with pytest.raises(ConfigError, match="CA"):
        AgentClient(host.name, host.url, inventory.token, None)

    # Over TLS but without the token, or with a wrong one: 401 on every route.
    for method, path in ROUTES:
        for token in (None, "", "x" * 43, inventory.token + "x"):
            assert await _status(host.url, method, path, trusted, token) == 401, (path, token)
    # The right token reaches the routes (which then judge the request itself).
    assert await _status(host.url, "GET", "/v1/host", trusted, inventory.token) == 200
    assert await _status(host.url, "GET", "/v1/nowhere", trusted, inventory.token) == 404


def test_agent_needs_tls_or_an_explicit_insecure_choice(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t" * 32 + "\n")
    base = ["agent", "--host", "h1", "--state-dir", str(tmp_path / "s"), "--memory", "1G"]
    base += ["--token-file", str(token)]
    assert main(base) == 2  # neither --tls-cert/--tls-key nor --insecure-http
    assert main([*base, "--tls-cert", str(tmp_path / "c.pem")]) == 2  # no key
    assert main([*base, "--insecure-http", "--tls-cert", "c", "--tls-key", "k"]) == 2
    missing = ["--tls-cert", str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "k.pem")]
    assert main([*base, *missing]) == 2  # unreadable certificate
    assert not (tmp_path / "s").exists()
