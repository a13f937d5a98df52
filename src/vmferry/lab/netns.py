"""Lab hosts as network namespaces on one machine, joined by a bridge over shaped veth links.

Host ``i`` lives in netns ``vmf-host-i`` with ``eth0`` at ``<subnet>.i/24``; the peer end
``vmf-h<i>`` sits in the root namespace, enslaved to bridge ``vmf-br0`` (``<subnet>.254``), so
hosts reach each other and the controller reaches every host. With a link rate, ``tc tbf``
shapes both directions of each host's link: the root-side veth's egress is traffic *into* the
host, the namespace-side ``eth0``'s egress is traffic *out of* it.

Everything is named with the ``vmf-`` prefix so :func:`teardown` can find and remove it after a
crash, without any record of what was made.

Example:
    >>> network = await setup(2, link_mbps=200)                    # doctest: +SKIP
    >>> network.hosts[0].address
    '10.211.77.1'
    >>> await teardown()                                           # doctest: +SKIP
    2
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
from dataclasses import dataclass

from vmferry.core.errors import ConfigError, FerryError

__all__ = [
    "BRIDGE",
    "NETNS_PREFIX",
    "VETH_PREFIX",
    "LabNetwork",
    "NetnsHost",
    "NetworkCommandError",
    "choose_subnet",
    "existing_namespaces",
    "namespaces_in_use",
    "network_owner",
    "require_root",
    "set_link",
    "set_link_rate",
    "setup",
    "tbf_burst_bytes",
    "teardown",
]

logger = logging.getLogger(__name__)

NETNS_PREFIX = "vmf-host-"
VETH_PREFIX = "vmf-h"
BRIDGE = "vmf-br0"
BRIDGE_HOST_OCTET = 254
PREFIX_LEN = 24
PREFERRED_SUBNET = "10.211.77"
TBF_LATENCY = "50ms"
# At least a few full frames; ``rate / 250`` bytes covers one 4 ms timer tick (HZ=250).
TBF_MIN_BURST_BYTES = 4096
# The largest GSO packet a shaped link's ends hand to tbf. TCP keeps at least two packets of each
# flow queued at the sender (TCP small queues); with veth's default 64 KiB packets that is a
# standing ~128 KiB per flow in front of tbf, 5 ms at 200 Mbit/s, which a post-copy page request
# answered behind the bulk copy waits out on every fault (bench/stalls.py: 5.7 ms per fault and a
# 2 s guest stall at 200 Mbit/s; with 16 KiB, 2.0 ms and 0.8 s). On a real path that queue sits
# at a 10+ Gbit/s NIC and drains in microseconds; it is where the lab puts its shaper that makes
# it count, so shaped links send smaller packets. Unshaped links keep the default.
SHAPED_GSO_MAX_BYTES = 16384
DEFAULT_GSO_MAX_BYTES = 65536

_COMMAND_TIMEOUT_S = 10.0


class NetworkCommandError(FerryError):
    """An ``ip`` or ``tc`` command failed.

    Attributes:
        argv: the command line.
        returncode: its exit status (None if it timed out or could not start).
        stderr: what it wrote to stderr.
    """

    def __init__(self, argv: list[str], returncode: int | None, stderr: str) -> None:
        status = "timed out" if returncode is None else f"exit status {returncode}"
        detail = f": {stderr.strip()}" if stderr.strip() else ""
        super().__init__(f"`{' '.join(argv)}` failed ({status}){detail}")
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr


@dataclass(frozen=True, slots=True)
class NetnsHost:
    """One host's namespace and link."""

    name: str  # host-i
    netns: str  # vmf-host-i
    veth: str  # root-side end, vmf-h<i>
    address: str  # eth0's address inside the namespace


@dataclass(frozen=True, slots=True)
class LabNetwork:
    """What :func:`setup` built."""

    subnet: str  # first three octets, e.g. "10.211.77"
    bridge_address: str
    hosts: tuple[NetnsHost, ...]
    link_mbps: int | None


def require_root() -> None:
    """Refuse namespace work when not root.

    Raises:
        ConfigError: the effective user is not root.
    """
    if os.geteuid() != 0:
        raise ConfigError(
            "--netns needs root (network namespaces, veth links and tc); "
            "run as root or drop --netns for a loopback lab"
        )


