"""The cluster config in ZooKeeper: every version kept, the current one watched.

Layout (:mod:`bridge.cluster.layout`): ``config`` holds the current version,
``config-history/v<NNNNNNNNNN>`` every version ever pushed, both as the same
JSON::

    {"config": {...}, "digest": "<sha256 hex of the canonical config>",
     "pushed_at": "2024-05-01T12:00:00.000Z", "source": "cli", "version": 3,
     "rolled_back_to": 1}            # only on a rollback

A push writes the history node and the ``config`` node in one ZooKeeper
transaction whose ``set_data`` carries the version of the ``config`` node read
just before: of two concurrent pushes exactly one commits, the other reads again
and becomes the next version, so history is linear and has no gap. Content is
canonical JSON (sorted keys, every field given), so the digest only changes when
the configuration does; pushing the current content again writes nothing.

Every ZooKeeper call runs in a worker thread through :meth:`ZooKeeperSession.call`;
watch callbacks are carried into the event loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson
from kazoo.exceptions import BadVersionError, NodeExistsError, NoNodeError
from kazoo.recipe.watchers import DataWatch

from bridge.cluster import layout
from bridge.cluster.cluster_config import ClusterConfig, parse_cluster_config
from bridge.coordination import ZooKeeperSession
from bridge.errors import ConfigError, CoordinationError, describe_failure

log = logging.getLogger(__name__)

#: How often a push re-reads and tries again after losing a race to another push.
MAX_PUSH_ATTEMPTS = 50
#: ZooKeeper refuses a node larger than about 1 MB (jute.maxbuffer); stay clearly below.
MAX_NODE_BYTES = 1_000_000

_HISTORY_NAME = re.compile(r"^v\d{10}$")
_CONFLICTS = (BadVersionError, NodeExistsError, NoNodeError)

ConfigCallback = Callable[["VersionedConfig | None"], None]


def canonical_json(config: ClusterConfig) -> bytes:
    """The configuration as canonical JSON: every field, keys sorted, no spaces."""
    return orjson.dumps(config.canonical(), option=orjson.OPT_SORT_KEYS)


def config_digest(config: ClusterConfig) -> str:
    """sha256 (hex) of :func:`canonical_json`."""
    return hashlib.sha256(canonical_json(config)).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class VersionedConfig:
    """One version of the cluster config as stored in ZooKeeper."""

    version: int
    pushed_at: str
    """RFC 3339, UTC."""
    digest: str
    """sha256 (hex) of the canonical JSON of ``config``."""
    config: ClusterConfig
    source: str | None = None
    """Who pushed it: a free label such as ``cli``."""
    rolled_back_to: int | None = None
    """Set when this version was made by rolling back to that earlier version."""

    def to_json(self) -> dict[str, Any]:
        """The node's JSON (what ``config show --json`` prints)."""
        record: dict[str, Any] = {
            "version": self.version,
            "pushed_at": self.pushed_at,
            "digest": self.digest,
            "source": self.source,
            "config": self.config.canonical(),
        }
        if self.rolled_back_to is not None:
            record["rolled_back_to"] = self.rolled_back_to
        return record

    @classmethod
    def decode(cls, raw: bytes, *, where: str) -> VersionedConfig:
        """Parse a ``config`` or history node; :class:`ConfigError` if it is not one."""
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise ConfigError(f"{where} does not hold JSON", key="config") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{where} does not hold a JSON object", key="config")
        version = record.get("version")
        rolled_back_to = record.get("rolled_back_to")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ConfigError(
                f"{where}: version is missing or not a positive integer", key="version"
            )
        if rolled_back_to is not None and not isinstance(rolled_back_to, int):
            raise ConfigError(f"{where}: rolled_back_to is not an integer", key="rolled_back_to")
        for key in ("pushed_at", "digest"):
            if not isinstance(record.get(key), str):
                raise ConfigError(f"{where}: {key} is missing or not a string", key=key)
        config = record.get("config")
        if not isinstance(config, dict):
            raise ConfigError(f"{where}: config is missing or not an object", key="config")
        source = record.get("source")
        return cls(
            version=version,
            pushed_at=record["pushed_at"],
            digest=record["digest"],
            config=parse_cluster_config(config, where=where),
            source=source if isinstance(source, str) else None,
            rolled_back_to=rolled_back_to,
        )


