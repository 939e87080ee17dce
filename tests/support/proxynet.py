"""An agent whose only way out is a real forward proxy (tinyproxy, Debian's package).

A network namespace ``proxy-<pid>-<n>`` with one veth pair: the host side gets
``10.213.X.1/30``, the namespace side ``10.213.X.2/30``, and the namespace has no other route (no
default route), so from inside it the only reachable address is the host side of the pair.
tinyproxy listens there and forwards CONNECT to the server on the host's 127.0.0.1 (the
namespace's own 127.0.0.1 is a different, empty loopback: a direct connection to the server's
URL is refused in there). The agent is ``ip netns exec NS python -m go2cloud_client ...``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

from tests.support.harness import Agent, Server, _env, wait_for

_COUNT = [0]


def available() -> Optional[str]:
    """None when the test can run here, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("tinyproxy") is None:
        return "tinyproxy is not installed (scripts/setup.sh installs it)"
    if shutil.which("ip") is None:
        return "iproute2 is not installed"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class ProxyNet:
    """The namespace, its veth pair and a tinyproxy on the host side."""

    def __init__(self, tmp_path: Path, *, basic_auth: Optional[str] = None,
                 connect_ports: Optional[List[int]] = None) -> None:
        _COUNT[0] += 1
        n = (os.getpid() * 7 + _COUNT[0]) % 250 + 1
        self.ns = f"proxy-{os.getpid()}-{_COUNT[0]}"
        self.veth = f"pxh{os.getpid() % 100000}{_COUNT[0]}"[:15]
        self.host_ip = f"10.213.{n}.1"
        self.ns_ip = f"10.213.{n}.2"
        self.tmp_path = tmp_path
        self.basic_auth = basic_auth
        self.connect_ports = connect_ports or []
        self.proc: Optional[subprocess.Popen] = None
        self.port = 0
        self.log_file = tmp_path / f"tinyproxy-{self.ns}.log"

    def start(self) -> ProxyNet:
        _ip("netns", "add", self.ns)
        try:
            _ip("link", "add", self.veth, "type", "veth", "peer", "name", "pxns0", "netns", self.ns)
            _ip("addr", "add", f"{self.host_ip}/30", "dev", self.veth)
            _ip("link", "set", self.veth, "up")
            _ip("-n", self.ns, "addr", "add", f"{self.ns_ip}/30", "dev", "pxns0")
            _ip("-n", self.ns, "link", "set", "pxns0", "up")
            _ip("-n", self.ns, "link", "set", "lo", "up")
            self._start_proxy()
        except BaseException:
            self.close()
            raise
        return self

    def _start_proxy(self) -> None:
        with socket.socket() as s:  # a free port on the host-side address
            s.bind((self.host_ip, 0))
            self.port = s.getsockname()[1]
        conf = self.tmp_path / f"tinyproxy-{self.ns}.conf"
        lines = [
            f"Port {self.port}", f"Listen {self.host_ip}",
            "Timeout 600", "MaxClients 50", f"Allow {self.ns_ip}", "LogLevel Info",
            f'LogFile "{self.log_file}"',
        ]
        lines += [f"ConnectPort {p}" for p in self.connect_ports]
        if self.basic_auth:
            user, _, password = self.basic_auth.partition(":")
            lines.append(f"BasicAuth {user} {password}")
        conf.write_text("\n".join(lines) + "\n")
        # no User line: tinyproxy stays root (as the test is), so it can write its log in tmp_path
        self.proc = subprocess.Popen(["tinyproxy", "-d", "-c", str(conf)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

        def listening() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"tinyproxy exited {self.proc.returncode}: {self.log()}")
            try:
                with socket.create_connection((self.host_ip, self.port), timeout=1):
                    return True
            except OSError:
                return False

        wait_for(listening, 15, "tinyproxy to listen")

    def url(self, credentials: Optional[str] = None) -> str:
        return f"http://{credentials + '@' if credentials else ''}{self.host_ip}:{self.port}"

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def connects(self) -> List[str]:
        """The ``CONNECT host:port`` requests tinyproxy logged."""
        return [line for line in self.log().splitlines() if "CONNECT" in line and "Request" in line]

    def direct_refused(self, host: str, port: int) -> bool:
        """True when a direct TCP connection from inside the namespace to host:port fails."""
        code = ("import socket,sys\ntry:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), 3)\n"
                "except OSError:\n sys.exit(7)\n")
        r = subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-c", code, host, str(port)],
                           capture_output=True, timeout=30)
        return r.returncode == 7

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=30)


class NsAgent(Agent):
    """:class:`Agent` run inside the namespace (``ip netns exec``)."""

    def __init__(self, home: Path, server: Server, net: ProxyNet, env: Optional[Dict[str, str]] = None):
        super().__init__(home, server)
        self.net = net
        self.env = dict(env or {})

    def start(self, *extra: str, code: Optional[Dict[str, object]] = None) -> NsAgent:
        import threading

        argv = ["ip", "netns", "exec", self.net.ns, sys.executable, "-m", "go2cloud_client",
                "--home", str(self.home), "--no-prompt", "--yes", "--server", self.server.url,
                "--server-fingerprint", self.server.fingerprint, *extra]
        env = _env(self.env)
        if code:
            argv += ["--token-id", str(code["token_id"])]
            env["GO2CLOUD_TOKEN_CODE"] = str(code["token_code"])
        self.lines = []
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, text=True, errors="replace")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def run_in_ns(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """``go2cloud_client ARGS`` (one command, to its end) inside the namespace."""
        return subprocess.run(["ip", "netns", "exec", self.net.ns, sys.executable, "-m", "go2cloud_client",
                               *args], capture_output=True, text=True, timeout=timeout, env=_env(self.env),
                              stdin=subprocess.DEVNULL)
