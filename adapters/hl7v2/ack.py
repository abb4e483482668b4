"""HL7 v2 acknowledgement (ACK) building, by hand and fast (no hl7apy).

The ACK answers the sender of one message (DESIGN §5):

* MSH: the original's delimiters; sender and receiver swapped (MSH-3/4 are the
  original MSH-5/6 and the other way round, copied as raw ER7); MSH-7 now, UTC;
  MSH-9 ``ACK^<trigger>^ACK`` (v2.4+), ``ACK^<trigger>`` (v2.2 to v2.3.1),
  ``ACK`` (v2.1, or no trigger); MSH-10 a fresh control id; MSH-11 and MSH-12
  the original's (defaults ``P`` and ``2.5.1``); MSH-18 the original's, and the
  ACK bytes are encoded with the codec the message was decoded with.
* MSA-1 the acknowledgement code, MSA-2 the original MSH-10 (always present,
  empty when unknown).
* Errors, HL7 table 0357 codes:

  - v2.5 and later: one ERR per error, ERR-2 the location (``MSH^1^10``),
    ERR-3 ``<code>^<text>^HL70357``, ERR-4 the severity, ERR-8 the message
    for a person (escaped, at most 250 characters). MSA-3 is deprecated since
    v2.5 and left empty.
  - before v2.5: MSA-3 carries the text (at most 80 characters: many old
    receivers show it to an operator), MSA-6 (v2.3/2.4) the first error
    condition, and a single ERR segment (the ACK structure allows only one)
    whose repeating ERR-1 holds one ELD per error:
    ``MSH^1^10^207&Application internal error&HL70357``.

* ``text`` is the message for a person. Before v2.5 it goes in MSA-3 (default:
  the first error's message). From v2.5 it replaces ERR-8 of the first ERR; with
  no errors it gets its own ERR (code 0, severity I for an accepting code; 207,
  severity E otherwise).

Segments end with CR, the last one included; there is no MLLP framing here.

Enhanced acknowledgement mode: when MSH-15 (accept acknowledgement type) is
valued, the bridge's answer is an accept (commit) acknowledgement, so the codes
become CA / CE / CR. With MSH-15 = NE (or ER, SU) the sender asked for no accept
ACK in some cases; the bridge answers anyway, because MLLP senders block until
they read a reply, and an unanswered frame is retransmitted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Final

from adapters.hl7v2.er7 import (
    DEFAULT_ENCODING,
    EncodingChars,
    MessageHeader,
    codec_for_charset,
    escape,
    header_for_unparseable,
)
from bridge.errors import BridgeError

__all__ = [
    "ACK_CODES",
    "TABLE_0357",
    "AckError",
    "ack_code_for",
    "ack_error_from",
    "build_ack",
    "commit_mode",
    "header_for_unparseable",
    "map_ack_code",
]

#: HL7 table 0357, message error condition codes, with their standard texts.
TABLE_0357: Final[dict[str, str]] = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "104": "Value too long",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}

#: MSA-1 values (table 0008): original mode A*, enhanced mode commit C*.
ACK_CODES: Final[frozenset[str]] = frozenset({"AA", "AE", "AR", "CA", "CE", "CR"})

#: Version used when the original's is unknown (the header could not be read).
DEFAULT_VERSION: Final = "2.5.1"
#: MSA-3 is ST(80) in v2.1 to v2.4.
MSA3_MAX_CHARS: Final = 80
#: ERR-8 is TX(250) in v2.5+.
ERR8_MAX_CHARS: Final = 250

_ACCEPTING: Final = frozenset({"AA", "CA"})
_TO_COMMIT: Final = {"AA": "CA", "AE": "CE", "AR": "CR"}
_TO_ORIGINAL: Final = {"CA": "AA", "CE": "AE", "CR": "AR"}
_LOCATION_RE: Final = re.compile(
    r"([A-Z][A-Z0-9]{2})(?:\[(\d+)\])?(?:-(\d+)(?:\.(\d+)(?:\.(\d+))?)?)?"
)


@dataclass(frozen=True, slots=True)
class AckError:
    """One error to report in the ACK. ``message`` must carry no patient data."""

    code: str
    location: str | None
    message: str
    #: Table 0516: E error, W warning, I information (F fatal, v2.6+).
    severity: str = "E"


def ack_error_from(exc: BridgeError) -> AckError:
    """The ACK error for a bridge exception (its table 0357 code and location)."""
    return AckError(code=exc.err_code, location=exc.location, message=exc.message)


def commit_mode(header: MessageHeader | None) -> bool:
    """True when the sender asked for enhanced mode accept acknowledgements (MSH-15)."""
    return header is not None and bool(header.accept_ack_type.strip())


def map_ack_code(code: str, header: MessageHeader | None) -> str:
    """``code`` in the mode the sender uses: AA/AE/AR become CA/CE/CR in commit mode."""
    if commit_mode(header):
        return _TO_COMMIT.get(code, code)
    return _TO_ORIGINAL.get(code, code)


def ack_code_for(header: MessageHeader | None, outcome: bool | BridgeError) -> str:
    """MSA-1 for an outcome: True (accepted), False (content error) or the error raised."""
    if outcome is True:
        code = "AA"
    elif outcome is False:
        code = "AE"
    else:
        code = outcome.ack_code
    return map_ack_code(code, header)


@lru_cache(maxsize=64)
def _version_tuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in version.split("."))
    except ValueError:
        # Unknown or garbled: answer in the current style.
        return (2, 5)


def _timestamp(ts: datetime | None) -> str:
    if ts is None:
        ts = datetime.now(UTC)
    elif ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.strftime("%Y%m%d%H%M%S%z")


def _location_parts(location: str | None) -> tuple[str, ...] | None:
    """``"PID-3.1"`` -> ``("PID", "1", "3", "1", "1")`` (ERL order), None when unreadable."""
    if not location:
        return None
    m = _LOCATION_RE.fullmatch(location)
    if m is None:
        return None
    seg, seq, fld, comp, sub = m.groups()
    parts = [seg, seq or "1"]
    if fld:
        parts.append(fld)
        if comp:
            parts += ["1", comp]
            if sub:
                parts.append(sub)
    return tuple(parts)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def build_ack(
    header: MessageHeader | None,
    ack_code: str,
    *,
    errors: Sequence[AckError] = (),
    text: str | None = None,
    control_id: str,
    timestamp: datetime | None = None,
) -> bytes:
    """The ACK for the message whose header is ``header`` (None: unknown sender).

    ``control_id`` is the ACK's own fresh MSH-10. Returns the encoded message,
    CR-terminated segments, without MLLP framing.
    """
    if ack_code not in ACK_CODES:
        raise ValueError(f"ack_code must be one of {sorted(ACK_CODES)}")
    h = header if header is not None else MessageHeader()
    enc: EncodingChars = h.encoding if header is not None else DEFAULT_ENCODING
    fs, cs = enc.field, enc.component
    version = h.version_id or DEFAULT_VERSION
    vt = _version_tuple(version)

    if not h.trigger_event or vt < (2, 2):
        msg_type = "ACK"
    elif vt < (2, 4):
        msg_type = f"ACK{cs}{h.trigger_event}"
    else:
        msg_type = f"ACK{cs}{h.trigger_event}{cs}ACK"

    def echo(value: str) -> str:
        """A value copied from the sender's header, made safe for this ACK: components
        kept, but a field separator, segment break or line break inside it (a broken
        header) escaped or dropped, so the ACK always parses."""
        if fs in value:
            value = value.replace(enc.escape, f"{enc.escape}E{enc.escape}")
            value = value.replace(fs, f"{enc.escape}F{enc.escape}")
        return value.replace("\r", "").replace("\n", "")

    msh = [
        "MSH",
        enc.msh2,
        echo(h.receiving_application),
        echo(h.receiving_facility),
        echo(h.sending_application),
        echo(h.sending_facility),
        _timestamp(timestamp),
        "",
        msg_type,
        escape(control_id, enc),
        echo(h.processing_id) or "P",
        echo(version),
    ]
    # MSH-18 is repeated only when it names a character set we read and write: the
    # ACK is encoded in it. An unknown one (or junk from a broken header) would make
    # the ACK itself unreadable; without MSH-18 it is what it is: ASCII-safe text.
    if h.charset and codec_for_charset(h.charset) is not None:
        msh += ["", "", "", "", "", h.charset]
    segments = [fs.join(msh)]

    modern = vt >= (2, 5)
    if modern:
        segments.append(f"MSA{fs}{ack_code}{fs}{echo(h.control_id)}")
        errs = list(errors)
        if text is not None:
            if errs:
                first = errs[0]
                errs[0] = AckError(first.code, first.location, text, first.severity)
            elif ack_code in _ACCEPTING:
                errs.append(AckError("0", None, text, "I"))
            else:
                errs.append(AckError("207", None, text, "E"))
        for err in errs:
            segments.append(_err_v25(err, enc))
    else:
        summary = text if text is not None else (errors[0].message if errors else "")
        msa = ["MSA", ack_code, echo(h.control_id)]
        if errors and vt >= (2, 3):
            first_code = errors[0].code
            condition = (
                f"{escape(first_code, enc)}{cs}{escape(TABLE_0357.get(first_code, ''), enc)}"
            )
            msa += [escape(_clip(summary, MSA3_MAX_CHARS), enc), "", "", condition]
        elif summary:
            msa.append(escape(_clip(summary, MSA3_MAX_CHARS), enc))
        segments.append(fs.join(msa))
        if errors:
            eld = enc.repetition.join(_eld(err, enc) for err in errors)
            segments.append(f"ERR{fs}{eld}")

    text_out = "\r".join(segments) + "\r"
    return text_out.encode(h.codec, "replace")


def _err_v25(err: AckError, enc: EncodingChars) -> str:
    fs, cs = enc.field, enc.component
    loc = _location_parts(err.location)
    erl = cs.join(loc) if loc else ""
    cwe = f"{escape(err.code, enc)}{cs}{escape(TABLE_0357.get(err.code, ''), enc)}{cs}HL70357"
    message = escape(_clip(err.message, ERR8_MAX_CHARS), enc) if err.message else ""
    if message:
        return f"ERR{fs}{fs}{erl}{fs}{cwe}{fs}{err.severity}{fs}{fs}{fs}{fs}{message}"
    return f"ERR{fs}{fs}{erl}{fs}{cwe}{fs}{err.severity}"


def _eld(err: AckError, enc: EncodingChars) -> str:
    cs, ss = enc.component, enc.subcomponent
    loc = _location_parts(err.location)
    seg, seq, fld = (loc[0], loc[1], loc[2] if len(loc) > 2 else "") if loc else ("", "", "")
    code = f"{escape(err.code, enc)}{ss}{escape(TABLE_0357.get(err.code, ''), enc)}{ss}HL70357"
    return f"{seg}{cs}{seq}{cs}{fld}{cs}{code}"
