"""Reading HL7 v2 messages out of files: line ends, BOM, MLLP framing, batches."""

from __future__ import annotations

import pytest

from adapters.hl7v2.files import split_messages
from adapters.mllp.codec import encode_frame

pytestmark = pytest.mark.timeout(30)

A = [b"MSH|^~\\&|LAB|HOSP|BRIDGE|HOSP|20240101120000||ORU^R01|A1|P|2.5", b"PID|1||123"]
B = [b"MSH|^~\\&|ADT|HOSP|BRIDGE|HOSP|20240101120001||ADT^A01|B2|P|2.5", b"PID|1||456"]
A_OUT = b"\r".join(A) + b"\r"
B_OUT = b"\r".join(B) + b"\r"


def lines(segments: list[bytes], end: bytes) -> bytes:
    return b"".join(segment + end for segment in segments)


def check_shape(messages: list[bytes]) -> None:
    for message in messages:
        assert message.startswith(b"MSH|")
        assert message.endswith(b"\r")
        assert b"\n" not in message
        assert b"\r\r" not in message


def test_one_message_with_lf() -> None:
    out = split_messages(lines(A, b"\n"))
    assert out == [A_OUT]
    check_shape(out)


def test_one_message_without_a_final_line_end() -> None:
    assert split_messages(b"\n".join(A)) == [A_OUT]


def test_two_messages_with_crlf() -> None:
    out = split_messages(lines(A, b"\r\n") + lines(B, b"\r\n"))
    assert out == [A_OUT, B_OUT]
    check_shape(out)


def test_cr_only_is_kept() -> None:
    assert split_messages(A_OUT + B_OUT) == [A_OUT, B_OUT]


def test_bom_is_dropped() -> None:
    out = split_messages(b"\xef\xbb\xbf" + lines(A, b"\n"))
    assert out == [A_OUT]


def test_mllp_framed_file_with_two_frames() -> None:
    data = encode_frame(A_OUT) + b"\n" + encode_frame(lines(B, b"\n")) + b"\n"
    out = split_messages(data)
    assert out == [A_OUT, B_OUT]
    check_shape(out)


def test_batch_envelope_is_dropped() -> None:
    data = lines(
        [
            b"FHS|^~\\&|LAB|HOSP|||20240101",
            b"BHS|^~\\&|LAB|HOSP|||20240101",
            *A,
            *B,
            b"BTS|2",
            b"FTS|1",
        ],
        b"\r\n",
    )
    out = split_messages(data)
    assert out == [A_OUT, B_OUT]
    check_shape(out)


def test_blank_lines_are_ignored() -> None:
    data = b"\n\n" + A[0] + b"\n\n   \n" + A[1] + b"\n\r\n\t\n" + lines(B, b"\n") + b"\n\n"
    assert split_messages(data) == [A_OUT, B_OUT]


def test_text_before_the_first_msh_is_ignored() -> None:
    data = b"# sample from the lab\nPID|1||999\nnotes: resend\n" + lines(A, b"\n")
    assert split_messages(data) == [A_OUT]


@pytest.mark.parametrize("data", [b"", b"\n\n", b"no message here\n", b"PID|1||123\n"])
def test_no_msh_gives_no_messages(data: bytes) -> None:
    assert split_messages(data) == []


def test_segments_after_a_message_belong_to_it() -> None:
    extra = [*A, b"OBR|1", b"OBX|1|NM|x||5"]
    assert split_messages(lines(extra, b"\n")) == [b"\r".join(extra) + b"\r"]


def test_unterminated_last_frame_is_not_lost() -> None:
    data = encode_frame(A_OUT) + b"\x0b" + B_OUT
    assert split_messages(data) == [A_OUT, B_OUT]
