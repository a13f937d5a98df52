"""Migration-stream TLS and QEMU without root: the pure parts (QMP arguments, argv, credentials
files, the user choice)."""

from __future__ import annotations

import contextlib
import os
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from vmferry.agent.qemu_user import (
    QemuArea,
    QemuUser,
    can_use_userfaultfd,
    resolve_qemu_user,
)
from vmferry.agent.server import options_from_json
from vmferry.controller.migrate import MigrationRequest
from vmferry.core.errors import ConfigError
from vmferry.core.model import MigrationOptions, VmSpec
from vmferry.core.workload import parse_workload
from vmferry.lab.pki import issue_qemu_creds, make_ca
from vmferry.qemu.argv import (
    SANDBOX_OPTION,
    SANDBOX_OPTION_DROPPING_ROOT,
    BootFiles,
    RuntimePaths,
    build_argv,
)
from vmferry.qemu.tls import CREDS_FILES, check_creds_dir, migration_tls_parameters, tls_hostname


@pytest.mark.parametrize(
    ("uri", "host"),
    [
        ("tcp:127.0.0.1:4444", "127.0.0.1"),
        ("tcp:10.77.0.2:1", "10.77.0.2"),
        ("tcp:host-2.example:49152", "host-2.example"),
        ("tcp:[::1]:4444", "::1"),
    ],
)
def test_tls_hostname_is_the_uri_host(uri: str, host: str) -> None:
    assert tls_hostname(uri) == host


@pytest.mark.parametrize("uri", ["unix:/tmp/x", "tcp:", "tcp:1.2.3.4", "tcp::80", "tcp:h:port"])
def test_tls_hostname_refuses_other_uris(uri: str) -> None:
    with pytest.raises(ConfigError):
        tls_hostname(uri)


def test_tls_parameters_are_always_explicit() -> None:
    # A QEMU that arrived over TLS keeps its tls-creds: a plain migration must clear them.
    assert migration_tls_parameters(None, None) == {"tls-creds": "", "tls-hostname": ""}
    assert migration_tls_parameters("c", "10.0.0.2") == {
        "tls-creds": "c",
        "tls-hostname": "10.0.0.2",
    }


def test_options_carry_tls_over_the_wire() -> None:
    assert options_from_json({"tls": True}).tls is True
    assert options_from_json({}).tls is False
    with pytest.raises(ConfigError, match="tls"):
        options_from_json({"tls": "yes"})
    request = MigrationRequest("vm1", "host-2", strategy="multifd", tls=True)
    assert request.resolve()[1] == MigrationOptions(
        downtime_limit_ms=request.resolve()[1].downtime_limit_ms,
        mechanism="multifd",
        tls=True,
        hold=True,  # held for the default handoff comparison (--verify sample)
    )


def test_no_plan_needs_an_explicit_strategy() -> None:
    with pytest.raises(ConfigError, match="--no-plan"):
        MigrationRequest("vm1", "host-2", plan=False).resolve()
    MigrationRequest("vm1", "host-2", strategy="postcopy", plan=False).resolve()


def _argv(run_as: str | None) -> list[str]:
    spec = VmSpec.build("vm1", memory="256M", workload=parse_workload("idle"))
    boot = BootFiles(Path("/img/vmlinuz"), Path("/img/initrd"))
    return build_argv("qemu", spec, boot, RuntimePaths(Path("/run/a")), run_as=run_as)


def test_dropping_root_relaxes_only_elevateprivileges() -> None:
    plain, dropping = _argv(None), _argv("vmferry-qemu")
    assert "-run-with" not in plain
    assert dropping[dropping.index("-run-with") + 1] == "user=vmferry-qemu"
    assert plain[plain.index("-sandbox") + 1] == SANDBOX_OPTION
    assert dropping[dropping.index("-sandbox") + 1] == SANDBOX_OPTION_DROPPING_ROOT
    strict = dict(kv.split("=") for kv in SANDBOX_OPTION.split(",")[1:])
    relaxed = dict(kv.split("=") for kv in SANDBOX_OPTION_DROPPING_ROOT.split(",")[1:])
    assert {k for k in strict if strict[k] != relaxed[k]} == {"elevateprivileges"}


