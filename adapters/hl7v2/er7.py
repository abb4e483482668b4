"""A fast reader for HL7 v2 messages in ER7 (pipe-delimited) encoding.

This is the hot path of MLLP ingest, so it does the least that the bridge needs:
split the message into segments and fields with ``str.split``, read the MSH
header eagerly, and decode escape sequences only for the values a caller asks
for. hl7apy's full parse (milliseconds) is for validation against message
structures, off the hot path.

Conventions
-----------
* ``Hl7Message.segments`` holds every segment split into fields, still ER7
  encoded (escape sequences intact); index 0 is the segment name.
* For MSH the field separator is inserted at index 1, so that the list index is
  the HL7 field number: ``msh[1]`` is the field separator, ``msh[2]`` the
  encoding characters, ``msh[9]`` the message type, ``msh[10]`` the control id.
  For every other segment ``seg[n]`` is field n too (``pid[3]`` is PID-3).
* ``MessageHeader`` values are raw ER7 strings (not unescaped) so that the ACK
  echoes them byte for byte; high-level accessors (:meth:`Hl7Message.field`,
  :func:`patient_identifiers`) return decoded values.
* Segment terminators CR, LF and CRLF are all accepted and normalized to CR in
  ``Hl7Message.text``; ``Hl7Message.raw`` keeps the bytes exactly as received.

Character sets (MSH-18, HL7 table 0211)
---------------------------------------
MSH-18 is read from the raw bytes before anything is decoded (the MSH segment
is ASCII). Empty MSH-18: the bytes are decoded as UTF-8, and if that fails as
ISO-8859-1. Latin-1 maps every byte to a character, so this fallback never
fails and never loses a byte: re-encoding with the same codec gives the bytes
back. ``ASCII``, ``8859/1``..``8859/9``, ``8859/15``, ``UNICODE UTF-8``,
``GB 18030-2000`` and ``BIG-5`` are honoured (a few common non-table spellings
such as ``UTF-8`` and ``ISO-8859-1`` are accepted too); bytes that are not
valid in the named character set raise :class:`DataTypeError` (``MSH-18``);
any other value raises :class:`TableValueNotFound` (``MSH-18``). UTF-16/32
cannot be read: their MSH is not ASCII, so such a frame fails as not HL7.

Nothing here puts a value taken from a message into an exception message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from bridge.errors import (
    DataTypeError,
    NotHl7Error,
    RequiredFieldMissing,
    TableValueNotFound,
    UnsupportedProcessingId,
    UnsupportedVersion,
)

__all__ = [
    "DEFAULT_ENCODING",
    "SUPPORTED_PROCESSING_IDS",
    "SUPPORTED_VERSIONS",
    "EncodingChars",
    "Hl7Message",
    "MessageHeader",
    "PatientIdentifier",
    "codec_for_charset",
    "escape",
    "parse_message",
    "patient_identifiers",
    "patient_key",
    "patient_key_from",
    "unescape",
    "validate_header",
]

#: HL7 v2 versions the bridge accepts (MSH-12.1).
SUPPORTED_VERSIONS: Final[frozenset[str]] = frozenset(
    {
        "2.1",
        "2.2",
        "2.3",
        "2.3.1",
        "2.4",
        "2.5",
        "2.5.1",
        "2.6",
        "2.7",
        "2.7.1",
        "2.8",
        "2.8.1",
        "2.8.2",
    }
)

#: HL7 table 0103 processing ids (MSH-11.1): production, debugging, training.
SUPPORTED_PROCESSING_IDS: Final[frozenset[str]] = frozenset({"P", "D", "T"})

_BOM: Final = b"\xef\xbb\xbf"
_LEADING_WHITESPACE: Final = b" \t\r\n\x0b"

# MSH-18 (table 0211) -> Python codec. "" means: UTF-8, falling back to latin-1.
_CHARSET_CODECS: Final[dict[str, str]] = {
    "ASCII": "ascii",
    "8859/1": "latin-1",
    "8859/2": "iso8859_2",
    "8859/3": "iso8859_3",
    "8859/4": "iso8859_4",
    "8859/5": "iso8859_5",
    "8859/6": "iso8859_6",
    "8859/7": "iso8859_7",
    "8859/8": "iso8859_8",
    "8859/9": "iso8859_9",
    "8859/15": "iso8859_15",
    "UNICODE UTF-8": "utf-8",
    "GB 18030-2000": "gb18030",
    "BIG-5": "big5",
    # Not in table 0211, but sent by enough real systems that refusing them
    # would only make the sender's support desk busier.
    "UTF-8": "utf-8",
    "UTF8": "utf-8",
    "ISO-8859-1": "latin-1",
    "ISO8859-1": "latin-1",
    "ISO-8859-15": "iso8859_15",
}


def codec_for_charset(charset: str) -> str | None:
    """The Python codec for an MSH-18 value, ``None`` when it is not supported.

    The empty value maps to ``"utf-8"`` (the reader falls back to latin-1 when
    the bytes are not valid UTF-8).
    """
    key = charset.strip().upper()
    if not key:
        return "utf-8"
    return _CHARSET_CODECS.get(key)


@dataclass(frozen=True, slots=True)
class EncodingChars:
    """The delimiters a message declares in MSH-1 and MSH-2."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    #: v2.7+ truncation character (5th character of MSH-2), "" when absent.
    truncation: str = ""

    @property
    def msh2(self) -> str:
        """The encoding characters as they appear in MSH-2."""
        return self.component + self.repetition + self.escape + self.subcomponent + self.truncation