def tbf_burst_bytes(link_mbps: int) -> int:
    """The tbf bucket size for a rate: one timer tick's worth of bytes, at least a few frames."""
    return tbf_burst_bytes_kbit(link_mbps * 1000)


def tbf_burst_bytes_kbit(rate_kbit: int) -> int:
    """:func:`tbf_burst_bytes` for a rate in kbit/s (throttled links go below 1 Mbit/s)."""
    return max(TBF_MIN_BURST_BYTES, rate_kbit * 1000 // 8 // 250)


def _tbf(rate_kbit: int) -> list[str]:
    return [
        "root",
        "tbf",
        "rate",
        f"{rate_kbit}kbit",
        "burst",
        str(tbf_burst_bytes_kbit(rate_kbit)),
        "latency",
        TBF_LATENCY,
    ]


def host_for(index: int, subnet: str) -> NetnsHost:
    """Names and address of host ``index`` (1-based)."""
    return NetnsHost(
        name=f"host-{index}",
        netns=f"{NETNS_PREFIX}{index}",
        veth=f"{VETH_PREFIX}{index}",
        address=f"{subnet}.{index}",
    )


async def _run(argv: list[str], *, timeout_s: float = _COMMAND_TIMEOUT_S) -> str:
    """Run a command; return its stdout.

    Raises:
        NetworkCommandError: it failed, timed out or could not start.
    """
    logger.debug("run %s", argv)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as err:
        raise NetworkCommandError(argv, None, str(err)) from err
    try:
        async with asyncio.timeout(timeout_s):
            stdout, stderr = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise NetworkCommandError(argv, None, f"no answer within {timeout_s:g} s") from None
    if proc.returncode != 0:
        raise NetworkCommandError(argv, proc.returncode, stderr.decode(errors="replace"))
    return stdout.decode(errors="replace")


async def _run_json(argv: list[str]) -> list[dict[str, object]]:
    text = await _run(argv)
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except ValueError as err:
        raise NetworkCommandError(argv, 0, f"unparsable JSON output: {err}") from err
    if not isinstance(data, list):
        raise NetworkCommandError(argv, 0, "expected a JSON list")
    return [item for item in data if isinstance(item, dict)]


def existing_namespaces() -> list[str]:
    """Names of the lab's namespaces (``vmf-host-*``) that exist now. Works without root."""
    try:
        names = os.listdir("/run/netns")
    except FileNotFoundError:
        return []
    return sorted(name for name in names if name.startswith(NETNS_PREFIX))


async def namespaces_in_use() -> list[str]:
    """The lab namespaces that still hold processes (some lab is running in them).

    Raises:
        NetworkCommandError: ``ip netns pids`` failed (e.g. not root).
    """
    busy = []
    for name in existing_namespaces():
        if (await _run(["ip", "netns", "pids", name])).split():
            busy.append(name)
    return busy


async def _existing_links() -> list[str]:
    links = await _run_json(["ip", "-j", "link", "show"])
    names = [str(link.get("ifname", "")) for link in links]
    return [name for name in names if name == BRIDGE or name.startswith(VETH_PREFIX)]


async def _used_networks() -> list[ipaddress.IPv4Network]:
    used: list[ipaddress.IPv4Network] = []
    for link in await _run_json(["ip", "-j", "-4", "addr", "show"]):
        infos = link.get("addr_info")
        for info in infos if isinstance(infos, list) else []:
            if isinstance(info, dict) and info.get("family") == "inet":
                used.append(
                    ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False)
                )
    for route in await _run_json(["ip", "-j", "-4", "route", "show", "table", "all"]):
        dst = str(route.get("dst", ""))
        if dst in ("", "default"):
            continue
        try:
            used.append(ipaddress.IPv4Network(dst, strict=False))
        except ValueError:
            continue  # e.g. "broadcast" pseudo-entries
    return [net for net in used if net.prefixlen > 0]


