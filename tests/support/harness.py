"""Real processes on loopback: the reference server, its operator CLI and agents.

Nothing here is faked: the server is ``python -m go2cloud_server serve`` with its real rsync
daemon, the agent is ``python -m go2cloud_client`` in its own process, and results are compared
with the source through full tree manifests.

The harness reads the server's state (and creates codes) in-process through the operator client
library (go2cloud_server/opclient.py: the pinned connection, the admin token and the same HTTPS
endpoints the ``go2cloud_server`` subcommands call), so polling costs a request, not a Python
start-up; ``Server.cli``/``Server.j`` run the real operator CLI, for the tests that are about it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from go2cloud_server.opclient import OperatorClient, resolve

REPO = Path(__file__).resolve().parents[2]


def _env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("GO2CLOUD_SERVER", None)
    env.pop("GO2CLOUD_HOME", None)
    # agents started with --yes must not install the kernel snapshot driver on the test machine
    # (tests/integration/test_host_prep.py exercises that step with a fake package manager)
    env.setdefault("GO2CLOUD_SNAPSHOT_DRIVER", "skip")
    if extra:
        env.update(extra)
    return env


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")


class Server:
    """``go2cloud_server serve`` on 127.0.0.1 with a free API port and a free rsync port."""

    def __init__(self, data_dir: Path, heartbeat_interval: float = 1,
                 extra_env: Optional[Dict[str, str]] = None, extra_args: Optional[List[str]] = None,
                 listen: str = "127.0.0.1:0", argv_prefix: Optional[List[str]] = None):
        """``listen`` and ``argv_prefix`` (e.g. ``ip netns exec NS``, for a server inside a test's
        network namespace: the operator commands then run in there too) default to loopback."""
        self.listen = listen
        self.argv_prefix = list(argv_prefix or [])
        self.data_dir = data_dir
        self.heartbeat_interval = heartbeat_interval
        self.extra_env = extra_env or {}
        self.extra_args = list(extra_args or [])
        self.proc: Optional[subprocess.Popen] = None
        self.info: Dict[str, Any] = {}
        self._op: Optional[OperatorClient] = None

    def start(self) -> Server:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        info_file = self.data_dir / "server.json"
        if info_file.exists():
            info_file.unlink()
        self.log = open(self.data_dir.parent / f"{self.data_dir.name}-serve.log", "ab")
        self.proc = subprocess.Popen(
            self.argv_prefix + [sys.executable, "-m", "go2cloud_server", "serve", "--listen", self.listen,
             "--data-dir", str(self.data_dir),
             "--heartbeat-interval", str(self.heartbeat_interval), *self.extra_args],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_env(self.extra_env),
        )

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            return info_file.exists()

        wait_for(ready, 30, "server.json")
        self.info = json.loads(info_file.read_text())
        self._op = None  # a restarted server listens on a new port
        return self

    @property
    def url(self) -> str:
        return str(self.info["url"])

    @property
    def fingerprint(self) -> str:
        return str(self.info["fingerprint"])

    @property
    def port(self) -> int:
        """The one port of the control plane: API, block and rsync data."""
        return int(self.url.rsplit(":", 1)[1])

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()

    # operator CLI ---------------------------------------------------------------------------
    def cli(self, *args: str, check: bool = True, json_out: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess:
        argv = self.argv_prefix + [sys.executable, "-m", "go2cloud_server", *args]
        if json_out:
            argv.append("--json")
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout,
            env=_env({"GO2CLOUD_DATA_DIR": str(self.data_dir)}),
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{args} exited {proc.returncode}: {proc.stderr}{proc.stdout}")
        return proc

    def j(self, *args: str, timeout: float = 60) -> Any:
        return json.loads(self.cli(*args, timeout=timeout).stdout)

    # operator client, in-process -------------------------------------------------------------
    @property
    def op(self) -> OperatorClient:
        """The operator client library on this server's data dir (found, pinned and authenticated
        as the CLI does it: server.json, tls/cert.pem, admin.token)."""
        if self.argv_prefix:
            raise AssertionError("this server runs in a network namespace: use cli(), not the "
                                 "in-process client")
        if self._op is None:
            self._op = OperatorClient(resolve(self.data_dir, None, None), timeout=60)
        return self._op

    def api(self, method: str, path: str, body: Any = None,
            params: Optional[Dict[str, Any]] = None) -> Any:
        """One operator API call (``/api/v1`` + ``path``); the server's errors are raised as the
        CLI would report them (go2cloud_server.errors). For a server in a network namespace the
        same client runs in a short-lived process in there."""
        if self.argv_prefix:
            return self._api_in_namespace(method, path, body, params)
        return self.op.request(method, path, body, params)

    def _api_in_namespace(self, method: str, path: str, body: Any,
                          params: Optional[Dict[str, Any]]) -> Any:
        code = ("import json, sys\n"
                "from go2cloud_server.opclient import OperatorClient, resolve\n"
                "a = json.loads(sys.stdin.read())\n"
                "op = OperatorClient(resolve(a['dir'], None, None), timeout=60)\n"
                "print(json.dumps(op.request(a['m'], a['p'], a['b'], a['q'])))\n")
        args = {"dir": str(self.data_dir), "m": method, "p": path, "b": body, "q": params}
        proc = subprocess.run(self.argv_prefix + [sys.executable, "-c", code], input=json.dumps(args),
                              capture_output=True, text=True, timeout=90, env=_env())
        if proc.returncode != 0:
            raise AssertionError(f"{method} {path} in the namespace exited {proc.returncode}: {proc.stderr}")
        return json.loads(proc.stdout)

    def new_code(self, workgroup: str, uses: int = 10) -> Dict[str, Any]:
        """``go2cloud_server code create --workgroup WG --uses N --json``."""
        return self.api("POST", f"/workgroups/{OperatorClient.seg(workgroup)}/codes", {"uses": uses})

    def source_migration(self, source_id: str) -> Dict[str, Any]:
        """``go2cloud_server migration show --source S --json``."""
        return self.api("GET", f"/sources/{OperatorClient.seg(source_id)}/migration")

    def show_source(self, source_id: str) -> Dict[str, Any]:
        """``go2cloud_server source show S --json``."""
        return self.api("GET", f"/sources/{OperatorClient.seg(source_id)}")

    def task_status(self, source_id: str) -> Optional[str]:
        tasks = self.source_migration(source_id).get("tasks") or []
        return tasks[0]["status"] if tasks else None

    def source(self, source_id: str) -> Dict[str, Any]:
        for s in self.api("GET", "/sources")["sources"]:
            if s["id"] == source_id:
                return s
        raise AssertionError(f"source {source_id} not listed")

    def wait_task(self, source_id: str, status: str, timeout: float = 60) -> Dict[str, Any]:
        """Wait for the source's latest task to be ``status`` (through the drill: ``drilling`` ->
        ``drill_passed`` -> ``syncing``); a failed task or a drill that found a critical item
        fails at once (with the drill report)."""
        def check() -> Optional[Dict[str, Any]]:
            m = self.source_migration(source_id)
            tasks = m.get("tasks") or []
            if tasks and tasks[0]["status"] == "failed" and status != "failed":
                raise AssertionError(f"task failed: {tasks[0]}")
            if tasks and tasks[0]["status"] == "drill_abnormal" and status != "drill_abnormal":
                raise AssertionError(f"the drill found a critical item: {self.drill(source_id)}")
            return tasks[0] if tasks and tasks[0]["status"] == status else None

        return wait_for(check, timeout, f"task of {source_id} to be {status}", interval=0.5)

    def drill(self, source_id: str) -> Dict[str, Any]:
        """The latest drill of a source (``go2cloud_server drill show --source S --json``)."""
        return self.api("GET", f"/sources/{OperatorClient.seg(source_id)}/drill")

    def artifacts(self, source_id: str) -> List[Dict[str, Any]]:
        """``go2cloud_server migration artifacts --source S --json``: the latest task's images."""
        tasks = self.source_migration(source_id).get("tasks") or []
        assert tasks, f"source {source_id} has no migration task yet"
        return self.api("GET", f"/tasks/{OperatorClient.seg(tasks[0]['task_id'])}/artifacts")["artifacts"]

    def artifact_tree(self, source_id: str, src: Path, index: int = 0) -> Path:
        """Where the copy of the source path ``src`` is in the ``index``-th file-level artifact."""
        return Path(self.artifacts(source_id)[index]["path"]) / str(src).lstrip("/")


