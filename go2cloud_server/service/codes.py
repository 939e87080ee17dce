"""Activation codes: created per workgroup, listed, revoked; the install one-liners shown with a new code."""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import string
from typing import Any, Dict, Mapping, Optional

from go2cloud_server import rules
from go2cloud_server.clock import iso
from go2cloud_server.errors import CodeRejected, ImportRejected, NotFound
from go2cloud_server.repositories import codes as repo_codes
from go2cloud_server.repositories import sources as repo_sources
from go2cloud_server.repositories import workgroups as repo_workgroups
from go2cloud_server.service.base import Concern, rand_id

log = logging.getLogger(__name__)

_ALNUM = string.ascii_letters + string.digits
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}

def hash_code(code: str, salt: bytes) -> bytes:
    return hashlib.scrypt(code.encode("utf-8"), salt=salt, maxmem=64 * 1024 * 1024, **_SCRYPT)


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def _ps_quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def install_commands(
    url: str, fingerprint: str, token_id: str, token_code: str, spki_pin: str = ""
) -> Dict[str, str]:
    """The ready-to-paste one-liners shown for an activation code (one place to change them).

    Linux: curl fetches ``install.sh`` with the server's public key pinned (``--pinnedpubkey``;
    ``--insecure`` only skips the CA check of the self-signed certificate, the pin still applies)
    and pipes it to ``sudo bash``; when curl fails (wrong pin, server unreachable) it prints
    ``exit <curl's code>`` instead, so the pipeline fails with curl's exit code and nothing runs
    (a bare pipe would give bash an empty script and exit 0, which fleet automation would count
    as an install). Windows: PowerShell fetches ``install.ps1`` with a certificate
    validation callback that accepts only the certificate whose SHA-256 is the fingerprint.

    The token code is in no process's arguments at any moment (arguments are readable by every
    local user). On Linux the assignment in front of ``sudo`` is done by the operator's shell: it
    puts the code in sudo's environment, not its arguments (and not in the shell's own environment
    afterwards, as ``export`` would), and ``sudo --preserve-env=`` hands it to ``bash`` and
    install.sh, which give it to go2cloud_client's import and unset it. Options can still be
    appended to the line. In PowerShell ``$env:`` is in-process, and install.ps1 removes it after
    the import.
    """
    hex_digest = fingerprint.split(":", 1)[-1]
    linux = (
        f"{{ curl -fsS --insecure --pinnedpubkey {_sh_quote(spki_pin)} {url}/download/install.sh"
        ' || echo "exit $?"; }'
        f" | GO2CLOUD_TOKEN_CODE={_sh_quote(token_code)} sudo --preserve-env=GO2CLOUD_TOKEN_CODE bash -s --"
        f" --server {url} --server-fingerprint {fingerprint} --token-id {token_id}"
    )
    powershell = (
        f"$env:GO2CLOUD_TOKEN_CODE={_ps_quote(token_code)}; "
        "[Net.ServicePointManager]::SecurityProtocol=[Net.SecurityProtocolType]::Tls12; "
        "[Net.ServicePointManager]::ServerCertificateValidationCallback={param($s,$c) "
        "(-join ([Security.Cryptography.SHA256]::Create().ComputeHash($c.GetRawCertData()) | "
        f"ForEach-Object {{ $_.ToString('x2') }})) -eq {_ps_quote(hex_digest)}}}; "
        "& ([scriptblock]::Create((New-Object Net.WebClient).DownloadString("
        f"{_ps_quote(url + '/download/install.ps1')}))) -Server {_ps_quote(url)} "
        f"-ServerFingerprint {_ps_quote(fingerprint)} -TokenId {_ps_quote(token_id)}"
    )
    return {"linux": linux, "powershell": powershell}