async def choose_subnet() -> str:
    """The first ``10.211.x.0/24`` (preferring ``10.211.77``) no address or route overlaps.

    Returns:
        The subnet's first three octets, e.g. ``"10.211.77"``.

    Raises:
        ConfigError: every candidate is in use.
        NetworkCommandError: ``ip`` failed.
    """
    used = await _used_networks()
    candidates = [PREFERRED_SUBNET] + [f"10.211.{x}" for x in range(256) if x != 77]
    for subnet in candidates:
        net = ipaddress.IPv4Network(f"{subnet}.0/{PREFIX_LEN}")
        if not any(net.overlaps(other) for other in used):
            return subnet
    raise ConfigError("no free 10.211.x.0/24 subnet for the lab network")


async def network_owner() -> str | None:
    """The owner recorded on the bridge by :func:`setup` (a lab directory), if there is one.

    Raises:
        NetworkCommandError: ``ip`` failed.
    """
    for link in await _run_json(["ip", "-j", "link", "show"]):
        if link.get("ifname") == BRIDGE:
            alias = link.get("ifalias")
            return alias if isinstance(alias, str) and alias else None
    return None


async def setup(
    hosts: int, *, link_mbps: int | None = None, subnet: str | None = None, owner: str = ""
) -> LabNetwork:
    """Create the bridge and one namespace with a (shaped) veth link per host.

    Refuses to build over leftovers of an earlier lab; on failure removes what it made.

    Args:
        hosts: how many hosts (named host-1..host-N).
        link_mbps: shape each host's link to this rate in both directions; None = unshaped.
        subnet: the first three octets to use; None = :func:`choose_subnet`.
        owner: who owns the network (a lab directory), recorded as the bridge's alias so
            others can tell a live lab's network from an orphan (:func:`network_owner`).

    Returns:
        The network's names and addresses.

    Raises:
        ConfigError: not root, leftovers exist, or no free subnet.
        NetworkCommandError: an ``ip``/``tc`` command failed (everything made is removed).
    """
    require_root()
    leftovers = existing_namespaces() + await _existing_links()
    if leftovers:
        raise ConfigError(
            f"leftovers of an earlier lab network exist ({', '.join(leftovers)}): "
            "run `vmferry lab down` first"
        )
    subnet = subnet or await choose_subnet()
    network = LabNetwork(
        subnet=subnet,
        bridge_address=f"{subnet}.{BRIDGE_HOST_OCTET}",
        hosts=tuple(host_for(i, subnet) for i in range(1, hosts + 1)),
        link_mbps=link_mbps,
    )
    try:
        await _build(network, owner)
    except BaseException:
        await asyncio.shield(teardown())
        raise
    logger.info(
        "lab.network.up subnet=%s.0/%d hosts=%d link_mbps=%s",
        subnet,
        PREFIX_LEN,
        hosts,
        link_mbps,
    )
    return network


async def _build(network: LabNetwork, owner: str) -> None:
    await _run(["ip", "link", "add", BRIDGE, "type", "bridge"])
    if owner:
        await _run(["ip", "link", "set", BRIDGE, "alias", owner])
    await _run(["ip", "addr", "add", f"{network.bridge_address}/{PREFIX_LEN}", "dev", BRIDGE])
    await _run(["ip", "link", "set", BRIDGE, "up"])
    for host in network.hosts:
        ns_ip = ["ip", "-n", host.netns]
        await _run(["ip", "netns", "add", host.netns])
        await _run(
            [
                "ip",
                "link",
                "add",
                host.veth,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                host.netns,
            ]
        )
        await _run(["ip", "link", "set", host.veth, "master", BRIDGE])
        await _run(["ip", "link", "set", host.veth, "up"])
        await _run([*ns_ip, "link", "set", "lo", "up"])
        await _run([*ns_ip, "addr", "add", f"{host.address}/{PREFIX_LEN}", "dev", "eth0"])
        await _run([*ns_ip, "link", "set", "eth0", "up"])
        if network.link_mbps is not None:
            await _shape(host, network.link_mbps * 1000)


def _ends(host: NetnsHost) -> tuple[tuple[list[str], str], ...]:
    """Both ends of a host's link: (the ``ip``/``tc`` namespace arguments, the device)."""
    return ([], host.veth), (["-n", host.netns], "eth0")


