"""The fast ER7 reader: parsing, delimiters, character sets, escapes, header checks."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.hl7v2.er7 import (
    DEFAULT_ENCODING,
    SUPPORTED_VERSIONS,
    EncodingChars,
    Hl7Message,
    MessageHeader,
    codec_for_charset,
    escape,
    header_for_unparseable,
    parse_message,
    patient_identifiers,
    patient_key,
    unescape,
    validate_header,
)
from bridge.errors import (
    BridgeError,
    DataTypeError,
    NotHl7Error,
    RequiredFieldMissing,
    TableValueNotFound,
    UnsupportedProcessingId,
    UnsupportedVersion,
)

pytestmark = pytest.mark.timeout(30)

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus"
MS_DIR = CORPUS / "microsoft-fhir-converter" / "data" / "SampleData" / "Hl7v2"
LFH_DIR = CORPUS / "linuxforhealth-hl7v2-fhir-converter" / "src" / "test" / "resources"
CORPUS_FILES = sorted(MS_DIR.glob("*.hl7")) + sorted(LFH_DIR.glob("*.hl7"))


def corpus(name: str) -> bytes:
    return (MS_DIR / name).read_bytes()


def build(*segments: str, sep: str = "\r", charset: str = "utf-8") -> bytes:
    return sep.join(segments).encode(charset)


MSH_251 = (
    "MSH|^~\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC|20240101120000+0100||ADT^A01^ADT_A01|CTRL1|P|2.5.1"
)


# ----------------------------------------------------------------------------- corpus


def test_corpus_is_where_the_tests_expect_it() -> None:
    assert len(list(MS_DIR.glob("*.hl7"))) == 139
    assert len(list(LFH_DIR.glob("*.hl7"))) == 4


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.name)
def test_every_corpus_message_parses_and_has_a_valid_header(path: Path) -> None:
    data = path.read_bytes()
    msg = parse_message(data)
    validate_header(msg.header)
    assert msg.raw is data
    msh = msg.segments[0]
    assert msh[0] == "MSH"
    assert msh[1] == "|"
    assert msh[2] in ("^~\\&", "^~\\\\&")  # raw MSH-2, see the doubled-backslash test
    assert msg.encoding == DEFAULT_ENCODING
    assert msg.segment("MSH") is msh
    assert msg.header.control_id
    assert all(seg and seg[0] for seg in msg.segments)
    assert "\n" not in msg.text
    # The decoded text re-encodes to the received bytes (BOM and line ends aside).
    body = data.removeprefix(b"\xef\xbb\xbf").replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    assert msg.text.encode(msg.codec) == body


def test_header_of_adt_a01_v28() -> None:
    h = parse_message(corpus("ADT-A01-01.hl7")).header
    assert h.sending_application == "ADTApp"
    assert h.sending_facility == "GHHSFacility^2.16.840.1.122848.1.30^ISO"
    assert h.receiving_application == "EHRApp^1.Edu^ISO"
    assert h.receiving_facility == "GHHRFacility^2.16.840.1.1122848.1.32^ISO"
    assert h.message_datetime == "198908181126+0215"
    assert (h.message_code, h.trigger_event, h.message_structure) == ("ADT", "A01", "ADT_A01")
    assert h.message_type == "ADT^A01"
    assert h.control_id == "MSG00001"
    assert h.processing_id == "P"
    assert h.version_id == "2.8"
    assert (h.accept_ack_type, h.application_ack_type, h.charset) == ("", "", "")
    assert h.sender_key == "ADTApp|GHHSFacility^2.16.840.1.122848.1.30^ISO"


def test_header_of_bom_oru_v25_has_no_message_structure() -> None:
    data = corpus("LAB-ORU-1.hl7")
    assert data.startswith(b"\xef\xbb\xbf")
    msg = parse_message(data)
    h = msg.header
    assert (h.sending_application, h.receiving_application) == ("SomeSystem", "TransformationAgent")
    assert (h.message_code, h.trigger_event, h.message_structure) == ("ORU", "R01", "")
    assert (h.control_id, h.processing_id, h.version_id) == ("182", "T", "2.5")
    assert h.sender_key == "SomeSystem|"
    assert [s[0] for s in msg.segments][:4] == ["MSH", "PID", "OBR", "OBX"]
    assert len(msg.all_segments("OBX")) == 10


def test_header_with_enhanced_mode_and_ascii_charset() -> None:
    h = parse_message(corpus("MDM-T02-03.hl7")).header
    assert (h.version_id, h.accept_ack_type, h.application_ack_type) == ("2.3", "AL", "")
    assert h.charset == "ASCII"
    assert h.codec == "ascii"
    h2 = parse_message(corpus("ORU-R01-01.hl7")).header
    assert (h2.accept_ack_type, h2.application_ack_type) == ("AL", "NE")
    assert h2.message_datetime == "201203141259-0215"


def test_header_of_v23_message() -> None:
    h = parse_message(corpus("ADT01-23.hl7")).header
    assert (h.message_code, h.trigger_event, h.message_structure) == ("ADT", "A01", "")
    assert (h.control_id, h.version_id) == ("599102", "2.3")


def test_doubled_backslash_in_msh2_is_read_as_the_standard_set() -> None:
    # LinuxForHealth's samples carry "^~\\&" (a backslash escaped twice).
    msg = parse_message((LFH_DIR / "sample_unix.hl7").read_bytes())
    assert msg.encoding == DEFAULT_ENCODING
    assert msg.field("PID", 3, repetition=0, component=4) == "A"
    assert msg.field("PID", 5) == "DOE"


# ------------------------------------------------------------------- segment endings


def test_cr_lf_crlf_bom_and_trailing_blank_lines_give_equal_segments() -> None:
    lf = corpus("ADT-A01-01.hl7")
    assert b"\r" not in lf
    variants = {
        "lf": lf,
        "cr": lf.replace(b"\n", b"\r"),
        "crlf": lf.replace(b"\n", b"\r\n"),
        "bom": b"\xef\xbb\xbf" + lf,
        "bom_crlf": b"\xef\xbb\xbf" + lf.replace(b"\n", b"\r\n"),
        "trailing": lf.rstrip(b"\n") + b"\r\n\r\n\n\r",
        "no_final_terminator": lf.rstrip(b"\n"),
        "leading_whitespace": b"\r\n " + lf,
    }
    expected = parse_message(lf).segments
    for name, data in variants.items():
        msg = parse_message(data)
        assert msg.segments == expected, name
        assert msg.raw is data


def test_mixed_line_endings_are_tolerated() -> None:
    data = f"{MSH_251}\r\nEVN|A01\nPID|1||42^^^HOSP^MR\rPV1|1|I\r\n".encode()
    msg = parse_message(data)
    assert [s[0] for s in msg.segments] == ["MSH", "EVN", "PID", "PV1"]
    assert msg.text.count("\r") == 4


# ------------------------------------------------------------------ frame start checks


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"   ",
        b"hello world",
        b"PID|1||42",
        b"MSH",
        b"MSHA^~\\&|x",
        b"MSH \x5e~\\&|",
        b"\xef\xbb\xbfEVN|A01",
    ],
)
def test_frames_without_msh_are_not_hl7(data: bytes) -> None:
    with pytest.raises(NotHl7Error) as info:
        parse_message(data)
    assert info.value.location == "MSH"
    assert info.value.message == "frame does not start with an MSH segment"


@pytest.mark.parametrize("msh2", ["", "^~", "^~\\", "^^\\&", "^~\\&#@", "^~|&", "A~\\&"])
def test_unusable_encoding_characters_are_not_hl7(msh2: str) -> None:
    data = f"MSH|{msh2}|A|B|C|D|20240101||ADT^A01|1|P|2.5".encode()
    with pytest.raises(NotHl7Error) as info:
        parse_message(data)
    assert info.value.location == "MSH-2"


@pytest.mark.parametrize("head", [b"FHS", b"BHS"])
def test_batches_are_refused_with_a_clear_message(head: bytes) -> None:
    data = head + b"|^~\\&|APP|FAC\r" + MSH_251.encode() + b"\rBTS|1\rFTS|1\r"
    with pytest.raises(NotHl7Error) as info:
        parse_message(data)
    assert "FHS/BHS" in info.value.message
    assert "batch" in info.value.message
    assert info.value.location == head.decode()


def test_custom_delimiters_and_truncation_character() -> None:
    data = build(
        "MSH*:!$%#*APP*FAC*R*RF*20240101120000+0100**ORU:R01:ORU_R01*C9*P*2.7",
        "PID*1**42:::AUTH%1.2.3%ISO:MR!43:::B**Doe:John",
    )
    msg = parse_message(data)
    assert (msg.field_sep, msg.component_sep, msg.repetition_sep) == ("*", ":", "!")
    assert (msg.escape_char, msg.subcomponent_sep, msg.truncation_char) == ("$", "%", "#")
    assert msg.segments[0][1] == "*"
    assert msg.segments[0][2] == ":!$%#"
    assert msg.field("MSH", 1) == "*"
    assert msg.field("MSH", 2) == ":!$%#"
    assert msg.header.message_type == "ORU^R01"
    assert msg.header.message_structure == "ORU_R01"
    assert msg.field("PID", 3, component=4, subcomponent=2) == "1.2.3"
    assert msg.field("PID", 3, repetition=1) == "43"
    assert patient_key(msg) == "AUTH|42"


# --------------------------------------------------------------------- field access


def test_field_access_by_hl7_numbers() -> None:
    msg = parse_message(corpus("ADT-A01-01.hl7"))
    assert msg.field("MSH", 9) == "ADT"
    assert msg.field("MSH", 9, component=2) == "A01"
    assert msg.field("MSH", 9, component=3) == "ADT_A01"
    assert msg.field("MSH", 9, component=4) == ""
    assert msg.field("MSH", 10) == "MSG00001"
    assert msg.field("PID", 3) == "PATID1234"
    assert msg.field("PID", 3, component=4, subcomponent=2) == "2.16.1"
    assert msg.field("PID", 3, repetition=1) == "123456789"
    assert msg.field("PID", 3, repetition=1, component=4) == "USSSA"
    assert msg.field("PID", 3, repetition=2) == ""
    assert msg.field("PID", 5, repetition=1, component=3) == "stanley"
    assert msg.field("PID", 999) == ""
    assert msg.field("PID", 0) == ""
    assert msg.field("ZZZ", 1) == ""
    assert msg.segment("ZZZ") is None
    assert msg.all_segments("ZZZ") == []
    assert len(msg.all_segments("ROL")) == 3


def test_field_values_are_unescaped_but_segments_stay_raw() -> None:
    msg = parse_message(corpus("ADT-A01-01.hl7"))
    pv1 = msg.segment("PV1")
    assert pv1 is not None
    assert pv1[14] == "NHS Provider-General (inc.A\\T\\E-this Hosp)"
    assert msg.field("PV1", 14) == "NHS Provider-General (inc.A&E-this Hosp)"


def test_repr_carries_no_field_values() -> None:
    msg = parse_message(corpus("ADT-A01-01.hl7"))
    text = repr(msg)
    assert "ADT^A01" in text
    assert "EVERYMAN" not in text
    assert "PATID1234" not in repr(patient_identifiers(msg))


# ------------------------------------------------------------------- character sets


def test_latin1_message_round_trips_exactly() -> None:
    data = (
        b"MSH|^~\\&|APP|Z\xfcrich|RECV|FAC|20240101120000+0100||ADT^A01^ADT_A01|C1|P|2.5.1"
        b"||||||8859/1\r"
        b"PID|1||123^^^HOSP^MR||M\xfcller^J\xfcrgen||19800101|M\r"
    )
    msg = parse_message(data)
    assert msg.header.charset == "8859/1"
    assert msg.codec == msg.header.codec == "latin-1"
    assert msg.field("PID", 5) == "Müller"
    assert msg.field("PID", 5, component=2) == "Jürgen"
    assert msg.header.sending_facility == "Zürich"
    assert msg.text.encode(msg.codec) == data


def test_unlabelled_latin1_bytes_fall_back_to_latin1() -> None:
    data = (MSH_251 + "\rPID|1||1^^^H||M\xfcller").encode("latin-1")
    msg = parse_message(data)
    assert msg.codec == "latin-1"
    assert msg.field("PID", 5) == "Müller"
    assert msg.text.encode(msg.codec) == data


def test_unlabelled_utf8_is_decoded_as_utf8() -> None:
    msg = parse_message((MSH_251 + "\rPID|1||1^^^H||Müller^Zoë").encode())
    assert msg.codec == "utf-8"
    assert msg.field("PID", 5, component=2) == "Zoë"


@pytest.mark.parametrize(
    ("charset", "codec", "name"),
    [
        ("UNICODE UTF-8", "utf-8", "Łukasz Müller"),
        ("8859/2", "iso8859_2", "Łódź"),
        ("8859/15", "iso8859_15", "5 €"),
        ("8859/7", "iso8859_7", "Αθήνα"),
        ("ASCII", "ascii", "Smith"),
    ],
)
def test_declared_charsets_are_honoured(charset: str, codec: str, name: str) -> None:
    data = (MSH_251 + f"||||||{charset}\rPID|1||1^^^H||{name}").encode(codec)
    msg = parse_message(data)
    assert msg.codec == codec
    assert msg.field("PID", 5) == name


def test_bytes_invalid_in_the_declared_charset_are_a_data_type_error() -> None:
    for charset, body in [("ASCII", b"M\xfcller"), ("UNICODE UTF-8", b"M\xfcller")]:
        data = (MSH_251 + f"||||||{charset}\rPID|1||1^^^H||").encode() + body
        with pytest.raises(DataTypeError) as info:
            parse_message(data)
        assert info.value.location == "MSH-18"
        assert "ller" not in str(info.value)


def test_unknown_charset_is_a_table_value_error() -> None:
    with pytest.raises(TableValueNotFound) as info:
        parse_message((MSH_251 + "||||||EBCDIC\rPID|1").encode())
    assert info.value.location == "MSH-18"


def test_charset_helper() -> None:
    assert codec_for_charset("") == "utf-8"
    assert codec_for_charset(" unicode utf-8 ") == "utf-8"
    assert codec_for_charset("8859/1") == "latin-1"
    assert codec_for_charset("UNICODE UTF-16") is None


# ------------------------------------------------------------------ escape sequences


@pytest.mark.parametrize(
    ("escaped", "plain"),
    [
        ("plain text", "plain text"),
        ("a\\F\\b", "a|b"),
        ("a\\S\\b", "a^b"),
        ("a\\T\\b", "a&b"),
        ("a\\R\\b", "a~b"),
        ("a\\E\\b", "a\\b"),
        ("\\X41\\", "A"),
        ("x\\X4142\\y", "xABy"),
        ("\\XC3A9\\", "é"),
        ("\\XE9\\", "é"),
        ("line1\\.br\\line2", "line1\nline2"),
        ("a\\.sp\\b", "a\nb"),
        ("a\\.sp3\\b", "a\n\n\nb"),
        ("\\.in+4\\indented\\.fi\\", "indented"),
        ("\\H\\bold\\N\\", "bold"),
        ("\\Zlocal\\", "\\Zlocal\\"),
        ("\\C2842\\x", "\\C2842\\x"),
        ("\\Q\\", "\\Q\\"),
        ("\\XZZ\\", "\\XZZ\\"),
        ("unterminated \\F", "unterminated \\F"),
        ("a\\F\\b\\c", "a|b\\c"),
        ("\\P\\", "\\P\\"),
    ],
)
def test_unescape(escaped: str, plain: str) -> None:
    assert unescape(escaped, DEFAULT_ENCODING, "utf-8") == plain


def test_unescape_truncation_character_v27() -> None:
    enc = EncodingChars(truncation="#")
    assert unescape("a\\P\\b", enc) == "a#b"
    assert escape("a#b", enc) == "a\\P\\b"


def test_unescape_hex_uses_the_message_charset() -> None:
    assert unescape("\\XE9\\", DEFAULT_ENCODING, "latin-1") == "é"
    assert unescape("\\XA4\\", DEFAULT_ENCODING, "iso8859_15") == "€"


def test_unescape_fast_path_returns_the_same_object() -> None:
    value = "no escapes here" * 3
    assert unescape(value) is value
    assert escape(value) is value


def test_escape_all_delimiters() -> None:
    assert escape("a|b^c~d\\e&f") == "a\\F\\b\\S\\c\\R\\d\\E\\e\\T\\f"
    assert escape("l1\nl2\rl3") == "l1\\.br\\l2\\X0D\\l3"
    custom = EncodingChars("*", ":", "!", "$", "%")
    assert escape("a*b:c$", custom) == "a$F$b$S$c$E$"


_encodings = st.sampled_from(
    [DEFAULT_ENCODING, EncodingChars(truncation="#"), EncodingChars("*", ":", "!", "$", "%")]
)


@given(value=st.text().filter(lambda s: "\r" not in s), enc=_encodings)
def test_unescape_inverts_escape(value: str, enc: EncodingChars) -> None:
    escaped = escape(value, enc)
    assert enc.field not in escaped
    assert "\n" not in escaped
    assert unescape(escaped, enc) == value


@given(value=st.text(), enc=_encodings)
def test_unescape_inverts_escape_even_with_cr(value: str, enc: EncodingChars) -> None:
    escaped = escape(value, enc)
    assert "\r" not in escaped
    assert unescape(escaped, enc) == value


# ------------------------------------------------------------------------ validation


def header(**changes: Any) -> MessageHeader:
    return dataclasses.replace(parse_message(MSH_251.encode()).header, **changes)


def test_valid_header_passes() -> None:
    validate_header(header())
    validate_header(header(message_code="ACK", trigger_event=""))
    for version in SUPPORTED_VERSIONS:
        validate_header(header(version_id=version))


@pytest.mark.parametrize(
    ("changes", "error", "location"),
    [
        ({"message_code": ""}, RequiredFieldMissing, "MSH-9"),
        ({"trigger_event": ""}, RequiredFieldMissing, "MSH-9"),
        ({"control_id": ""}, RequiredFieldMissing, "MSH-10"),
        ({"processing_id": ""}, RequiredFieldMissing, "MSH-11"),
        ({"processing_id": "X"}, UnsupportedProcessingId, "MSH-11"),
        ({"version_id": ""}, RequiredFieldMissing, "MSH-12"),
        ({"version_id": "2.9"}, UnsupportedVersion, "MSH-12"),
        ({"version_id": "3.0"}, UnsupportedVersion, "MSH-12"),
    ],
)
def test_invalid_header(changes: dict[str, str], error: type[Exception], location: str) -> None:
    with pytest.raises(error) as info:
        validate_header(header(**changes))
    assert getattr(info.value, "location", None) == location


def test_invalid_header_still_parses() -> None:
    msg = parse_message(b"MSH|^~\\&|A|B|C|D|2024||ORU^R01||P|")
    assert msg.header.sending_application == "A"
    with pytest.raises(RequiredFieldMissing) as info:
        validate_header(msg.header)
    assert info.value.location == "MSH-10"


def test_msh_with_only_the_encoding_characters() -> None:
    msg = parse_message(b"MSH|^~\\&")
    assert msg.segments == [["MSH", "|", "^~\\&"]]
    with pytest.raises(RequiredFieldMissing):
        validate_header(msg.header)


# ------------------------------------------------------------------- patient helpers


def test_patient_identifiers_and_key() -> None:
    msg = parse_message(corpus("ADT-A01-01.hl7"))
    ids = patient_identifiers(msg)
    assert [(i.id, i.authority, i.type_code) for i in ids] == [
        ("PATID1234", "test1", "MR"),
        ("123456789", "USSSA", "SS"),
    ]
    assert ids[0].authority_universal_id == "2.16.1"
    assert ids[0].authority_universal_id_type == "HCD"
    assert patient_key(msg) == "test1|PATID1234"
    assert patient_key(parse_message(corpus("LAB-ORU-1.hl7"))) == "1|10006579"


def test_patient_key_skips_empty_ids_and_falls_back_to_universal_id() -> None:
    msg = parse_message(build(MSH_251, "PID|1||^^^EMPTY~77^^^&1.2.3&ISO^MR"))
    assert patient_key(msg) == "1.2.3|77"
    msg = parse_message(build(MSH_251, "PID|1||88"))
    assert patient_key(msg) == "|88"


def test_patient_key_is_none_without_pid_or_id() -> None:
    assert patient_key(parse_message(build(MSH_251, "EVN|A01"))) is None
    assert patient_key(parse_message(build(MSH_251, "PID|1||"))) is None
    assert patient_key(parse_message(build(MSH_251, "PID|1"))) is None


def test_patient_key_decodes_escapes() -> None:
    msg = parse_message(build(MSH_251, "PID|1||A\\T\\1^^^H\\S\\Q"))
    assert patient_key(msg) == "H^Q|A&1"


# ------------------------------------------------------------- unparseable frames


def test_header_for_unparseable_reads_a_truncated_head() -> None:
    full = corpus("ADT-A01-01.hl7")
    head = full[:200]
    h = header_for_unparseable(head)
    assert h is not None
    assert h.control_id == "MSG00001"
    assert h.receiving_application == "EHRApp^1.Edu^ISO"
    assert h.version_id == "2.8"


def test_header_for_unparseable_when_charset_and_bytes_disagree() -> None:
    data = (MSH_251 + "||||||ASCII\rPID|1||1^^^H||").encode() + b"M\xfcller"
    with pytest.raises(DataTypeError):
        parse_message(data)
    h = header_for_unparseable(data)
    assert h is not None
    assert (h.control_id, h.charset) == ("CTRL1", "ASCII")


def test_header_for_unparseable_with_a_cut_multibyte_character() -> None:
    data = "MSH|^~\\&|Zoë".encode()[:-1]
    h = header_for_unparseable(data)
    assert h is not None
    assert h.sending_application.startswith("Zo")


def test_header_for_unparseable_with_bad_encoding_characters() -> None:
    h = header_for_unparseable(b"MSH|^^|A|B|C|D|2024||ADT^A01|X9|P|2.4")
    assert h is not None
    assert h.encoding == DEFAULT_ENCODING
    assert (h.sending_application, h.control_id) == ("A", "X9")


@pytest.mark.parametrize("data", [b"", b"garbage", b"FHS|^~\\&|", b"MSH"])
def test_header_for_unparseable_gives_up_without_msh(data: bytes) -> None:
    assert header_for_unparseable(data) is None


def test_message_object_is_cheap_and_slotted() -> None:
    msg = parse_message(corpus("LAB-ORU-1.hl7"))
    assert isinstance(msg, Hl7Message)
    assert not hasattr(msg, "__dict__")
    with pytest.raises(AttributeError):
        msg.header.control_id = "x"  # type: ignore[misc]


# ---------------------------------------------------------------------------- fuzzing

_MSH_PREFIXES = st.sampled_from(
    [b"", b"MSH|^~\\&|", b"\xef\xbb\xbfMSH|^~\\&|A|B|C|D|2024||ADT^A01|1|P|2.5.1|||||", b"MSH"]
)


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=300)
@given(prefix=_MSH_PREFIXES, tail=st.binary(max_size=300))
def test_arbitrary_bytes_parse_or_raise_a_bridge_error(prefix: bytes, tail: bytes) -> None:
    data = prefix + tail
    try:
        msg = parse_message(data)
    except BridgeError:
        pass
    else:
        assert msg.segments[0][0] == "MSH"
        with contextlib.suppress(BridgeError):
            validate_header(msg.header)
        patient_key(msg)
    header_for_unparseable(data)