DEFAULT_ENCODING: Final = EncodingChars()


@dataclass(frozen=True, slots=True)
class MessageHeader:
    """The MSH fields the bridge routes, dedupes and acknowledges on.

    Values are raw ER7 (escape sequences not decoded) so that the ACK can echo
    them exactly; MSH-3..6 keep all their components (``APP^1.2.3^ISO``).
    """

    sending_application: str = ""
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    message_datetime: str = ""
    message_code: str = ""
    trigger_event: str = ""
    message_structure: str = ""
    control_id: str = ""
    processing_id: str = ""
    version_id: str = ""
    accept_ack_type: str = ""
    application_ack_type: str = ""
    charset: str = ""
    #: The delimiters of the message; the ACK uses the same ones.
    encoding: EncodingChars = DEFAULT_ENCODING
    #: The Python codec the message was decoded with; the ACK is encoded with it.
    codec: str = "utf-8"

    @property
    def message_type(self) -> str:
        """``"ORU^R01"`` style (always ``^``, whatever the component separator)."""
        if self.trigger_event:
            return f"{self.message_code}^{self.trigger_event}"
        return self.message_code

    @property
    def sender_key(self) -> str:
        """``"{MSH-3}|{MSH-4}"``: who sent it, the scope in which MSH-10 is unique."""
        return f"{self.sending_application}|{self.sending_facility}"


@dataclass(frozen=True, slots=True, repr=False)
class PatientIdentifier:
    """One PID-3 repetition (CX), decoded. Patient data: its repr hides the values."""

    id: str
    #: CX-4.1, the assigning authority's namespace id.
    authority: str = ""
    #: CX-4.2 and CX-4.3: the authority's universal id and its type (ISO, UUID, ...).
    authority_universal_id: str = ""
    authority_universal_id_type: str = ""
    #: CX-5, identifier type code (table 0203: MR, SS, ...).
    type_code: str = ""

    def __repr__(self) -> str:
        return f"<PatientIdentifier type={self.type_code or '-'}>"