class PushResult(NamedTuple):
    version: int
    """The version now current."""
    changed: bool
    """False when the content was already the current version (nothing written)."""


def _peek(raw: bytes | None) -> tuple[int, str | None]:
    """The version and digest of a ``config`` node, tolerating anything unreadable."""
    if not raw:
        return 0, None
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return 0, None
    if not isinstance(record, dict):
        return 0, None
    version = record.get("version")
    digest = record.get("digest")
    return (
        version if isinstance(version, int) and version > 0 else 0,
        digest if isinstance(digest, str) else None,
    )


class ConfigStore:
    """Versioned cluster config under a cluster's base path."""

    def __init__(self, session: ZooKeeperSession) -> None:
        self._session = session
        self._watches: list[DataWatch] = []
        self._watching = True

    @property
    def config_path(self) -> str:
        return self._session.path(layout.CONFIG)

    @property
    def history_path(self) -> str:
        return self._session.path(layout.CONFIG_HISTORY)

    def _version_path(self, version: int) -> str:
        return self._session.path(layout.CONFIG_HISTORY, layout.history_node(version))

    # --- writing ---------------------------------------------------------------------------

    async def push(self, config: ClusterConfig, *, source: str) -> int:
        """Make ``config`` the current version; returns its version number.

        Content equal to the current version is not written again: its number is
        returned.
        """
        return (await self.commit(config, source=source)).version

    async def rollback(self, version: int, *, source: str = "rollback") -> int:
        """Push the content of an earlier ``version`` again, as a new version.

        History stays linear: the new version records ``rolled_back_to``. If that
        content is already current, nothing is written and the current version is
        returned.
        """
        earlier = await self.get(version)
        result = await self.commit(earlier.config, source=source, rolled_back_to=version)
        return result.version

    async def commit(
        self, config: ClusterConfig, *, source: str, rolled_back_to: int | None = None
    ) -> PushResult:
        """:meth:`push` that also says whether anything was written."""
        content = config.canonical()
        digest = config_digest(config)
        if len(canonical_json(config)) > MAX_NODE_BYTES:
            raise ConfigError(
                f"the cluster config is larger than {MAX_NODE_BYTES} bytes as JSON, "
                "more than a ZooKeeper node holds",
                key="config",
            )
        return await self._session.call(self._commit_sync, content, digest, source, rolled_back_to)

    def _commit_sync(
        self, content: dict[str, Any], digest: str, source: str, rolled_back_to: int | None
    ) -> PushResult:
        # A worker thread: blocking kazoo calls and a short sleep between attempts are fine.
        client = self._session.client
        client.ensure_path(self.history_path)
        for attempt in range(1, MAX_PUSH_ATTEMPTS + 1):
            try:
                raw, stat = client.get(self.config_path)
            except NoNodeError:
                raw, stat = None, None
            current, current_digest = _peek(raw)
            if current and current_digest == digest:
                return PushResult(current, changed=False)
            names = client.get_children(self.history_path)
            last = max((layout.version_of(n) for n in names if _HISTORY_NAME.match(n)), default=0)
            version = max(current, last) + 1
            record: dict[str, Any] = {
                "version": version,
                "pushed_at": _now(),
                "digest": digest,
                "source": source,
                "config": content,
            }
            if rolled_back_to is not None:
                record["rolled_back_to"] = rolled_back_to
            data = orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
            transaction = client.transaction()
            transaction.create(self._version_path(version), data)
            if stat is None:
                transaction.create(self.config_path, data)
            else:
                transaction.set_data(self.config_path, data, version=stat.version)
            results = transaction.commit()
            failures = [r for r in results if isinstance(r, Exception)]
            if not failures:
                log.info("cluster config version %d pushed (%s)", version, source)
                return PushResult(version, changed=True)
            if not any(isinstance(f, _CONFLICTS) for f in failures):
                raise failures[0]
            log.debug("config push lost a race (attempt %d); reading again", attempt)
            time.sleep(random.uniform(0.005, 0.05) * min(attempt, 10))
        raise CoordinationError(
            f"cluster config push lost {MAX_PUSH_ATTEMPTS} races to other pushes; try again"
        )

    # --- reading ---------------------------------------------------------------------------

    async def current(self) -> VersionedConfig | None:
        """The current version, or None if no config was ever pushed."""
        try:
            raw, _ = await self._session.call(self._session.client.get, self.config_path)
        except NoNodeError:
            return None
        return VersionedConfig.decode(raw, where=f"ZooKeeper node {self.config_path}")

    async def get(self, version: int) -> VersionedConfig:
        """One version from history; :class:`ConfigError` if there is no such version."""
        if version < 1:
            raise ConfigError(f"no cluster config version {version}", key="version")
        path = self._version_path(version)
        try:
            raw, _ = await self._session.call(self._session.client.get, path)
        except NoNodeError:
            raise ConfigError(f"no cluster config version {version}", key="version") from None
        return VersionedConfig.decode(raw, where=f"ZooKeeper node {path}")

    async def history(self) -> list[VersionedConfig]:
        """Every version ever pushed, oldest first."""
        raws = await self._session.call(self._history_sync)
        return [VersionedConfig.decode(raw, where=f"ZooKeeper node {path}") for path, raw in raws]

    def _history_sync(self) -> list[tuple[str, bytes]]:
        client = self._session.client
        try:
            names = client.get_children(self.history_path)
        except NoNodeError:
            return []
        found = []
        for name in sorted(n for n in names if _HISTORY_NAME.match(n)):
            path = self._session.path(layout.CONFIG_HISTORY, name)
            try:
                raw, _ = client.get(path)
            except NoNodeError:  # deleted by hand meanwhile
                continue
            found.append((path, raw))
        return found

    # --- watching --------------------------------------------------------------------------

    async def watch(self, callback: ConfigCallback) -> None:
        """Call ``callback`` on the event loop with the current config, then at every change.

        ``None`` means no config was pushed (or the node was deleted). A value that
        does not parse is logged (its key path, never content) and skipped: the
        previous config stays. kazoo's DataWatch re-reads the node when a new
        session connects, so the watch survives session loss.
        """
        loop = asyncio.get_running_loop()
        where = self.config_path

        def deliver(value: VersionedConfig | None) -> None:
            try:
                callback(value)
            except Exception as exc:  # a defect in the callback must not end the watch
                log.error("cluster config callback failed: %s", describe_failure(exc))

        def on_data(data: bytes | None, stat: Any, event: Any = None) -> bool | None:
            # kazoo's thread. Returning False ends the watch. Never raise: kazoo would
            # call again with fewer arguments on a TypeError.
            if not self._watching or loop.is_closed():
                return False
            value: VersionedConfig | None = None
            if stat is not None:
                try:
                    value = VersionedConfig.decode(data or b"", where=f"ZooKeeper node {where}")
                except ConfigError:
                    # Neither the content nor its key names: only that it does not validate.
                    log.error(
                        "cluster config at %s (node version %s) does not validate; "
                        "keeping the previous one",
                        where,
                        getattr(stat, "version", "?"),
                    )
                    return None
                except Exception as exc:
                    log.error("cannot read cluster config at %s: %s", where, type(exc).__name__)
                    return None
            try:
                loop.call_soon_threadsafe(deliver, value)
            except RuntimeError:  # the loop closed meanwhile
                return False
            return None

        watch = await self._session.call(DataWatch, self._session.client, where, on_data)
        self._watches.append(watch)

    def unwatch(self) -> None:
        """Stop every watch of this store (kazoo drops it at its next event)."""
        self._watching = False
