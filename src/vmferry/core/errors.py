"""The one root of vmferry's errors, subclassed by what the caller can do about them."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "FerryError",
    "GuestAgentCommandError",
    "GuestAgentError",
    "GuestAgentTimeout",
    "GuestError",
    "MigrationFailed",
    "ProcessStartError",
    "QEMULaunchError",
    "QEMUNotFound",
    "QMPCommandError",
    "QMPConnectError",
    "QMPTimeout",
    "StateError",
]


class FerryError(Exception):
    """Root of every error vmferry raises on purpose."""


class ConfigError(FerryError):
    """Bad input from the user: a name, a size, a spec. Nothing was changed."""


class QEMUNotFound(ConfigError):
    """No usable ``qemu-system-x86_64`` (missing, or older than vmferry requires)."""


class StateError(FerryError):
    """An operation was asked of something in the wrong state.

    Attributes:
        state: the state it was in.
        required: the state(s) the operation needs.
    """

    def __init__(self, what: str, state: str | None = None, required: str | None = None) -> None:
        # With only ``what``, it is the whole message (e.g. rebuilt from an agent's reply).
        super().__init__(what if state is None else f"{what} is {state}, needs {required}")
        self.what = what
        self.state = state
        self.required = required


class ProcessStartError(FerryError):
    """A process we started did not come up (or died while we needed it).

    Attributes:
        exitcode: its exit status, None if it still ran.
        log_tail: the last lines of its log.
    """

    log_label = "its log ends"

    def __init__(self, message: str, exitcode: int | None, log_tail: str) -> None:
        super().__init__(message)
        self.exitcode = exitcode
        self.log_tail = log_tail

    def __str__(self) -> str:
        text = super().__str__()
        if self.exitcode is not None:
            text += f" (exit status {self.exitcode})"
        if self.log_tail:
            text += f"\n{self.log_label}:\n{self.log_tail}"
        return text


class QEMULaunchError(ProcessStartError):
    """QEMU did not start, or died while we needed it.

    Attributes:
        exitcode: its exit status, None if it still ran (e.g. never opened its socket).
        argv: the command line.
        log_tail: the last lines QEMU wrote to its log.
    """

    log_label = "QEMU said"

    def __init__(self, message: str, exitcode: int | None, argv: list[str], log_tail: str) -> None:
        super().__init__(message, exitcode, log_tail)
        self.argv = argv


class QMPConnectError(FerryError):
    """The QMP socket could not be reached or the handshake failed."""

    def __init__(self, message: str, exc: BaseException | None = None) -> None:
        super().__init__(message if exc is None else f"{message}: {exc}")
        self.exc = exc


class QMPCommandError(FerryError):
    """QEMU answered a QMP command with an error.

    Attributes:
        command: the command name.
        error_class: QEMU's error class (e.g. ``GenericError``).
        desc: QEMU's description.
    """

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP {command} failed: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QMPTimeout(FerryError):
    """QEMU did not answer (or a state was not reached) within the deadline."""

    def __init__(self, what: str, timeout_s: float) -> None:
        super().__init__(f"timed out after {timeout_s:g} s waiting for {what}")
        self.what = what
        self.timeout_s = timeout_s


class GuestError(FerryError):
    """The guest's workload channel misbehaved (no reply, bad reply, closed)."""


class GuestAgentError(FerryError):
    """The guest agent (qemu-guest-agent) of a VM could not be reached, broke its protocol, or
    the connection dropped.

    Attributes:
        vm: the VM (or label) whose agent it is.
        reason: what went wrong.
    """

    def __init__(self, vm: str, reason: str) -> None:
        super().__init__(vm, reason)
        self.vm = vm
        self.reason = reason

    def __str__(self) -> str:
        return f"guest agent of {self.vm}: {self.reason}"


class GuestAgentTimeout(GuestAgentError):
    """Nothing answered in time: often no agent runs in the guest (QEMU's end of the channel
    accepts connections and writes whether or not one does).

    Attributes:
        what: the step that got no answer (a command name).
        timeout_s: the deadline.
    """

    def __init__(self, vm: str, what: str, timeout_s: float) -> None:
        super().__init__(vm, f"no answer to {what} within {timeout_s:g} s")
        self.what = what
        self.timeout_s = timeout_s


class GuestAgentCommandError(GuestAgentError):
    """The guest agent answered a command with an error.

    Attributes:
        command: the command name (e.g. ``guest-exec``).
        error_class: the agent's error class (e.g. ``GenericError``, ``CommandNotFound``).
        desc: the agent's description.
    """

    def __init__(self, vm: str, command: str, error_class: str, desc: str) -> None:
        super().__init__(vm, f"{command} failed: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class MigrationFailed(FerryError):
    """A migration did not complete; the VM still runs where ``running_on`` says.

    Attributes:
        vm: the VM's name.
        phase: the phase the migration was in.
        reason: why it failed.
    """

    def __init__(self, vm: str, phase: str, reason: str) -> None:
        super().__init__(f"migration of {vm} failed during {phase}: {reason}")
        self.vm = vm
        self.phase = phase
        self.reason = reason