class Hl7Message:
    """One parsed HL7 v2 message. Built by :func:`parse_message`."""

    __slots__ = ("codec", "encoding", "header", "raw", "segments", "text")

    def __init__(
        self,
        raw: bytes,
        text: str,
        encoding: EncodingChars,
        codec: str,
        segments: list[list[str]],
        header: MessageHeader,
    ) -> None:
        #: The bytes exactly as received (BOM and line endings included).
        self.raw = raw
        #: The decoded message, segments separated by CR.
        self.text = text
        self.encoding = encoding
        #: The Python codec used to decode ``raw``.
        self.codec = codec
        self.segments = segments
        self.header = header

    def __repr__(self) -> str:
        # No field values: a repr can end up in a log line.
        return (
            f"<Hl7Message {self.header.message_type} v{self.header.version_id} "
            f"segments={len(self.segments)}>"
        )

    @property
    def field_sep(self) -> str:
        return self.encoding.field

    @property
    def component_sep(self) -> str:
        return self.encoding.component

    @property
    def repetition_sep(self) -> str:
        return self.encoding.repetition

    @property
    def escape_char(self) -> str:
        return self.encoding.escape

    @property
    def subcomponent_sep(self) -> str:
        return self.encoding.subcomponent

    @property
    def truncation_char(self) -> str:
        """The v2.7+ truncation character, ``""`` when MSH-2 has none."""
        return self.encoding.truncation

    def segment(self, name: str) -> list[str] | None:
        """The first segment called ``name`` (fields still ER7 encoded), or None."""
        for seg in self.segments:
            if seg[0] == name:
                return seg
        return None

    def all_segments(self, name: str) -> list[list[str]]:
        """Every segment called ``name``, in message order."""
        return [seg for seg in self.segments if seg[0] == name]

    def field(
        self,
        segment_name: str,
        field_no: int,
        repetition: int = 0,
        component: int = 1,
        subcomponent: int = 1,
    ) -> str:
        """One decoded value of the first ``segment_name`` segment, ``""`` when absent.

        ``field_no`` is the HL7 field number (MSH-9 is ``field("MSH", 9)``);
        ``repetition`` counts from 0, ``component`` and ``subcomponent`` from 1.
        MSH-1 and MSH-2 are returned whole (they are the delimiters).
        """
        seg = self.segment(segment_name)
        if seg is None or field_no < 1 or field_no >= len(seg):
            return ""
        value = seg[field_no]
        if segment_name == "MSH" and field_no <= 2:
            return value
        return self.decode_escapes(_pick(value, self.encoding, repetition, component, subcomponent))

    def decode_escapes(self, text: str) -> str:
        """Decode the escape sequences of one primitive value of this message."""
        if self.encoding.escape not in text:
            return text
        return unescape(text, self.encoding, self.codec)


def _pick(value: str, enc: EncodingChars, repetition: int, component: int, sub: int) -> str:
    if repetition or enc.repetition in value:
        reps = value.split(enc.repetition)
        if repetition >= len(reps):
            return ""
        value = reps[repetition]
    if component < 1 or sub < 1:
        return ""
    if component > 1 or enc.component in value:
        comps = value.split(enc.component)
        if component > len(comps):
            return ""
        value = comps[component - 1]
    if sub > 1 or enc.subcomponent in value:
        subs = value.split(enc.subcomponent)
        if sub > len(subs):
            return ""
        value = subs[sub - 1]
    return value


# --------------------------------------------------------------------------- parsing


def _strip_head(data: bytes) -> bytes:
    if data.startswith(_BOM):
        data = data[3:]
    if data[:1] in (b" ", b"\t", b"\r", b"\n", b"\x0b"):
        data = data.lstrip(_LEADING_WHITESPACE)
    return data


def _first_segment(data: bytes) -> bytes:
    end = len(data)
    cr = data.find(b"\r", 0, end)
    if cr != -1:
        end = cr
    lf = data.find(b"\n", 0, end)
    if lf != -1:
        end = lf
    return data[:end]


def _check_start(data: bytes) -> str:
    """Check ``data`` (BOM and leading whitespace stripped) begins an MSH; return MSH-1."""
    head = data[:3]
    if head != b"MSH":
        if head in (b"FHS", b"BHS"):
            raise NotHl7Error(
                "frame starts with an FHS/BHS batch header: HL7 batches over MLLP "
                "are not supported, send one message per frame",
                location=head.decode("ascii"),
            )
        raise NotHl7Error("frame does not start with an MSH segment", location="MSH")
    sep = data[3:4]
    if not sep or sep.isalnum() or sep in b" \t\r\n\x0b" or sep[0] >= 0x80:
        raise NotHl7Error("frame does not start with an MSH segment", location="MSH")
    return sep.decode("ascii")


def _encoding_chars(field_sep: str, msh2: str) -> EncodingChars | None:
    """The delimiters declared in MSH-2, or None when they are not usable."""
    if len(msh2) == 5 and msh2[2] == msh2[3]:
        # "^~\\&": a sender that escaped its backslash twice (seen in the wild,
        # and in the LinuxForHealth samples). Read it as "^~\&".
        msh2 = msh2[:3] + msh2[4]
    if len(msh2) not in (4, 5):
        return None
    chars = set(msh2)
    if len(chars) != len(msh2) or field_sep in chars:
        return None
    for c in msh2:
        if c.isalnum() or c.isspace() or ord(c) >= 0x80:
            return None
    if msh2 == "^~\\&" and field_sep == "|":
        return DEFAULT_ENCODING
    return EncodingChars(
        field_sep, msh2[0], msh2[1], msh2[2], msh2[3], msh2[4] if len(msh2) == 5 else ""
    )


