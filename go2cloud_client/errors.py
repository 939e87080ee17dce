"""Error types of the agent.

Every error the operator can meet is a subclass of :class:`Go2CloudError`. It carries an exit code
(the table in ``docs/exit-codes.md`` is generated from :data:`EXIT_CODES` by
``python -m go2cloud_client.errors``), a stable error code string that is reported to the control
plane, and a message that tells the operator what to do next. Library code raises these; only
``cli.main`` turns them into an exit status. Messages never contain secrets.
"""

from __future__ import annotations

from typing import ClassVar, Dict, List, Optional, Type


class Go2CloudError(Exception):
    """Base class. ``exit_code`` is the process exit status, ``code`` the stable error code."""

    exit_code: ClassVar[int] = 1
    code: ClassVar[str] = "internal_error"
    summary: ClassVar[str] = "unexpected internal error (see the log in <home>/Logs/)"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, detail: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def __str__(self) -> str:
        return self.message


class UsageError(Go2CloudError):
    exit_code = 2
    code = "usage_error"
    summary = "invalid command-line option or value"


class ConfigError(Go2CloudError):
    exit_code = 3
    code = "config_error"
    summary = "the agent home, its config file or its state files are unusable"


class HomeFullError(ConfigError):
    """ENOSPC/EDQUOT writing the agent home: the agent waits and resumes when space returns."""

    exit_code = 7
    code = "agent_home_full"
    summary = ("the agent home's filesystem is full: free space there (the agent resumes by itself "
               "when space returns)")
    retryable = True


class AlreadyRunningError(Go2CloudError):
    exit_code = 4
    code = "already_running"
    summary = "another agent is already running with this home"


class NotImportedError(Go2CloudError):
    exit_code = 5
    code = "not_imported"
    summary = "this agent home has no imported source yet"


class PromptRefusedError(Go2CloudError):
    exit_code = 6
    code = "prompt_refused"
    summary = "a required confirmation was refused or could not be asked (--no-prompt)"


class ServerUnreachableError(Go2CloudError):
    exit_code = 10
    code = "server_unreachable"
    summary = "the control plane could not be reached"
    retryable = True


class TLSError(Go2CloudError):
    exit_code = 11
    code = "tls_error"
    summary = "the control plane's certificate was rejected (fingerprint mismatch or untrusted)"


class ProtocolError(Go2CloudError):
    exit_code = 12
    code = "protocol_error"
    summary = "the control plane sent a malformed, oversized or unexpected response"
    retryable = True


class ServerError(Go2CloudError):
    exit_code = 13
    code = "server_error"
    summary = "the control plane answered with an error"
    retryable = True


class ThrottledError(ServerError):
    """429 rate_limited / 503 server_busy: retried after the server's ``Retry-After`` (bounded)."""

    exit_code = 15
    code = "rate_limited"
    summary = ("the control plane is throttling this request (too many failed imports, or busy): "
               "wait the time it said, check the token id and code, and try again")

    def __init__(self, message: str, *, retry_after: Optional[float] = None,
                 detail: Optional[str] = None) -> None:
        super().__init__(message, detail=detail)
        #: seconds the control plane asked to wait (``Retry-After``), None when it did not say
        self.retry_after = retry_after


class ProxyRefusedError(Go2CloudError):
    """The configured HTTP proxy answered CONNECT with an error (407 credentials missing or
    wrong, 403 destination not allowed, ...): retrying the same request cannot help."""

    exit_code = 16
    code = "proxy_refused"
    summary = ("the HTTP proxy refused the connection (407/401: missing or wrong proxy credentials, "
               "403: destination not allowed): fix the proxy URL or the proxy's rules")

    def __init__(self, message: str, *, status: int = 0, detail: Optional[str] = None) -> None:
        super().__init__(message, detail=detail)
        #: the proxy's HTTP status
        self.status = status


class RequestRejectedError(Go2CloudError):
    exit_code = 14
    code = "request_rejected"
    summary = "the control plane refused a request permanently (4xx: invalid, not found, too large)"


class CodeUnknownError(Go2CloudError):
    exit_code = 20
    code = "code_unknown"
    summary = "activation code unknown (wrong token id or token code)"


class CodeExpiredError(Go2CloudError):
    exit_code = 21
    code = "code_expired"
    summary = "activation code expired"


class CodeExhaustedError(Go2CloudError):
    exit_code = 22
    code = "code_exhausted"
    summary = "activation code has no uses left"


class CodeRevokedError(Go2CloudError):
    exit_code = 23
    code = "code_revoked"
    summary = "activation code was revoked"


