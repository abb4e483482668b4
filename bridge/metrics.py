"""Prometheus metrics of one bridge instance (its own registry: no globals).

Labels hold codes and names from closed sets (ack codes, accepted message
types, reasons): never an identifier, never anything from a patient.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

#: Latency buckets for the ACK path, in seconds (the target p99 is 25 ms).
_ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)


class BridgeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.messages = Counter(
            "hl7bridge_messages_total",
            "Messages answered, by channel, acknowledgement code and message type.",
            ("channel", "ack_code", "message_type"),
            registry=self.registry,
        )
        self.rejections = Counter(
            "hl7bridge_rejections_total",
            "Messages not accepted, by reason (error class) and HL7 table 0357 code.",
            ("channel", "reason", "err_code"),
            registry=self.registry,
        )
        self.duplicates = Counter(
            "hl7bridge_duplicates_total",
            "Resent messages answered without publishing again.",
            ("channel",),
            registry=self.registry,
        )
        self.control_id_reuse = Counter(
            "hl7bridge_control_id_reuse_total",
            "Messages whose control id was seen before with different content (published).",
            ("channel",),
            registry=self.registry,
        )
        self.dlq_failures = Counter(
            "hl7bridge_dlq_failures_total",
            "Rejected messages that could not be written to the DLQ (answered AR 207 instead).",
            ("channel",),
            registry=self.registry,
        )
        self.ack_latency = Histogram(
            "hl7bridge_ack_latency_seconds",
            "Time from a complete frame to its acknowledgement.",
            ("channel",),
            buckets=_ACK_BUCKETS,
            registry=self.registry,
        )
        self.fhir_requests = Counter(
            "hl7bridge_fhir_requests_total",
            "FHIR REST requests answered, by interaction and HTTP status.",
            ("interaction", "status"),
            registry=self.registry,
        )
        self.connections = Gauge(
            "hl7bridge_mllp_connections",
            "Open MLLP connections.",
            registry=self.registry,
        )
        self.dedupe_entries = Gauge(
            "hl7bridge_dedupe_entries",
            "Accepted messages remembered for duplicate detection (bounded by "
            "dedupe_max_entries), by ingest: hl7v2 or fhir.",
            ("ingest",),
            registry=self.registry,
        )
        self.spool_messages = Gauge(
            "hl7bridge_spool_messages",
            "Messages in the store-and-forward spool not yet acknowledged by Kafka "
            "(ack_mode spool).",
            registry=self.registry,
        )
        self.spool_bytes = Gauge(
            "hl7bridge_spool_bytes",
            "Size of the spooled messages (bounded by spool_max_bytes).",
            registry=self.registry,
        )
        self.ready = Gauge(
            "hl7bridge_ready",
            "1 when the instance accepts traffic (Kafka and ZooKeeper reachable).",
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