def _charset_from_raw(first: bytes, sep: bytes, enc: EncodingChars) -> str:
    parts = first.split(sep, 18)
    if len(parts) < 18:
        return ""
    # MSH-18 repeats (further repetitions name alternate sets for ISO 2022
    # escapes); the first one is the default character set of the message.
    value = parts[17].decode("ascii", "replace")
    if enc.repetition in value:
        value = value.split(enc.repetition, 1)[0]
    return value.strip()


def _decode(body: bytes, charset: str) -> tuple[str, str]:
    """Decode the message bytes as MSH-18 says; return (text, codec used)."""
    if not charset:
        try:
            return body.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            return body.decode("latin-1"), "latin-1"
    codec = codec_for_charset(charset)
    if codec is None:
        raise TableValueNotFound(
            "MSH-18 names a character set the bridge does not support", location="MSH-18"
        )
    try:
        return body.decode(codec), codec
    except UnicodeDecodeError:
        raise DataTypeError(
            "message bytes are not valid in the character set named by MSH-18",
            location="MSH-18",
        ) from None


def parse_message(data: bytes) -> Hl7Message:
    """Parse one HL7 v2 message (the payload of one MLLP frame).

    Raises :class:`NotHl7Error` when the frame does not start with a usable MSH
    segment (or is an FHS/BHS batch), :class:`TableValueNotFound` /
    :class:`DataTypeError` (``MSH-18``) when the character set is unknown or
    the bytes do not match it. The header is *not* validated here: see
    :func:`validate_header`, so an ACK can be built from any parsed message.
    """
    body = _strip_head(data)
    field_sep = _check_start(body)
    first = _first_segment(body)
    sep_b = body[3:4]
    msh2_end = first.find(sep_b, 4)
    msh2_b = first[4:] if msh2_end == -1 else first[4:msh2_end]
    enc = _encoding_chars(field_sep, msh2_b.decode("ascii", "replace"))
    if enc is None:
        raise NotHl7Error("MSH-2 does not hold valid encoding characters", location="MSH-2")
    charset = _charset_from_raw(first, sep_b, enc)
    text, codec = _decode(body, charset)

    if "\n" in text:
        text = text.replace("\r\n", "\r").replace("\n", "\r")
    segments = [seg.split(field_sep) for seg in text.split("\r") if seg and not seg.isspace()]
    segments[0].insert(1, field_sep)
    header = _header_from_msh(segments[0], enc, charset, codec)
    return Hl7Message(data, text, enc, codec, segments, header)


def _header_from_msh(msh: list[str], enc: EncodingChars, charset: str, codec: str) -> MessageHeader:
    """Build the header from MSH fields numbered as in HL7 (msh[9] is MSH-9)."""
    n = len(msh)
    comp = enc.component

    def f(i: int) -> str:
        return msh[i] if i < n else ""

    def first(i: int) -> str:
        v = msh[i] if i < n else ""
        return v.split(comp, 1)[0] if comp in v else v

    msg_type = f(9)
    if comp in msg_type:
        parts = msg_type.split(comp)
        code = parts[0]
        trigger = parts[1] if len(parts) > 1 else ""
        structure = parts[2] if len(parts) > 2 else ""
    else:
        code, trigger, structure = msg_type, "", ""
    return MessageHeader(
        sending_application=f(3),
        sending_facility=f(4),
        receiving_application=f(5),
        receiving_facility=f(6),
        message_datetime=first(7),
        message_code=code,
        trigger_event=trigger,
        message_structure=structure,
        control_id=f(10),
        processing_id=first(11),
        version_id=first(12),
        accept_ack_type=f(15),
        application_ack_type=f(16),
        charset=charset,
        encoding=enc,
        codec=codec,
    )


