"""Instance settings: one typed, frozen model, from defaults < YAML file < env < CLI.

Every setting has one name, used everywhere: the YAML key (``mllp_port``), the
environment variable (``HL7BRIDGE_MLLP_PORT``) and the CLI option
(``--mllp-port``). Unknown keys are refused, never ignored, so a typo cannot
silently fall back to a default; the error names the key and where it came from.

The cluster-wide part of the configuration (accepted types, channels, rules)
will live in ZooKeeper; this module holds what one instance needs to start.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import uuid
import zoneinfo
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from bridge.coordination import ZooKeeperTls
from bridge.errors import ConfigError
from bridge.kafka import KafkaClientConfig
from bridge.normalize.context import MappingOptions

ENV_PREFIX = "HL7BRIDGE_"
#: Environment variables with the prefix that are not settings.
NON_SETTING_ENV = frozenset({"HL7BRIDGE_CONFIG", "HL7BRIDGE_LOG_FORMAT"})

#: The message families the bridge maps to FHIR (DESIGN.md §6).
DEFAULT_ACCEPTED_MESSAGE_TYPES = ("ADT", "ORU", "ORM", "OML", "VXU", "MDM", "SIU")

_ZNODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TOPIC_PREFIX = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
_MESSAGE_TYPE = re.compile(r"^(\*|[A-Z0-9]{3}(\^[A-Z0-9]{3})?)$")


def _default_instance_id() -> str:
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:60] or "host"
    return f"{host}-{uuid.uuid4().hex[:8]}"


def _server_context(
    listener: str, cert: Path | None, key: Path | None, client_ca: Path | None
) -> ssl.SSLContext | None:
    """A listener's TLS context (client certificates required with ``client_ca``)."""
    if cert is None or key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
        if client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=client_ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the {listener} TLS certificate, key or CA: {exc}",
            key=f"{listener.lower()}_tls_cert_file",
        ) from exc
    return context


