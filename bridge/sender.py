"""``hl7bridge send``: an MLLP sender for testers and integration analysts.

Messages go out one at a time on one connection; each waits for its ACK, as
an EHR interface engine does. Per message it prints where the message came
from (file and position), MSA-1, MSA-2 and any ERR. A timeout or a dropped
connection counts as a failure and the next message gets a fresh connection,
since the old stream's state is unknown.
"""

from __future__ import annotations

import ssl
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson

from adapters.hl7v2.er7 import parse_message
from adapters.hl7v2.files import read_files
from adapters.mllp.client import MLLPClient
from bridge.errors import BridgeError, ConfigError

ACCEPTED = frozenset({"AA", "CA"})


@dataclass(slots=True)
class AckSummary:
    file: str
    index: int
    ack_code: str
    control_id: str
    errors: list[dict[str, str]] = field(default_factory=list)
    problem: str | None = None

    @property
    def accepted(self) -> bool:
        return self.ack_code in ACCEPTED

    def line(self) -> str:
        text = f"{self.file}#{self.index} {self.ack_code} {self.control_id}".rstrip()
        if self.problem:
            text += f" ({self.problem})"
        for err in self.errors:
            parts = [err.get("code", ""), err.get("location", ""), err.get("text", "")]
            text += "\n  ERR " + " ".join(p for p in parts if p)
        return text


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"address {address!r} is not HOST:PORT", key="address")
    return host.strip("[]"), int(port)


def _location(parts: list[str]) -> str:
    """An ERL (segment^sequence^field^repetition^component) as ``MSH-10`` or ``PID-7.1``."""
    parts = parts + [""] * (5 - len(parts))
    segment, field_no, component = parts[0], parts[2], parts[4]
    if not field_no:
        return segment
    return f"{segment}-{field_no}" + (f".{component}" if component else "")


def summarize_ack(file: str, index: int, ack: bytes) -> AckSummary:
    """MSA-1, MSA-2 and the ERR segments of an ACK (any version's ERR layout)."""
    try:
        message = parse_message(ack)
    except BridgeError:
        return AckSummary(file, index, "??", "", problem="the answer is not an HL7 ACK")
    summary = AckSummary(file, index, message.field("MSA", 1) or "??", message.field("MSA", 2))
    if message.segment("MSA") is None:
        summary.problem = "the answer has no MSA segment"
    enc = message.encoding
    for err in message.all_segments("ERR"):
        fields = err + [""] * (9 - len(err))
        if fields[3]:  # v2.5+: ERR-2 location, ERR-3 code^text^table, ERR-8 user message
            code, _, rest = fields[3].partition(enc.component)
            text = fields[8] or rest.split(enc.component)[0]
            location = _location(fields[2].split(enc.component))
            summary.errors.append({"code": code, "location": location, "text": text})
            continue
        # v2.3/2.4: ERR-1 repeats, one segment^sequence^field^code&text&table each
        for entry in filter(None, fields[1].split(enc.repetition)):
            components = entry.split(enc.component)
            code_text = components[3].split(enc.subcomponent) if len(components) > 3 else [""]
            summary.errors.append(
                {
                    "code": code_text[0],
                    "location": _location(components[:3]),
                    "text": code_text[1] if len(code_text) > 1 else "",
                }
            )
    return summary


def client_tls_context(
    *, enabled: bool, ca_file: Path | None, cert_file: Path | None, key_file: Path | None
) -> ssl.SSLContext | None:
    """The TLS context for ``send``: verification always on; a client certificate
    when asked (cert and key go together)."""
    if not enabled:
        return None
    if (cert_file is None) != (key_file is None):
        raise ConfigError("--tls-cert-file and --tls-key-file go together", key="tls_cert_file")
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        if cert_file is not None and key_file is not None:
            context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS files: {exc}", key="tls_ca_file") from exc
    return context


async def send_files(
    host: str,
    port: int,
    files: list[Path],
    *,
    timeout_s: float,
    as_json: bool,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> int:
    """Send every message in ``files``; 0 if every answer was AA/CA, else 1."""
    batches = read_files(files)

    failures = 0
    client: MLLPClient | None = None
    try:
        for name, messages in batches:
            for index, message in enumerate(messages, start=1):
                try:
                    if client is None:
                        client = await MLLPClient.connect(
                            host,
                            port,
                            timeout_s=timeout_s,
                            ssl=tls,
                            server_hostname=server_hostname if tls is not None else None,
                        )
                    ack = await client.send(message, timeout_s=timeout_s)
                    summary = summarize_ack(name, index, ack)
                except (TimeoutError, ConnectionError, OSError) as exc:  # ssl.SSLError too
                    problem = "timed out" if isinstance(exc, TimeoutError) else str(exc)
                    summary = AckSummary(name, index, "--", "", problem=problem)
                    if client is not None:
                        await client.close()
                    client = None
                if not summary.accepted:
                    failures += 1
                out = orjson.dumps(asdict(summary)).decode() if as_json else summary.line()
                print(out, flush=True)
    finally:
        if client is not None:
            await client.close()
    total = sum(len(m) for _, m in batches)
    print(f"{total - failures} accepted, {failures} not accepted", file=sys.stderr)
    return 0 if failures == 0 else 1