def header_for_unparseable(data: bytes) -> MessageHeader | None:
    """Best-effort header of a frame that could not be parsed in full.

    Used to answer broken or oversized frames: reads only the first segment,
    never raises, falls back to the default delimiters when MSH-2 is unusable
    and to a lossless latin-1 decode when the bytes do not match MSH-18.
    Returns None when the frame does not even start with ``MSH`` and a separator.
    """
    body = _strip_head(data)
    try:
        field_sep = _check_start(body)
    except NotHl7Error:
        return None
    first = _first_segment(body)
    sep_b = body[3:4]
    msh2_end = first.find(sep_b, 4)
    msh2 = (first[4:] if msh2_end == -1 else first[4:msh2_end]).decode("ascii", "replace")
    enc = _encoding_chars(field_sep, msh2)
    if enc is None:
        enc = EncodingChars(field=field_sep) if field_sep not in "^~\\&" else DEFAULT_ENCODING
    charset = _charset_from_raw(first, sep_b, enc)
    codec = codec_for_charset(charset) or "latin-1"
    try:
        line = first.decode(codec)
    except UnicodeDecodeError:
        # A truncated head may end inside a multi-byte character.
        codec = "latin-1" if codec in ("utf-8", "ascii") else codec
        line = first.decode(codec, "replace")
    fields = line.split(field_sep)
    fields.insert(1, field_sep)
    return _header_from_msh(fields, enc, charset, codec)


# ------------------------------------------------------------------------ validation


def validate_header(header: MessageHeader) -> None:
    """Check the MSH fields the bridge depends on; raise the first problem found.

    Kept apart from parsing so that an ACK can be built (sender and receiver
    swapped, MSH-10 echoed) even from a message whose header is invalid.
    """
    if not header.message_code:
        raise RequiredFieldMissing("MSH-9 message type is empty", location="MSH-9")
    if not header.trigger_event and header.message_code != "ACK":
        raise RequiredFieldMissing("MSH-9 has no trigger event", location="MSH-9")
    if not header.control_id:
        raise RequiredFieldMissing("MSH-10 message control id is empty", location="MSH-10")
    if not header.processing_id:
        raise RequiredFieldMissing("MSH-11 processing id is empty", location="MSH-11")
    if header.processing_id not in SUPPORTED_PROCESSING_IDS:
        raise UnsupportedProcessingId(
            "MSH-11 processing id is not one of P, D, T", location="MSH-11"
        )
    if not header.version_id:
        raise RequiredFieldMissing("MSH-12 version id is empty", location="MSH-12")
    if header.version_id not in SUPPORTED_VERSIONS:
        raise UnsupportedVersion(
            "MSH-12 names an HL7 version the bridge does not support", location="MSH-12"
        )


# ------------------------------------------------------------------ escape sequences

_HEX_RE: Final = re.compile(r"[0-9A-Fa-f]+")
_SP_RE: Final = re.compile(r"\.sp\s*\+?(\d*)")
#: Upper bound on the line breaks one ``\.sp n\`` may produce (a bomb otherwise).
_MAX_SP_LINES: Final = 100

#: Delimiter sets whose escape tables are kept. Nearly every sender uses the
#: default set; the bound stops a stream of odd MSH-2 values from growing memory.
_MAX_CACHED_ENCODINGS: Final = 32
_escape_tables: dict[EncodingChars, tuple[frozenset[str], dict[int, str]]] = {}
_unescape_tables: dict[EncodingChars, dict[str, str]] = {}


def _escape_table(enc: EncodingChars) -> tuple[frozenset[str], dict[int, str]]:
    cached = _escape_tables.get(enc)
    if cached is None:
        e = enc.escape
        table = {
            ord(e): f"{e}E{e}",
            ord(enc.field): f"{e}F{e}",
            ord(enc.component): f"{e}S{e}",
            ord(enc.subcomponent): f"{e}T{e}",
            ord(enc.repetition): f"{e}R{e}",
            # A CR would end the segment; \X0D\ gives it back exactly.
            ord("\r"): f"{e}X0D{e}",
            ord("\n"): f"{e}.br{e}",
        }
        if enc.truncation:
            table[ord(enc.truncation)] = f"{e}P{e}"
        cached = (frozenset(chr(c) for c in table), table)
        if len(_escape_tables) < _MAX_CACHED_ENCODINGS:
            _escape_tables[enc] = cached
    return cached


def _unescape_table(enc: EncodingChars) -> dict[str, str]:
    table = _unescape_tables.get(enc)
    if table is None:
        table = {
            "F": enc.field,
            "S": enc.component,
            "T": enc.subcomponent,
            "R": enc.repetition,
            "E": enc.escape,
            # Highlighting on/off: no meaning once the text leaves HL7.
            "H": "",
            "N": "",
            ".br": "\n",
        }
        if enc.truncation:
            table["P"] = enc.truncation
        if len(_unescape_tables) < _MAX_CACHED_ENCODINGS:
            _unescape_tables[enc] = table
    return table