@pytest.mark.parametrize("name", ["", "a,b", "user=x"])
def test_bad_qemu_user_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigError):
        _argv(name)


def test_qemu_user_choice() -> None:
    assert resolve_qemu_user("none") is None
    with pytest.raises(ConfigError, match="no user"):
        resolve_qemu_user("no-such-user-vmferry")


def _handshake(directory: Path, hostname: str) -> None:
    """Mutual TLS between QEMU's server and client credentials, in memory."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(directory / "server-cert.pem", directory / "server-key.pem")
    server.load_verify_locations(directory / "ca-cert.pem")
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_cert_chain(directory / "client-cert.pem", directory / "client-key.pem")
    client.load_verify_locations(directory / "ca-cert.pem")
    bios = [ssl.MemoryBIO() for _ in range(4)]
    s = server.wrap_bio(bios[0], bios[1], server_side=True)
    c = client.wrap_bio(bios[2], bios[3], server_hostname=hostname)
    for _ in range(10):
        for end in (c, s):
            with contextlib.suppress(ssl.SSLWantReadError):
                end.do_handshake()
        bios[0].write(bios[3].read())
        bios[2].write(bios[1].read())
    assert c.getpeercert() is not None
    assert s.getpeercert() is not None


def test_qemu_credentials_as_qemu_names_them_and_mutual_tls(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "tls")
    directory = issue_qemu_creds(ca, "host-2", "127.0.0.1", tmp_path / "qemu-tls")
    assert sorted(p.name for p in directory.iterdir()) == sorted(CREDS_FILES)
    assert check_creds_dir(directory) == directory.absolute()
    assert directory.stat().st_mode & 0o777 == 0o700
    for key in ("server-key.pem", "client-key.pem"):
        assert (directory / key).stat().st_mode & 0o777 == 0o600
    for role, usage in (
        ("server", ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        cert = x509.load_pem_x509_certificate((directory / f"{role}-cert.pem").read_bytes())
        assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [usage]
    _handshake(directory, "127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(directory, "127.0.0.2")  # the SAN names the migration address only


def test_group_readable_credentials_and_staging(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "tls")
    group = os.getgid()
    directory = issue_qemu_creds(ca, "h", "10.0.0.1", tmp_path / "q", group=group)
    assert directory.stat().st_mode & 0o777 == 0o750
    key = directory / "server-key.pem"
    assert key.stat().st_mode & 0o777 == 0o640
    assert key.stat().st_gid == group

    area = QemuArea(tmp_path / "state", QemuUser("q", os.getuid(), group))
    area.root = tmp_path / "area"
    area.root.mkdir()
    staged = area.stage_tls(directory)
    assert staged == area.root / "tls"
    assert staged.stat().st_mode & 0o777 == 0o750
    for name in CREDS_FILES:
        assert (staged / name).read_bytes() == (directory / name).read_bytes()
        assert (staged / name).stat().st_mode & 0o777 == 0o640
    inode = (staged / "ca-cert.pem").stat().st_ino
    assert area.stage_tls(directory) == staged
    assert (staged / "ca-cert.pem").stat().st_ino == inode  # unchanged: not rewritten
    (directory / "client-key.pem").unlink()
    with pytest.raises(ConfigError, match=r"client-key\.pem"):
        area.stage_tls(directory)


def test_userfaultfd_access_by_sysctl_owner_or_group(tmp_path: Path) -> None:
    user = QemuUser("q", os.getuid() + 1, os.getgid())
    device, sysctl = tmp_path / "userfaultfd", tmp_path / "unprivileged_userfaultfd"
    sysctl.write_text("0\n")
    assert not can_use_userfaultfd(user, device, sysctl)  # no device at all
    device.touch()
    for mode, expected in ((0o600, False), (0o660, True), (0o640, False), (0o606, False)):
        device.chmod(mode)
        assert can_use_userfaultfd(user, device, sysctl) is expected, oct(mode)
    device.chmod(0o600)
    sysctl.write_text("1\n")
    assert can_use_userfaultfd(user, device, sysctl)