class ImportRejectedError(Go2CloudError):
    exit_code = 24
    code = "import_rejected"
    summary = "the control plane refused the import for another reason (message says why)"


class IdentityRejectedError(Go2CloudError):
    exit_code = 25
    code = "identity_rejected"
    summary = "the control plane no longer knows this source (deleted or replaced)"


class SessionConflictError(Go2CloudError):
    """Another live agent holds this source's session (fencing): two agents share one identity,
    most likely a cloned machine. Restarting does not help; ``--abort`` on the clone does."""

    exit_code = 26
    code = "session_conflict"
    summary = ("another live agent holds this source's session: most likely this machine is a clone "
               "of an imported one (run go2cloud_client --abort on the clone, then import it again)")


class SessionBusyError(Go2CloudError):
    """409 ``session_busy``: another process holds the session for now (the agent waits)."""

    exit_code = 26
    code = "session_busy"
    summary = "another agent process holds this source's session for now (the agent waits and retries)"

    def __init__(self, message: str, *, retry_after: Optional[float] = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RsyncMissingError(Go2CloudError):
    exit_code = 30
    code = "rsync_missing"
    summary = "rsync is not installed and was not installed"


class ReplicationError(Go2CloudError):
    exit_code = 31
    code = "replication_failed"
    summary = "a transfer failed"
    retryable = True


class PackageInstallError(Go2CloudError):
    exit_code = 32
    code = "package_install_failed"
    summary = "installing a package with the distribution's package manager failed"


class CommandRejectedError(Go2CloudError):
    exit_code = 33
    code = "command_rejected"
    summary = "a command from the control plane had invalid parameters and was not run"


class SnapshotFailedError(Go2CloudError):
    exit_code = 34
    code = "snapshot_failed"
    summary = "a snapshot of a disk could not be taken or released (block-level migration)"


class DrillCriticalError(Go2CloudError):
    exit_code = 35
    code = "drill_critical"
    summary = "the drill (go2cloud_client check) found at least one critical item: fix it before migrating"


class HostRevertError(Go2CloudError):
    exit_code = 40
    code = "host_revert_failed"
    summary = ("reverting a recorded host change failed (the rest was reverted; fix the cause and "
               "run uninstall --revert again)")


class ServiceError(Go2CloudError):
    exit_code = 41
    code = "service_failed"
    summary = "installing, starting or removing the agent service (systemd unit / Windows service) failed"


class AgentStopError(Go2CloudError):
    exit_code = 42
    code = "agent_stop_failed"
    summary = "the running agent could not be stopped (permission denied, or it did not exit)"


class UninstallError(Go2CloudError):
    exit_code = 43
    code = "uninstall_failed"
    summary = "removing the installed package folder failed"


class InterruptedByOperator(Go2CloudError):
    exit_code = 130
    code = "interrupted"
    summary = "stopped by Ctrl-C or a signal"


#: Control-plane error code (``error.code`` in a JSON error body) -> agent error type.
SERVER_CODES: Dict[str, Type[Go2CloudError]] = {
    "code_unknown": CodeUnknownError,
    "code_expired": CodeExpiredError,
    "code_exhausted": CodeExhaustedError,
    "code_revoked": CodeRevokedError,
    "import_rejected": ImportRejectedError,
    "source_unknown": IdentityRejectedError,
    "source_replaced": IdentityRejectedError,
    "session_conflict": SessionConflictError,
    "session_required": SessionConflictError,
    "session_busy": SessionBusyError,
    "rate_limited": ThrottledError,
    "server_busy": ThrottledError,
}


#: Modules that define error types of their own (imported before the table is built, so the
#: table does not depend on what happened to be imported already).
_ERROR_MODULES = (
    "go2cloud_client.subp",
    "go2cloud_client.replication.excludes",
    "go2cloud_client.replication.rsync",
    "go2cloud_client.replication.block.errors",
)


def all_error_types() -> List[Type[Go2CloudError]]:
    import importlib

    for name in _ERROR_MODULES:
        importlib.import_module(name)
    seen: List[Type[Go2CloudError]] = []
    stack: List[Type[Go2CloudError]] = [Go2CloudError]
    while stack:
        cls = stack.pop(0)
        seen.append(cls)
        stack.extend(cls.__subclasses__())
    return sorted(seen, key=lambda c: (c.exit_code, c.code))


def exit_code_table() -> str:
    """Markdown table of exit codes (written to docs/exit-codes.md)."""
    lines = [
        "| exit | error code | meaning |",
        "| ---: | --- | --- |",
        "| 0 | - | success |",
    ]
    for cls in all_error_types():
        lines.append(f"| {cls.exit_code} | `{cls.code}` | {cls.summary} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(exit_code_table(), end="")