def escape(value: str, enc: EncodingChars = DEFAULT_ENCODING) -> str:
    """Encode ``value`` for an ER7 field: delimiters become escape sequences.

    LF becomes ``\\.br\\`` and CR ``\\X0D\\``, so the value cannot end a segment.
    """
    specials, table = _escape_table(enc)
    if specials.isdisjoint(value):
        return value
    return value.translate(table)


def unescape(value: str, enc: EncodingChars = DEFAULT_ENCODING, codec: str = "utf-8") -> str:
    """Decode the escape sequences of one primitive ER7 value.

    ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` give the delimiters, ``\\P\\`` the v2.7
    truncation character (when the message declares one), ``\\.br\\`` and
    ``\\.sp\\`` a line break, other formatting commands (``\\.in\\``, ``\\.fi\\``
    ...) and highlighting (``\\H\\ \\N\\``) are dropped, ``\\Xhh..\\`` gives the
    bytes decoded with ``codec`` (latin-1 when they are not valid in it).
    ``\\Zxx\\`` (locally defined), ``\\C..\\``/``\\M..\\`` (ISO 2022 switches),
    unknown or unterminated sequences are kept literally.
    """
    e = enc.escape
    if e not in value:
        return value
    parts = value.split(e)
    table = _unescape_table(enc)
    out = [parts[0]]
    n = len(parts)
    i = 1
    while i < n - 1:
        seq = parts[i]
        decoded = table.get(seq)
        if decoded is None:
            decoded = _decode_sequence(seq, e, codec)
        out.append(decoded)
        out.append(parts[i + 1])
        i += 2
    if i == n - 1:
        # An escape character with no closing partner: keep it as it came.
        out.append(e)
        out.append(parts[i])
    return "".join(out)


def _decode_sequence(seq: str, e: str, codec: str) -> str:
    if seq.startswith("X") and len(seq) % 2 == 1 and _HEX_RE.fullmatch(seq, 1):
        data = bytes.fromhex(seq[1:])
        try:
            return data.decode(codec)
        except (UnicodeDecodeError, LookupError):
            return data.decode("latin-1")
    if seq.startswith("."):
        m = _SP_RE.fullmatch(seq)
        if m is not None:
            count = int(m.group(1)) if m.group(1) else 1
            return "\n" * max(1, min(count, _MAX_SP_LINES))
        return ""
    return f"{e}{seq}{e}"


# -------------------------------------------------------------------- patient helpers


def patient_identifiers(msg: Hl7Message) -> list[PatientIdentifier]:
    """The PID-3 repetitions of the first PID, decoded; empty ids are skipped."""
    pid = msg.segment("PID")
    if pid is None or len(pid) < 4 or not pid[3]:
        return []
    enc = msg.encoding
    dec = msg.decode_escapes
    out: list[PatientIdentifier] = []
    for rep in pid[3].split(enc.repetition):
        comps = rep.split(enc.component)
        ident = dec(comps[0].split(enc.subcomponent, 1)[0]) if comps[0] else ""
        if not ident.strip():
            continue
        ns = uid = uid_type = type_code = ""
        if len(comps) > 3 and comps[3]:
            hd = comps[3].split(enc.subcomponent)
            ns = dec(hd[0])
            if len(hd) > 1:
                uid = dec(hd[1])
            if len(hd) > 2:
                uid_type = dec(hd[2])
        if len(comps) > 4 and comps[4]:
            type_code = dec(comps[4].split(enc.subcomponent, 1)[0])
        out.append(PatientIdentifier(ident, ns, uid, uid_type, type_code))
    return out


def patient_key(msg: Hl7Message) -> str | None:
    """The Kafka record key: ``"{authority}|{id}"`` of the first PID-3 with an id.

    The authority is CX-4.1 (namespace), else CX-4.2 (universal id), else "".
    None when the message has no PID or no PID-3 id. This is patient data: it
    goes in the Kafka key, never in a log line.
    """
    return patient_key_from(patient_identifiers(msg))


def patient_key_from(identifiers: list[PatientIdentifier]) -> str | None:
    """:func:`patient_key` from identifiers already read with :func:`patient_identifiers`."""
    for ident in identifiers:
        return f"{ident.authority or ident.authority_universal_id}|{ident.id}"
    return None
