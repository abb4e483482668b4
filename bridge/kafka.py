"""Kafka topics and the publisher: acks=all, results awaited, errors mapped to ours.

aiokafka batches records in the background; ``publish`` enqueues and awaits the
delivery future of each record, so a caller knows a record is durable (acks=all)
before it answers its sender. Records that Kafka cannot take within
``kafka_publish_timeout_s`` fail with :class:`PublishError`; the producer's own
``request_timeout_ms`` is set to the same bound so that a record we gave up on
is also expired by aiokafka rather than delivered later behind our back.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from bridge.errors import LifecycleError, PublishError

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]


SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


@dataclass(frozen=True, slots=True)
class KafkaClientConfig:
    """Where Kafka is and how to connect to it: what every producer, consumer and admin
    client of the bridge is built with. ``str()`` is the bootstrap string, for messages
    (never the password)."""

    bootstrap: str
    security_protocol: SecurityProtocol = "PLAINTEXT"
    ssl_context: ssl.SSLContext | None = None
    sasl_mechanism: SaslMechanism = "SCRAM-SHA-512"
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return self.bootstrap

    def options(self) -> dict[str, Any]:
        """Keyword arguments for aiokafka's clients."""
        out: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap,
            "security_protocol": self.security_protocol,
        }
        if self.security_protocol in ("SSL", "SASL_SSL"):
            out["ssl_context"] = self.ssl_context or ssl.create_default_context()
        if self.security_protocol.startswith("SASL_"):
            out["sasl_mechanism"] = self.sasl_mechanism
            out["sasl_plain_username"] = self.sasl_username
            out["sasl_plain_password"] = self.sasl_password
        return out


#: A plain bootstrap string (no TLS, no SASL) or a full client config.
KafkaAddress = KafkaClientConfig | str


def kafka_options(kafka: KafkaAddress) -> dict[str, Any]:
    """aiokafka keyword arguments for ``kafka``: bootstrap servers, TLS, SASL."""
    if isinstance(kafka, KafkaClientConfig):
        return kafka.options()
    return {"bootstrap_servers": kafka}


@dataclass(frozen=True, slots=True)
class Topics:
    """The topic names of one deployment, all derived from the prefix."""

    prefix: str

    @property
    def raw_hl7v2(self) -> str:
        return f"{self.prefix}.raw.hl7v2"

    @property
    def raw_fhir(self) -> str:
        return f"{self.prefix}.raw.fhir"

    @property
    def events(self) -> str:
        return f"{self.prefix}.events"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}.dlq"

    @property
    def diagnosis(self) -> str:
        return f"{self.prefix}.diagnosis"

    def all(self) -> tuple[str, ...]:
        return (self.raw_hl7v2, self.raw_fhir, self.events, self.dlq, self.diagnosis)


@dataclass(frozen=True, slots=True)
class OutRecord:
    topic: str
    value: bytes
    key: bytes | None
    headers: Headers


@dataclass(frozen=True, slots=True)
class Delivered:
    """Where Kafka stored a record: the coordinates diagnosis cases point at."""

    topic: str
    partition: int
    offset: int