class Agent:
    """One ``go2cloud_client`` foreground process with its own home."""

    def __init__(self, home: Path, server: Server):
        self.home = home
        self.server = server
        self.proc: Optional[subprocess.Popen] = None
        self.lines: List[str] = []
        self._reader: Optional[threading.Thread] = None

    def start(self, *extra: str, code: Optional[Dict[str, Any]] = None) -> Agent:
        argv = [sys.executable, "-m", "go2cloud_client", "--home", str(self.home), "--no-prompt", "--yes",
                "--server", self.server.url, "--server-fingerprint", self.server.fingerprint, *extra]
        env = _env()
        if code:  # the token code is never an argument: in the environment, as the one-liner does
            argv += ["--token-id", code["token_id"]]
            env["GO2CLOUD_TOKEN_CODE"] = code["token_code"]
        self.lines = []
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, text=True, errors="replace")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc and self.proc.stdout
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_imported(self, timeout: float = 30) -> str:
        def imported() -> Optional[str]:
            for line in self.lines:
                if line.startswith("Import Source Server [") and line.endswith("] Successfully!"):
                    return line[len("Import Source Server ["):-len("] Successfully!")]
            if self.proc and self.proc.poll() is not None:
                raise AssertionError(f"agent exited {self.proc.returncode}:\n{self.output()}")
            return None

        return wait_for(imported, timeout, "the import success line")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def run_cli(self, *args: str, timeout: float = 60,
                token_code: Optional[str] = None) -> subprocess.CompletedProcess:
        """``go2cloud_client --home HOME ARGS``; ``token_code`` goes into its environment."""
        env = _env({"GO2CLOUD_TOKEN_CODE": token_code} if token_code else None)
        return subprocess.run([sys.executable, "-m", "go2cloud_client", "--home", str(self.home), *args],
                              capture_output=True, text=True, timeout=timeout, env=env)