class Codes(Concern):
    """Activation codes: what an import must present, and why one is refused."""

    def refuse_unusable(self, code: Mapping[str, Any]) -> None:
        """Refuse an import with a known code that cannot be used now (revoked, expired, no uses
        left, its workgroup deleted or full), before its code is checked: no key derivation for
        an import that would be refused anyway. The answer names the state of the code, never its
        workgroup (the caller has not proven the code yet); docs/security.md says what a token id
        alone tells. The transaction that consumes a use checks all of it again."""
        self.refuse_state(code)
        wg = repo_workgroups.brief(self.store, code["workgroup_id"])
        if wg is None:
            raise CodeRejected("unknown activation code (its workgroup was deleted)", code="code_unknown")
        if repo_sources.count_active(self.store, wg["id"]) >= rules.MAX_SOURCES_PER_WORKGROUP:
            raise ImportRejected(
                f"the workgroup of this activation code already has {rules.MAX_SOURCES_PER_WORKGROUP} "
                "sources: ask the operator to use another workgroup"
            )

    def refuse_state(self, code: Mapping[str, Any]) -> None:
        """Refuse a code that is revoked, expired or has no uses left, saying which."""
        state = self.state(code)
        if state == "revoked":
            raise CodeRejected("this activation code was revoked: ask the operator for a new one",
                               code="code_revoked")
        if state == "expired":
            raise CodeRejected(
                f"this activation code expired at {code['expires_at']}: ask the operator for a new one",
                code="code_expired",
            )
        if state == "exhausted":
            raise CodeRejected(
                f"this activation code has no uses left (it allowed {code['uses']}): ask the operator "
                "for a new one",
                code="code_exhausted",
            )

    def state(self, row: Mapping[str, Any]) -> str:
        if row["revoked_at"]:
            return "revoked"
        if row["expires_epoch"] <= self.now():
            return "expired"
        if row["uses_left"] <= 0:
            return "exhausted"
        return "active"

    def view(self, row: Mapping[str, Any]) -> Dict[str, Any]:
        wg = repo_workgroups.brief(self.store, row["workgroup_id"])
        return {
            "token_id": row["token_id"],
            "workgroup": wg,
            "uses": row["uses"],
            "uses_left": row["uses_left"],
            "created_at": row["created_at"],
            "expires_at": row["expires_at"],
            "revoked_at": row["revoked_at"],
            "state": self.state(row),
        }

    def create_code(self, wg_ref: str, body: Any) -> Dict[str, Any]:
        body = rules.require_object(body if body is not None else {})
        uses = rules.integer(body.get("uses"), "uses", rules.CODE_USES, rules.CODE_USES_DEFAULT)
        days = rules.integer(body.get("days"), "days", rules.CODE_DAYS, rules.CODE_DAYS_DEFAULT)
        token_id = rand_id("at-", 16)
        token_code = "".join(secrets.choice(_ALNUM) for _ in range(28))
        salt = os.urandom(16)
        digest = hash_code(token_code, salt)
        now = self.now()
        expires = now + days * 86400
        with self.store.transaction() as conn:
            wg = self.svc.workgroups.get(conn, wg_ref)
            repo_codes.insert(conn, token_id, wg["id"], salt, digest, uses, iso(now), iso(expires), expires)
        log.info(
            "activation code %s created for workgroup %s (uses %d, days %d)", token_id, wg["id"], uses, days
        )
        row = repo_codes.get(self.store, token_id)
        assert row is not None
        view = self.view(row)
        view["token_code"] = token_code
        view["commands"] = install_commands(
            self.svc.public_url, self.svc.fingerprint, token_id, token_code, self.svc.spki_pin
        )
        return view

    def list_codes(self, wg_ref: Optional[str] = None) -> Dict[str, Any]:
        wg_id = self.svc.workgroups.get(None, wg_ref)["id"] if wg_ref else None
        rows = repo_codes.list_all(self.store, wg_id)
        return {"codes": [self.view(r) for r in rows]}

    def revoke_code(self, token_id: str) -> Dict[str, Any]:
        with self.store.transaction() as conn:
            row = repo_codes.get(conn, token_id)
            if row is None:
                raise NotFound(f"no activation code {token_id!r}: see 'go2cloud_server code list'")
            if not row["revoked_at"]:
                repo_codes.revoke(conn, token_id, self.now_iso())
        log.info("activation code %s revoked", token_id)
        row = repo_codes.get(self.store, token_id)
        assert row is not None
        return self.view(row)
