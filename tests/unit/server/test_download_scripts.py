"""The one-liners, the install scripts and the package's config template, checked as text
(install.ps1 cannot run here; install.sh runs in tests/integration/test_packaging.py)."""

from __future__ import annotations

import re
import shlex
from dataclasses import fields
from pathlib import Path
from typing import Dict, List

import yaml

from go2cloud_server.service.codes import install_commands

REPO = Path(__file__).resolve().parents[3]
DATA = REPO / "go2cloud_server" / "data"
URL = "https://203.0.113.7:8443"
FP = "sha256:" + "0f" * 32
PIN = "sha256//" + "a+b/" * 10 + "cde="
CODE = "it's $HOME `x` \"q\""  # quotes and shell/PowerShell metacharacters must survive


def test_linux_one_liner_round_trip():
    line = install_commands(URL, FP, "at-0123456789abcdef", CODE, PIN)["linux"]
    tokens = shlex.split(line)
    pipe = tokens.index("|")
    # a failed download becomes `exit <curl's code>` for bash (the pipeline fails, nothing runs)
    assert tokens[:pipe] == ["{", "curl", "-fsS", "--insecure", "--pinnedpubkey", PIN,
                             f"{URL}/download/install.sh", "||", "echo", "exit $?;", "}"]
    # the code: an assignment the shell puts in sudo's environment, never an argument of a process
    assert tokens[pipe + 1:] == [
        f"GO2CLOUD_TOKEN_CODE={CODE}", "sudo", "--preserve-env=GO2CLOUD_TOKEN_CODE", "bash", "-s", "--",
        "--server", URL,
        "--server-fingerprint", FP, "--token-id", "at-0123456789abcdef"]
    assert "--token-code" not in line


def _ps_single_quoted(text: str) -> List[str]:
    """The single-quoted string literals of a PowerShell line ('' is an escaped quote)."""
    out = []
    for m in re.finditer(r"'((?:[^']|'')*)'", text):
        out.append(m.group(1).replace("''", "'"))
    return out


def _ps1_params() -> Dict[str, Dict[str, bool]]:
    text = (DATA / "install.ps1").read_text()
    block = text[text.index("\nparam(") : text.index("\n)\n")]
    params = {}
    for m in re.finditer(r"(\[Parameter\(Mandatory = \$true\)\])?\[(string|switch)\]\$(\w+)", block):
        params[m.group(3)] = {"mandatory": bool(m.group(1)), "switch": m.group(2) == "switch"}
    return params


def test_powershell_one_liner_quoting_and_parameters():
    line = install_commands(URL, FP, "at-0123456789abcdef", CODE, PIN)["powershell"]
    assert _ps_single_quoted(line) == [CODE, "x2", FP.split(":")[1], f"{URL}/download/install.ps1", URL, FP,
                                       "at-0123456789abcdef"]
    assert line.startswith("$env:GO2CLOUD_TOKEN_CODE='")
    assert "ServerCertificateValidationCallback" in line and "GetRawCertData()" in line
    assert "[Security.Cryptography.SHA256]" in line and "Tls12" in line
    passed = re.findall(r" -(\w+) '", line.split("DownloadString(")[1])
    params = _ps1_params()
    assert passed == ["Server", "ServerFingerprint", "TokenId"]
    assert {name for name, p in params.items() if p["mandatory"]} == set(passed)
    assert "token" not in " ".join(params).lower().replace("tokenid", "")  # no token code parameter


def test_install_ps1_parameters_and_steps():
    params = _ps1_params()
    assert params == {
        "Server": {"mandatory": True, "switch": False},
        "ServerFingerprint": {"mandatory": True, "switch": False},
        "TokenId": {"mandatory": True, "switch": False},
        "Prefix": {"mandatory": False, "switch": False},
        "Yes": {"mandatory": False, "switch": True},
        "NoPrompt": {"mandatory": False, "switch": True},
        "NoService": {"mandatory": False, "switch": True},
        "Package": {"mandatory": False, "switch": False},
    }
    text = (DATA / "install.ps1").read_text()
    assert "Join-Path $env:ProgramFiles 'go2cloud_client'" in text
    assert text.count("$ServedFingerprint = ''") == 1  # filled in by the server
    # pin: the callback compares the SHA-256 of the certificate with the fingerprint
    assert "ServerCertificateValidationCallback" in text and "GetRawCertData()" in text
    assert "-eq $PinHex" in text
    assert "Get-FileHash -Algorithm SHA256" in text and "Expand-Archive" in text
    assert "'--import-only'" in text and "service install" in text
    assert "Remove-Item Env:GO2CLOUD_TOKEN_CODE" in text
    assert "'state', 'identity', 'Logs', 'config.yaml'" in text
    # the steps in order: download, hash check, extract, install, import, service
    body = text[text.index("\n)\n"):]  # after the help text and the param block
    order = [body.index(s) for s in ("Get-Pinned 'SHA256SUMS'", "Get-FileHash", "Expand-Archive",
                                     "Copy-Item -LiteralPath $item.FullName", "'--import-only'",
                                     "service install")]
    assert order == sorted(order)


def test_install_sh_options_and_markers():
    text = (DATA / "install.sh").read_text()
    assert text.startswith("#!/bin/bash\n") and "\nset -eu\n" in text
    assert text.count("\nSERVED_SPKI_PIN=''\n") == 1 and text.count("\nSERVED_FINGERPRINT=''\n") == 1
    options = set(re.findall(r"^    (--[a-z-]+)\)", text, re.M))
    assert options == {"--server", "--server-fingerprint", "--token-id", "--prefix", "--pin", "--no-prompt",
                       "--no-service"}
    assert "--yes | -y)" in text and "/opt/go2cloud_client" in text
    # the token code reaches the agent only through the environment
    assert not re.search(r'"\$EXE".*--token-code', text)
    assert 'trap cleanup EXIT' in text and "--pinnedpubkey \"$PIN\"" in text
    # scripts/ holds links to the canonical copies (one copy of the text)
    for name in ("install.sh", "install.ps1"):
        link = REPO / "scripts" / name
        assert link.is_symlink() and link.resolve() == (DATA / name).resolve()


def test_config_template_lists_every_key_and_its_values_are_valid(tmp_path):
    from go2cloud_client.config import ENV_VARS, Config, load_config
    from go2cloud_client.home import Home

    text = (REPO / "packaging" / "files" / "config.yaml.example").read_text()
    assert all(line == "" or line.startswith("#") for line in text.splitlines()), "all commented"
    examples = re.findall(r"^# ([a-z_]+: .+)$", text, re.M)
    doc = yaml.safe_load("\n".join(examples))
    assert set(doc) == {f.name for f in fields(Config)}
    for key, env in ENV_VARS.items():
        assert env in text, key
    (tmp_path / "config.yaml").write_text("\n".join(examples) + "\n")
    config = load_config(Home(tmp_path), environ={})
    assert config.poll_wait_s == doc["poll_wait_s"]