class KafkaPublisher:
    """A started aiokafka producer with acks=all and awaited deliveries."""

    def __init__(
        self,
        bootstrap: KafkaAddress,
        *,
        client_id: str,
        idempotence: bool,
        compression: str = "none",
        linger_ms: int = 1,
        publish_timeout_s: float = 10.0,
    ) -> None:
        self._bootstrap = bootstrap
        self._client_id = client_id
        self._idempotence = idempotence
        self._compression = None if compression == "none" else compression
        self._linger_ms = linger_ms
        self._publish_timeout_s = publish_timeout_s
        self._producer: AIOKafkaProducer | None = None
        self._stopped = False

    @property
    def started(self) -> bool:
        return self._producer is not None and not self._stopped

    async def start(self) -> None:
        if self._producer is not None:
            raise LifecycleError("KafkaPublisher.start() called twice")
        timeout_ms = int(self._publish_timeout_s * 1000)
        producer = AIOKafkaProducer(
            **kafka_options(self._bootstrap),
            client_id=self._client_id,
            acks="all",
            enable_idempotence=self._idempotence,
            compression_type=self._compression,
            linger_ms=self._linger_ms,
            request_timeout_ms=timeout_ms,
            # Keep a record's total time in aiokafka within our bound.
            retry_backoff_ms=100,
            max_request_size=16 * 1024 * 1024,
            # One partition's batch per produce request: aiokafka's default of 16 KB
            # holds a single FHIR event (an ORU with ten results is ~16 KB), which
            # caps throughput at a few events per request round trip.
            max_batch_size=1024 * 1024,
        )
        self._producer = producer
        try:
            await producer.start()
        except KafkaError as exc:
            await producer.stop()
            raise PublishError(
                f"cannot connect to Kafka at {self._bootstrap}: {type(exc).__name__}"
            ) from exc

    async def stop(self) -> None:
        """Flush what is in flight and close. Idempotent."""
        if self._producer is None or self._stopped:
            return
        self._stopped = True
        try:
            await self._producer.stop()
        except KafkaError as exc:  # pragma: no cover - best effort on shutdown
            log.warning("kafka producer stop failed: %s", type(exc).__name__)

    async def missing_topics(self, topics: Iterable[str]) -> set[str]:
        """Those of ``topics`` the broker does not know, from freshly fetched metadata.

        Raises :class:`PublishError` if the broker cannot be asked.
        """
        producer = self._producer
        if producer is None or self._stopped:
            raise PublishError("the Kafka publisher is not running")
        try:
            async with asyncio.timeout(self._publish_timeout_s):
                metadata = await producer.client.fetch_all_metadata()
        except KafkaError as exc:
            raise PublishError(f"no Kafka metadata: {type(exc).__name__}") from exc
        except TimeoutError as exc:
            raise PublishError(f"no Kafka metadata within {self._publish_timeout_s:g} s") from exc
        return set(topics) - set(metadata.topics())

    async def publish(self, records: Sequence[OutRecord]) -> list[Delivered]:
        """Send records and wait until Kafka acknowledged every one (acks=all).

        Raises :class:`PublishError` if any record is not acknowledged in time.
        Records are enqueued in order before any is awaited, so they share
        batches and per-key order is kept.
        """
        producer = self._producer
        if producer is None or self._stopped:
            raise PublishError("the Kafka publisher is not running")
        try:
            async with asyncio.timeout(self._publish_timeout_s + 2.0):
                futures = [
                    await producer.send(r.topic, r.value, key=r.key, headers=r.headers)
                    for r in records
                ]
                results = await asyncio.gather(*futures)
        except KafkaError as exc:
            raise PublishError(f"Kafka did not acknowledge: {type(exc).__name__}") from exc
        except TimeoutError as exc:
            raise PublishError(
                f"Kafka did not acknowledge within {self._publish_timeout_s:g} s"
            ) from exc
        return [Delivered(m.topic, m.partition, m.offset) for m in results]


async def ensure_topics(
    bootstrap: KafkaAddress,
    topics: Sequence[str],
    *,
    partitions: int = 3,
    replication_factor: int = 1,
    timeout_s: float = 15.0,
) -> None:
    """Create those of ``topics`` that do not exist yet; existing ones are left as they are.

    Raises :class:`PublishError` (cause kept) if the broker cannot be reached in
    ``timeout_s`` or refuses a topic.
    """
    admin = AIOKafkaAdminClient(
        **kafka_options(bootstrap), request_timeout_ms=int(timeout_s * 1000)
    )
    try:
        async with asyncio.timeout(timeout_s):
            try:
                await admin.start()
                existing = set(await admin.list_topics())
                missing = [name for name in dict.fromkeys(topics) if name not in existing]
                if not missing:
                    return
                response = await admin.create_topics(
                    [NewTopic(name, partitions, replication_factor) for name in missing],
                    timeout_ms=int(timeout_s * 1000),
                )
            finally:
                await admin.close()
    except TimeoutError as exc:
        raise PublishError(
            f"topics not created: no answer from {bootstrap} in {timeout_s:g} s"
        ) from exc
    except KafkaError as exc:
        raise PublishError(f"topics not created on {bootstrap}: {type(exc).__name__}") from exc
    for entry in response.to_object()["topic_errors"]:
        error_type = for_code(entry["error_code"]) if entry["error_code"] else None
        if error_type is not None and error_type is not TopicAlreadyExistsError:
            cause = error_type(entry.get("error_message") or "")
            raise PublishError(
                f"topic {entry['topic']!r} not created on {bootstrap}: {error_type.__name__}"
            ) from cause