class Settings(BaseModel):
    """Settings of one bridge instance. Units are in the names."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    # --- coordination -------------------------------------------------------------
    zookeeper: str = "127.0.0.1:2181"
    """ZooKeeper connect string, ``host:port[,host:port...][/chroot]``."""
    zookeeper_chroot: str | None = None
    """Base path of this cluster's znodes. Default ``/hl7bridge/<cluster>``."""
    zookeeper_session_timeout_s: float = Field(default=6.0, ge=1.0, le=60.0)
    """ZooKeeper session timeout; an instance that dies leaves the cluster after it."""
    zookeeper_digest: SecretStr | None = None
    """``user:password`` for ZooKeeper digest authentication; when set, every znode the
    bridge creates gets an ACL that allows this identity only."""
    zookeeper_tls: bool = False
    """Connect to ZooKeeper's secure client port over TLS (``secureClientPort``)."""
    zookeeper_tls_ca_file: Path | None = None
    """PEM CA bundle ZooKeeper's certificate is checked against (default: the system's)."""
    zookeeper_tls_cert_file: Path | None = None
    """PEM client certificate, for ``ssl.clientAuth=need`` (with its key file)."""
    zookeeper_tls_key_file: Path | None = None
    """PEM key of ``zookeeper_tls_cert_file``."""
    cluster: str = "default"
    """Cluster name: instances with the same name coordinate."""
    instance_id: str = Field(default_factory=_default_instance_id)
    """This instance's member name. Default: host name plus a random suffix."""

    # --- Kafka ----------------------------------------------------------------
    kafka: str = "127.0.0.1:9092"
    """Kafka bootstrap servers, ``host:port[,host:port...]``."""
    topic_prefix: str = "health"
    """Topic names are <prefix>.raw.hl7v2, <prefix>.events, <prefix>.dlq, ..."""
    kafka_idempotence: bool = True
    """Idempotent producer. Tansu (the embedded broker) does not support it: off in dev."""
    kafka_compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "lz4"
    """Producer compression. lz4 (default) shrinks FHIR events about five-fold for little
    CPU, which the broker and the network repay; gzip costs far more CPU."""
    kafka_linger_ms: int = Field(default=1, ge=0, le=1000)
    """How long the producer waits to fill a batch."""
    kafka_publish_timeout_s: float = Field(default=10.0, gt=0, le=300)
    """How long a message may wait for Kafka's acknowledgement before it is answered AR 207."""
    kafka_provision_topics: bool = True
    """Create missing topics at start."""
    kafka_partitions: int = Field(default=6, ge=1, le=1000)
    """Partitions of topics the bridge creates."""
    kafka_replication_factor: int = Field(default=1, ge=1, le=10)
    """Replication factor of topics the bridge creates (3 in production)."""
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    """How to reach Kafka: ``SSL`` (TLS), ``SASL_SSL`` (TLS and a user), ``SASL_PLAINTEXT``
    or ``PLAINTEXT``. Messages carry patient data: use TLS outside one trusted host."""
    kafka_ssl_ca_file: Path | None = None
    """PEM CA bundle the brokers' certificates are checked against (default: the system's)."""
    kafka_ssl_cert_file: Path | None = None
    """PEM client certificate, for brokers that require mutual TLS (with its key file)."""
    kafka_ssl_key_file: Path | None = None
    """PEM key of ``kafka_ssl_cert_file``."""
    kafka_ssl_check_hostname: bool = True
    """Check that a broker's certificate names the host connected to."""
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-512"
    """SASL mechanism (``SASL_SSL``, ``SASL_PLAINTEXT``)."""
    kafka_sasl_username: str | None = None
    """SASL user name."""
    kafka_sasl_password: SecretStr | None = None
    """SASL password (better from the environment, ``HL7BRIDGE_KAFKA_SASL_PASSWORD``)."""

    # --- MLLP -----------------------------------------------------------------
    mllp_host: str = "0.0.0.0"
    """Address the MLLP listener binds."""
    mllp_port: int = Field(default=2575, ge=0, le=65535)
    """MLLP port (0 = any free port)."""
    max_frame_bytes: int = Field(default=1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    """Largest MLLP frame accepted; a larger one is answered AE 207."""
    idle_timeout_s: float = Field(default=300.0, gt=0)
    """An MLLP connection silent this long is closed."""
    max_queued_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """MLLP frames received and not yet handled, across all connections, at most; past
    it connections pause reading (TCP backpressure) until half of it is handled."""
    max_connections: int = Field(default=1000, ge=1, le=100_000)
    """Open MLLP connections at most; one more is answered AR 207 and closed."""

    mllp_tls_cert_file: Path | None = None
    """PEM certificate (chain) of the MLLP listener; set with the key to serve MLLP over TLS."""
    mllp_tls_key_file: Path | None = None
    """PEM private key of that certificate."""
    mllp_tls_client_ca_file: Path | None = None
    """PEM CA bundle: when set, senders must present a client certificate it signed (mTLS)."""
    mllp_proxy_protocol: bool = False
    """Behind a load balancer that sends the PROXY protocol (HAProxy ``send-proxy-v2``,
    a cloud balancer's proxy protocol): read the header every connection starts with,
    so logs and DLQ records name the sender, not the balancer. A connection without
    it is closed. Not with MLLP TLS at the bridge (the header precedes the handshake)."""

    # --- HTTP -----------------------------------------------------------------
    http_host: str = "0.0.0.0"
    """Address the HTTP server binds."""
    http_port: int = Field(default=8080, ge=0, le=65535)
    """HTTP port for FHIR ingest (/fhir), /healthz, /readyz, /metrics (0 = any free port)."""
    http_tls_cert_file: Path | None = None
    """PEM certificate (chain) of the HTTP listener; set with the key to serve FHIR,
    health, metrics and the dashboard over HTTPS."""
    http_tls_key_file: Path | None = None
    """PEM private key of that certificate."""
    http_tls_client_ca_file: Path | None = None
    """PEM CA bundle: when set, HTTPS clients must present a certificate it signed."""

    # --- FHIR REST ingest (under /fhir on the HTTP port) -------------------------
    fhir_max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1024, le=1024**3)
    """A FHIR request body larger than this is refused with 413."""
    fhir_request_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    """A FHIR request body that has not fully arrived after this long is refused with 408."""
    fhir_max_in_flight: int = Field(default=256, ge=1, le=100_000)
    """FHIR requests being handled at once, at most; one more is answered 503 with
    Retry-After at once (bounded memory under any load)."""
    fhir_retry_after_s: int = Field(default=10, ge=1, le=3600)
    """Retry-After (seconds) of a 503 answer when Kafka could not take a write."""

    # --- acknowledgement mode -------------------------------------------------
    ack_mode: Literal["kafka", "spool"] = "kafka"
    """When an HL7 v2 message is acknowledged: ``kafka`` once Kafka has it (acks=all);
    ``spool`` once it is fsync'ed to the local store-and-forward spool, which forwards
    to Kafka in order (and drains first after a restart)."""
    spool_path: Path | None = None
    """The spool database file (ack_mode spool). Default: ``hl7bridge-spool/<instance_id>.db``
    in the working directory."""
    spool_max_bytes: int = Field(default=1024**3, ge=1024)
    """The spool's size bound; when it is full messages are answered AR 207."""

    # --- remote diagnosis -----------------------------------------------------
    diagnosis_closed_retention_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    """How long a finished case's marker is kept, so that a resent event does not
    open the case again (the leader reaps older markers)."""

    # --- HL7 v2 handling -----------------------------------------------------
    accept_message_types: tuple[str, ...] = DEFAULT_ACCEPTED_MESSAGE_TYPES
    """Message families (``ADT``), exact types (``ADT^A01``) or ``*`` for all."""
    dedupe_window_s: float = Field(default=3600.0, ge=0)
    """A resent message (same sender, same MSH-10) within this window is not published again."""
    mapping_workers: int = Field(default=1, ge=0, le=64)
    """Processes that map HL7 v2 to FHIR beside the event loop (0 = in it). The mapping
    is CPU-bound Python: a worker keeps it from delaying other connections' ACKs."""
    strict_mapping: bool = False
    """Refuse (AE, to the DLQ) a message with content the FHIR mapping does not carry."""
    identifier_systems: dict[str, str] = Field(default_factory=dict)
    """Assigning authority (CX-4.1) → Identifier.system URI, e.g. ``{MRN: urn:oid:1.2.3}``.
    Default for an unlisted authority: ``urn:oid:`` for OIDs, else
    ``urn:hl7bridge:authority:<namespace>``. As an option or env: ``NS=URI,NS2=URI2``."""
    hl7_default_timezone: str = "UTC"
    """IANA time zone (e.g. America/Chicago) of HL7 timestamps sent without a UTC offset:
    set it to the senders' local zone; FHIR needs an offset on every time."""
    dedupe_max_entries: int = Field(default=200_000, ge=0)
    """Accepted messages remembered for duplicate detection at most."""

    # --- lifecycle ------------------------------------------------------------
    drain_timeout_s: float = Field(default=10.0, ge=0)
    """On stop, how long messages in flight may take to finish."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level (logs carry ids and counts, never patient data)."""

    @field_validator("cluster", "instance_id")
    @classmethod
    def _znode_name(cls, value: str) -> str:
        if not _ZNODE_NAME.match(value):
            raise ValueError("must be 1-128 characters of letters, digits, '.', '_' or '-'")
        return value

    @field_validator("topic_prefix")
    @classmethod
    def _topic_prefix(cls, value: str) -> str:
        if not _TOPIC_PREFIX.match(value):
            raise ValueError("must be 1-100 characters of letters, digits, '.', '_' or '-'")
        return value

    @field_validator("zookeeper_chroot")
    @classmethod
    def _chroot(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith("/") or value.endswith("/") or "//" in value:
            raise ValueError("must be an absolute znode path like /hl7bridge/prod")
        return value

    @field_validator("zookeeper", "kafka")
    @classmethod
    def _servers(cls, value: str) -> str:
        servers = value.split("/", 1)[0]
        for server in servers.split(","):
            host, sep, port = server.strip().rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError("must be host:port[,host:port...]")
        return value

    @field_validator("hl7_default_timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError("must be an IANA time zone name like UTC or Europe/Berlin") from None
        return value

    @field_validator("identifier_systems", mode="before")
    @classmethod
    def _systems_from_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            pairs = [p.strip() for p in value.split(",") if p.strip()]
            if any("=" not in p for p in pairs):
                raise ValueError("must be NAMESPACE=URI[,NAMESPACE=URI...]")
            return dict(p.split("=", 1) for p in pairs)
        return value

    @field_validator("accept_message_types", mode="before")
    @classmethod
    def _accept_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part for part in re.split(r"[,\s]+", value) if part]
        return value

    @field_validator("accept_message_types")
    @classmethod
    def _accept_entries(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("must name at least one message type (or '*')")
        for entry in value:
            if not _MESSAGE_TYPE.match(entry):
                raise ValueError(
                    f"entry {entry!r} is not '*', a family like ADT or a type like ADT^A01"
                )
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        for listener in ("mllp", "http"):
            cert, key, ca = (f"{listener}_tls_{n}_file" for n in ("cert", "key", "client_ca"))
            if (getattr(self, cert) is None) != (getattr(self, key) is None):
                raise ValueError(f"{cert} and {key} must be set together")
            if getattr(self, ca) is not None and getattr(self, cert) is None:
                raise ValueError(f"{ca} needs {cert} and its key")
            for name in (cert, key, ca):
                path = getattr(self, name)
                if path is not None and not path.is_file():
                    raise ValueError(f"{name}: no such file {path}")
        return self

    @model_validator(mode="after")
    def _zookeeper_tls(self) -> Settings:
        files = ("zookeeper_tls_ca_file", "zookeeper_tls_cert_file", "zookeeper_tls_key_file")
        for name in files:
            path = getattr(self, name)
            if path is not None and not self.zookeeper_tls:
                raise ValueError(f"{name} is set but zookeeper_tls is false")
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: no such file {path}")
        if (self.zookeeper_tls_cert_file is None) != (self.zookeeper_tls_key_file is None):
            raise ValueError(
                "zookeeper_tls_cert_file and zookeeper_tls_key_file must be set together"
            )
        return self

    def zookeeper_tls_options(self) -> ZooKeeperTls | None:
        """How to reach ZooKeeper over TLS, or None for plain connections."""
        if not self.zookeeper_tls:
            return None
        return ZooKeeperTls(
            self.zookeeper_tls_ca_file, self.zookeeper_tls_cert_file, self.zookeeper_tls_key_file
        )

    @model_validator(mode="after")
    def _proxy_protocol(self) -> Settings:
        if self.mllp_proxy_protocol and self.mllp_tls_cert_file is not None:
            raise ValueError(
                "mllp_proxy_protocol cannot be combined with MLLP TLS at the bridge: "
                "terminate TLS at the load balancer, or pass TLS through without the header"
            )
        return self

    @model_validator(mode="after")
    def _kafka_security(self) -> Settings:
        protocol = self.kafka_security_protocol
        tls_files = ("kafka_ssl_ca_file", "kafka_ssl_cert_file", "kafka_ssl_key_file")
        if protocol not in ("SSL", "SASL_SSL"):
            for name in tls_files:
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} is set but kafka_security_protocol is {protocol}")
        if (self.kafka_ssl_cert_file is None) != (self.kafka_ssl_key_file is None):
            raise ValueError("kafka_ssl_cert_file and kafka_ssl_key_file must be set together")
        for name in tls_files:
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: no such file {path}")
        sasl = protocol.startswith("SASL_")
        if sasl and (self.kafka_sasl_username is None or self.kafka_sasl_password is None):
            raise ValueError(
                f"kafka_security_protocol {protocol} needs kafka_sasl_username and "
                "kafka_sasl_password"
            )
        if not sasl and (self.kafka_sasl_username is not None or self.kafka_sasl_password):
            raise ValueError(f"a SASL user is set but kafka_security_protocol is {protocol}")
        return self

    def kafka_client(self) -> KafkaClientConfig:
        """How every Kafka client of the bridge connects (bootstrap servers, TLS, SASL)."""
        context = None
        if self.kafka_security_protocol in ("SSL", "SASL_SSL"):
            try:
                context = ssl.create_default_context(cafile=self.kafka_ssl_ca_file)
                context.check_hostname = self.kafka_ssl_check_hostname
                if self.kafka_ssl_cert_file is not None and self.kafka_ssl_key_file is not None:
                    context.load_cert_chain(self.kafka_ssl_cert_file, self.kafka_ssl_key_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"cannot load the Kafka TLS CA, certificate or key: {exc}",
                    key="kafka_ssl_ca_file",
                ) from exc
        password = self.kafka_sasl_password
        return KafkaClientConfig(
            self.kafka,
            security_protocol=self.kafka_security_protocol,
            ssl_context=context,
            sasl_mechanism=self.kafka_sasl_mechanism,
            sasl_username=self.kafka_sasl_username,
            sasl_password=None if password is None else password.get_secret_value(),
        )

    def mllp_ssl_context(self) -> ssl.SSLContext | None:
        """The MLLP listener's TLS context, or None for plain MLLP."""
        return _server_context(
            "MLLP", self.mllp_tls_cert_file, self.mllp_tls_key_file, self.mllp_tls_client_ca_file
        )

    def http_ssl_context(self) -> ssl.SSLContext | None:
        """The HTTP listener's TLS context, or None for plain HTTP."""
        return _server_context(
            "HTTP", self.http_tls_cert_file, self.http_tls_key_file, self.http_tls_client_ca_file
        )

    def mapping_options(self) -> MappingOptions:
        """The settings that change what a message maps to (pipeline and convert alike)."""
        return MappingOptions(
            identifier_systems=dict(self.identifier_systems),
            default_timezone=self.hl7_default_timezone,
        )

    # --- derived ----------------------------------------------------------------
    @property
    def zookeeper_digest_value(self) -> str | None:
        return None if self.zookeeper_digest is None else self.zookeeper_digest.get_secret_value()

    @property
    def zookeeper_servers(self) -> str:
        """The connect string without any chroot suffix."""
        return self.zookeeper.split("/", 1)[0]

    @property
    def zookeeper_base_path(self) -> str:
        """Where this cluster's znodes live: connect-string chroot + cluster chroot."""
        _, _, hosts_chroot = self.zookeeper.partition("/")
        prefix = "/" + hosts_chroot.strip("/") if hosts_chroot.strip("/") else ""
        return prefix + (self.zookeeper_chroot or f"/hl7bridge/{self.cluster}")


SETTING_NAMES: frozenset[str] = frozenset(Settings.model_fields)


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def option_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML config file; the document must be a mapping of setting names."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}", key="config") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}", key="config") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings", key="config")
    return {str(k): v for k, v in data.items()}


