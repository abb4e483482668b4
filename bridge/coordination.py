"""ZooKeeper through kazoo, seen from asyncio: a session wrapper and membership.

kazoo runs its own threads. Every blocking kazoo call here runs in a worker
thread (``asyncio.to_thread``) so the event loop never waits on ZooKeeper, and
kazoo's state callbacks are carried into the loop with ``call_soon_threadsafe``.

Failure handling, up front:

* SUSPENDED (connection lost, session maybe alive): listeners are told at once;
  singleton work pauses. Membership needs nothing: the ephemeral node survives
  if the session does.
* LOST (session expired): every ephemeral node of ours is gone. kazoo reconnects
  with a new session; when it is CONNECTED again the member node is re-created.
* Errors from kazoo are mapped to :class:`CoordinationError`, cause kept.

Znodes hold ids, ports and counts only, never PHI.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import orjson
from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import KazooException, NodeExistsError, NoNodeError
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.retry import KazooRetry
from kazoo.security import make_digest_acl

from bridge.errors import BridgeError, CoordinationError, LifecycleError, describe_failure

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

StateListener = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class ZooKeeperTls:
    """TLS to ZooKeeper's secure client port: the CA its certificate is checked against
    (None: the system's) and, for ``ssl.clientAuth=need``, a client certificate."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def kazoo_options(self) -> dict[str, Any]:
        return {
            "use_ssl": True,
            "verify_certs": True,
            "ca": None if self.ca_file is None else str(self.ca_file),
            "certfile": None if self.cert_file is None else str(self.cert_file),
            "keyfile": None if self.key_file is None else str(self.key_file),
        }


class ZooKeeperSession:
    """One kazoo client, its base path, and its state carried into asyncio."""

    def __init__(
        self,
        servers: str,
        base_path: str,
        *,
        session_timeout_s: float = 6.0,
        connect_timeout_s: float = 15.0,
        create_base: bool = True,
        digest: str | None = None,
        tls: ZooKeeperTls | None = None,
    ) -> None:
        self.servers = servers
        self._tls = tls
        self.base_path = base_path.rstrip("/") or "/"
        self._session_timeout_s = session_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._create_base = create_base
        self._digest = digest
        self._client: KazooClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listeners: list[StateListener] = []
        self._stopped = False
        #: ``CONNECTED``, ``SUSPENDED`` or ``LOST``, as last seen by the loop.
        self.state = "LOST"

    @property
    def client(self) -> KazooClient:
        if self._client is None:
            raise LifecycleError("ZooKeeperSession used before start()")
        return self._client

    @property
    def connected(self) -> bool:
        return self.state == "CONNECTED"

    def path(self, *parts: str) -> str:
        """An absolute znode path under this cluster's base path."""
        tail = "/".join(p.strip("/") for p in parts if p)
        if not tail:
            return self.base_path
        return f"{self.base_path}/{tail}" if self.base_path != "/" else f"/{tail}"

    def add_listener(self, listener: StateListener) -> None:
        """Call ``listener(state)`` on the event loop at every state change."""
        self._listeners.append(listener)

    async def start(self) -> None:
        if self._client is not None:
            raise LifecycleError("ZooKeeperSession.start() called twice")
        self._loop = asyncio.get_running_loop()
        auth: dict[str, Any] = {}
        if self._digest is not None:
            user, _, password = self._digest.partition(":")
            auth = {
                "auth_data": [("digest", self._digest)],
                "default_acl": [make_digest_acl(user, password, all=True)],
            }
        client = KazooClient(
            hosts=self.servers,
            timeout=self._session_timeout_s,
            **auth,
            **({} if self._tls is None else self._tls.kazoo_options()),
            connection_retry=KazooRetry(max_tries=-1, delay=0.2, max_delay=2.0),
            command_retry=KazooRetry(max_tries=3, delay=0.1, max_delay=1.0),
        )
        self._client = client
        client.add_listener(self._on_state)
        try:
            await asyncio.to_thread(client.start, self._connect_timeout_s)
        except KazooTimeoutError as exc:
            await asyncio.to_thread(client.close)
            raise CoordinationError(
                f"cannot connect to ZooKeeper at {self.servers} within "
                f"{self._connect_timeout_s:g} s"
            ) from exc
        self.state = "CONNECTED"
        if self._create_base:
            await self.call(client.ensure_path, self.base_path)

    async def stop(self) -> None:
        """Close the session (its ephemeral nodes go at once). Idempotent."""
        if self._client is None or self._stopped:
            return
        self._stopped = True
        client = self._client
        await asyncio.to_thread(client.stop)
        await asyncio.to_thread(client.close)
        self.state = "LOST"

    async def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a blocking kazoo call in a thread; map its errors to ours."""
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except (NodeExistsError, NoNodeError):
            raise
        except (KazooException, KazooTimeoutError) as exc:
            raise CoordinationError(f"ZooKeeper call failed: {type(exc).__name__}") from exc

    def _on_state(self, state: str) -> None:
        # kazoo's thread: never block here; hand over to the loop.
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        name = {
            KazooState.CONNECTED: "CONNECTED",
            KazooState.SUSPENDED: "SUSPENDED",
            KazooState.LOST: "LOST",
        }.get(state, str(state))
        loop.call_soon_threadsafe(self._deliver, name)

    def _deliver(self, state: str) -> None:
        previous, self.state = self.state, state
        if previous != state:
            log.info("zookeeper session %s -> %s", previous, state)
        for listener in list(self._listeners):
            try:
                listener(state)
            except Exception as exc:  # a listener's defect must not stop the others
                log.error("zookeeper state listener failed: %s", describe_failure(exc))


class Membership:
    """This instance's ephemeral node under ``<base>/members/<instance-id>``.

    The node holds JSON: host, ports, version, start time, load. After a session
    loss the node is re-created as soon as a new session is connected.
    """

    def __init__(
        self,
        session: ZooKeeperSession,
        instance_id: str,
        describe: Callable[[], dict[str, Any]],
    ) -> None:
        self._session = session
        self.instance_id = instance_id
        self._describe = describe
        self._joined = False
        self._rejoin: asyncio.Task[None] | None = None
        self._lost_since_join = False
        session.add_listener(self._on_state)

    @property
    def path(self) -> str:
        return self._session.path("members", self.instance_id)

    async def join(self) -> None:
        client = self._session.client
        data = orjson.dumps(self._describe())
        await self._session.call(client.ensure_path, self._session.path("members"))
        try:
            await self._session.call(client.create, self.path, data, ephemeral=True)
        except NodeExistsError:
            raise CoordinationError(
                f"instance id {self.instance_id!r} is already a live member of this cluster"
            ) from None
        self._joined = True
        log.info("joined cluster as member %s", self.instance_id)

    async def update(self) -> None:
        """Refresh the node's data (load, ports)."""
        if not self._joined or not self._session.connected:
            return
        client = self._session.client
        try:
            await self._session.call(client.set, self.path, orjson.dumps(self._describe()))
        except NoNodeError:
            await self._recreate()

    async def leave(self) -> None:
        if self._rejoin is not None:
            self._rejoin.cancel()
        if not self._joined:
            return
        self._joined = False
        if self._session.connected:
            with contextlib.suppress(NoNodeError, CoordinationError):
                await self._session.call(self._session.client.delete, self.path)

    def _on_state(self, state: str) -> None:
        if state == "LOST":
            self._lost_since_join = True
        elif state == "CONNECTED" and self._joined and self._lost_since_join:
            self._lost_since_join = False
            self._rejoin = asyncio.get_running_loop().create_task(self._recreate())

    async def _recreate(self) -> None:
        client = self._session.client
        data = orjson.dumps(self._describe())
        try:
            await self._session.call(client.create, self.path, data, ephemeral=True)
            log.info("re-created member node %s after session loss", self.instance_id)
        except NodeExistsError:
            pass
        except CoordinationError:
            log.warning("could not re-create member node %s; will retry", self.instance_id)


async def wait_for(condition: Callable[[], Awaitable[bool]], timeout_s: float) -> bool:
    """Poll an async condition until true or the deadline (tests and CLI helpers)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        if await condition():
            return True
        if asyncio.get_running_loop().time() >= deadline:
            return False
        await asyncio.sleep(0.05)


class Rerun:
    """Work that must run again whenever something changed, but never twice at once:
    :meth:`request` starts a run, or asks the running one to go round once more.
    ZooKeeper watches fire in kazoo's threads: :meth:`request_threadsafe` is theirs.

    A run that fails with a :class:`BridgeError` (ZooKeeper or Kafka away) is logged
    and retried after ``retry_s``; ``enabled`` is asked before every run (False:
    nothing to do)."""

    def __init__(
        self,
        work: Callable[[], Awaitable[None]],
        *,
        what: str,
        enabled: Callable[[], bool],
        retry_s: float = 0.5,
    ) -> None:
        self._work = work
        self._what = what
        self._enabled = enabled
        self._retry_s = retry_s
        self._task: asyncio.Task[None] | None = None
        self._again = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def request(self, *_: object) -> None:
        if not self._enabled():
            return
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._loop_runs())

    def request_threadsafe(self, *_: object) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.request)

    async def cancel(self, *, grace_s: float = 0.0) -> None:
        """Stop: a run in progress may finish for up to ``grace_s`` (when ``enabled`` has
        turned False it does not go round again), then it is cancelled. A grace lets
        a run that opens Kafka clients close them itself: one cancelled while it
        connects can leave its connection open."""
        task, self._task = self._task, None
        if task is not None:
            if grace_s > 0:
                await asyncio.wait([task], timeout=grace_s)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _loop_runs(self) -> None:
        while self._enabled():
            self._again = False
            try:
                await self._work()
            except BridgeError as exc:
                log.warning("%s: %s; will retry", self._what, describe_failure(exc))
                await asyncio.sleep(self._retry_s)
                self._again = True
            if not self._again:
                return


async def write_checked(
    session: ZooKeeperSession, path: str, data: bytes, *, check: tuple[str, int]
) -> list[Any]:
    """Create or overwrite ``path`` in one transaction with a version check on
    ``check`` = (node, version): the fencing write (the leader's ``leader`` node, a
    channel's ``fence``). The parent is created first if missing. Returns the
    transaction's results; the caller decides what a failure means."""
    client = session.client
    exists = await session.call(client.exists, path)
    if exists is None:
        await session.call(client.ensure_path, path.rsplit("/", 1)[0] or "/")
    transaction = client.transaction()
    transaction.check(*check)
    if exists is None:
        transaction.create(path, data)
    else:
        transaction.set_data(path, data)
    results: list[Any] = await session.call(transaction.commit)
    return results
