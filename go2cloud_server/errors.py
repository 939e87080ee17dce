"""Error types of the reference control plane.

Every error carries three things: the operator CLI's exit status (``exit_code``), the HTTP status
the API answers with (``http_status``) and the stable error code of ``docs/protocol.md``
(``code``). Library code raises these; only ``cli.main`` turns them into an exit status and only
``httpapi`` turns them into an HTTP answer. Messages never contain secrets.
"""

from __future__ import annotations

from typing import ClassVar, Dict, List, Optional, Type


class ServerError(Exception):
    """Base class: an unexpected internal error."""

    exit_code: ClassVar[int] = 1
    http_status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    summary: ClassVar[str] = "unexpected internal error (see the server log)"

    def __init__(
        self, message: str, *, code: Optional[str] = None, retry_after: Optional[int] = None
    ) -> None:
        super().__init__(message)
        self.message = message
        #: seconds after which a retry may succeed: the ``Retry-After`` header of the answer
        self.retry_after = retry_after
        if code is not None:
            self.code = code  # type: ignore[misc]

    def __str__(self) -> str:
        return self.message


class InvalidInput(ServerError):
    exit_code = 2
    http_status = 400
    code = "invalid_request"
    summary = "invalid input (the message names the field)"


class TooLarge(InvalidInput):
    http_status = 413
    code = "too_large"
    summary = "request body over 1 MiB"


class NotFound(ServerError):
    exit_code = 3
    http_status = 404
    code = "not_found"
    summary = "no such workgroup, source, code or task"


class SourceUnknown(NotFound):
    code = "source_unknown"
    summary = "agent API: the source id does not exist"


class SourceReplaced(NotFound):
    http_status = 410
    code = "source_replaced"
    summary = "agent API: the source was replaced by a re-import or deleted"


class Conflict(ServerError):
    exit_code = 4
    http_status = 409
    code = "conflict"
    summary = "a rule or limit was violated (name taken, workgroup not empty, limit reached, ...)"


class ImportRejected(Conflict):
    http_status = 422
    code = "import_rejected"
    summary = "import refused (for example: the workgroup already has 50 sources)"


class SessionBusy(Conflict):
    """Another agent process holds the source's live session; sent with ``Retry-After`` while it
    may still be a restart waiting for the old process's lease to expire."""

    code = "session_busy"
    summary = "agent API: another agent process holds this source's session for now; retry later"


class SessionConflict(Conflict):
    """Two live agents share one source identity (most likely a cloned machine)."""

    code = "session_conflict"
    summary = "agent API: another live agent holds this source's session (a cloned machine?)"


class SourceInUse(Conflict):
    """A source whose agent holds a live session cannot be replaced (its agent still runs)."""

    code = "source_in_use"
    summary = "a running agent holds the source's session: stop it or wait for its lease to expire"


class SessionRequired(Conflict):
    code = "session_required"
    summary = "agent API: open a session first (POST /sources/{id}/session)"


class StaleEpoch(Conflict):
    """A data write (block chunk, rsync session) with an epoch that is not the source's lease."""

    code = "stale_epoch"
    summary = "data path: the write's session epoch is not the source's current one; nothing written"


class NothingStarted(Conflict):
    """``migration start``: no source of the request could start (each one's reason is listed)."""

    exit_code = 6
    code = "nothing_started"
    summary = ("migration start: no source of the request could start (skipped or cannot be migrated; "
               "the output lists each source's reason)")


class AuthFailed(ServerError):
    exit_code = 5
    http_status = 401
    code = "unauthorized"
    summary = "authentication failed (admin token, bearer token or signature)"


class TokenExpired(AuthFailed):
    code = "token_expired"
    summary = "the bearer token expired"


class CodeRejected(AuthFailed):
    """Import with an unusable activation code; ``code`` is one of the four code_* values."""

    http_status = 403
    code = "code_unknown"
    summary = "activation code unknown, expired, exhausted or revoked"


class ServerUnreachable(ServerError):
    exit_code = 10
    http_status = 503
    code = "server_unreachable"
    summary = "the control plane could not be reached (or its certificate did not match the pin)"


class Throttled(ServerUnreachable):
    """Too many failed attempts (import): 429 with ``Retry-After``; nothing was checked or used."""

    http_status = 429
    code = "rate_limited"
    summary = "too many failed attempts: retry after the number of seconds the server said"


class Busy(Throttled):
    """Every key-derivation slot is taken: 503 with ``Retry-After``; nothing was checked or used."""

    http_status = 503
    code = "server_busy"
    summary = "the server is busy checking other activation codes: retry after a few seconds"


#: error code of an API answer -> error type (used by the operator client).
BY_CODE: Dict[str, Type[ServerError]] = {
    "invalid_request": InvalidInput,
    "too_large": TooLarge,
    "not_found": NotFound,
    "source_unknown": SourceUnknown,
    "source_replaced": SourceReplaced,
    "conflict": Conflict,
    "import_rejected": ImportRejected,
    "session_busy": SessionBusy,
    "session_conflict": SessionConflict,
    "session_required": SessionRequired,
    "stale_epoch": StaleEpoch,
    "nothing_started": NothingStarted,
    "unauthorized": AuthFailed,
    "token_expired": TokenExpired,
    "code_unknown": CodeRejected,
    "code_expired": CodeRejected,
    "code_exhausted": CodeRejected,
    "code_revoked": CodeRejected,
    "rate_limited": Throttled,
    "server_busy": Busy,
    "internal_error": ServerError,
}


def exit_code_table() -> str:
    """Markdown table of the operator CLI's exit codes (docs/operator-guide.md)."""
    seen: Dict[int, List[str]] = {}
    for cls in [ServerError, InvalidInput, NotFound, Conflict, NothingStarted, AuthFailed, ServerUnreachable]:
        seen.setdefault(cls.exit_code, []).append(cls.summary)
    lines = ["| exit | meaning |", "| ---: | --- |", "| 0 | success |"]
    for code in sorted(seen):
        lines.append(f"| {code} | {'; '.join(seen[code])} |")
    return "\n".join(lines) + "\n"