def env_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """Settings from ``HL7BRIDGE_*`` variables; an unknown variable is an error."""
    found: dict[str, str] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name in NON_SETTING_ENV:
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in SETTING_NAMES:
            raise ConfigError(f"unknown setting in environment variable {name}", key=key)
        found[key] = value
    return found


def build_settings(
    *,
    file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    cli: Mapping[str, Any] | None = None,
    base: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge the layers (``base`` < file < env < cli) and validate once.

    Each value remembers its origin, so an error names both the key and where it
    was set (``mllp_port (from HL7BRIDGE_MLLP_PORT): ...``).
    """
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}

    def layer(values: Mapping[str, Any], describe: Any) -> None:
        for key, value in values.items():
            if key not in SETTING_NAMES:
                raise ConfigError(f"unknown setting {key!r} ({describe(key)})", key=key)
            merged[key] = value
            origin[key] = describe(key)

    layer(base or {}, lambda k: "default for this command")
    if file is not None:
        layer(load_yaml(file), lambda k: f"config file {file}")
    layer(env_settings(os.environ if environ is None else environ), env_name)
    layer({k: v for k, v in (cli or {}).items() if v is not None}, option_name)
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        problems = []
        key = None
        for error in exc.errors():
            if not error["loc"]:  # a rule across settings: its message names them
                problems.append(error["msg"].removeprefix("Value error, "))
                continue
            key = str(error["loc"][0])
            where = f" (from {origin[key]})" if key in origin else ""
            problems.append(f"{key}{where}: {error['msg']}")
        raise ConfigError("invalid setting " + "; ".join(problems), key=key) from None