async def _shape(host: NetnsHost, rate_kbit: int | None) -> None:
    """Shape both ends of ``host``'s link to ``rate_kbit`` (None: remove the shaping)."""
    gso_bytes = DEFAULT_GSO_MAX_BYTES if rate_kbit is None else SHAPED_GSO_MAX_BYTES
    for ns, dev in _ends(host):
        await _run(["ip", *ns, "link", "set", "dev", dev, "gso_max_size", str(gso_bytes)])
        if rate_kbit is not None:
            await _run(["tc", *ns, "qdisc", "replace", "dev", dev, *_tbf(rate_kbit)])
            continue
        try:
            await _run(["tc", *ns, "qdisc", "del", "dev", dev, "root"])
        except NetworkCommandError as err:
            # No root qdisc to remove (the link was never shaped) is what we wanted.
            if "No such file" not in err.stderr and "Cannot delete" not in err.stderr:
                raise


async def teardown() -> int:
    """Remove every ``vmf-host-*`` namespace, ``vmf-h*`` link and the ``vmf-br0`` bridge.

    Idempotent, and needs no record of what was made (works after a crash). Deleting a
    namespace also deletes its ``eth0`` and so the veth's root-side peer.

    Returns:
        How many namespaces were removed.

    Raises:
        ConfigError: something must be removed but we are not root.
        NetworkCommandError: a removal failed.
    """
    namespaces = existing_namespaces()
    if not namespaces and not await _existing_links():
        return 0
    require_root()
    for name in namespaces:
        await _run(["ip", "netns", "del", name])
    # Bridge last: veth peers vanish with their namespaces, strays are removed explicitly.
    for link in sorted(await _existing_links(), key=lambda name: name == BRIDGE):
        try:
            await _run(["ip", "link", "del", link])
        except NetworkCommandError as err:
            # Racing with the kernel removing a peer whose namespace just went is fine.
            if "Cannot find device" not in err.stderr:
                raise
    if namespaces:
        logger.info("lab.network.down namespaces=%d", len(namespaces))
    return len(namespaces)


def _lab_host(host: str | int) -> NetnsHost:
    """Raises: ConfigError (not root, malformed name, no such lab namespace)."""
    require_root()
    text = str(host).removeprefix("host-")
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"no lab host {host!r}: use host-N or N")
    target = host_for(int(text), subnet="")
    if target.netns not in existing_namespaces():
        raise ConfigError(f"{target.name} has no network namespace (is a --netns lab up?)")
    return target


async def set_link_rate(host: str | int, rate_kbit: int | None) -> NetnsHost:
    """Shape a lab host's link to ``rate_kbit`` in both directions (a degraded link, e.g. 8 kbit/s
    for a link that all but stops), or remove the shaping (``None``).

    To restore a lab made with ``--link-mbps``, pass that rate again (in kbit/s).

    Raises:
        ConfigError: not root, a malformed name, no such lab namespace, a rate below 1 kbit/s.
        NetworkCommandError: ``tc`` failed.
    """
    target = _lab_host(host)
    if rate_kbit is not None and (isinstance(rate_kbit, bool) or rate_kbit < 1):
        raise ConfigError(f"a link rate must be at least 1 kbit/s, not {rate_kbit}")
    await _shape(target, rate_kbit)
    if rate_kbit is None:
        logger.info("lab.link %s unshaped", target.name)
    else:
        logger.info("lab.link %s shaped to %d kbit/s", target.name, rate_kbit)
    return target


async def set_link(host: str | int, up: bool) -> NetnsHost:
    """Cut (``up=False``) or restore a lab host's link, as a network fault would: the
    root-side veth end goes down, so nothing crosses it either way (its tbf shaping stays).

    Args:
        host: ``host-N`` or its index N.
        up: restore (True) or cut (False).

    Returns:
        The host whose link changed.

    Raises:
        ConfigError: not root, a malformed name, or no such lab namespace.
        NetworkCommandError: ``ip`` failed.
    """
    target = _lab_host(host)
    await _run(["ip", "link", "set", target.veth, "up" if up else "down"])
    logger.info("lab.link %s %s", target.name, "up" if up else "down")
    return target
