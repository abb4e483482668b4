"""``hl7bridge convert`` as a user runs it: corpus files in, CloudEvents JSON out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from fhir.resources.R4B.bundle import Bundle

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

HL7BRIDGE = [sys.executable, "-m", "bridge.cli"]
CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus"
MS_DIR = CORPUS / "microsoft-fhir-converter" / "data" / "SampleData" / "Hl7v2"
FILES = [MS_DIR / name for name in ("ADT-A01-01.hl7", "LAB-ORU-1.hl7", "VXU-V04-01.hl7")]


def convert(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*HL7BRIDGE, "convert", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )


@pytest.fixture(scope="module", autouse=True)
def _corpus() -> None:
    if not all(f.is_file() for f in FILES):
        pytest.fail("the shared corpus is not present beside the repository (../shared/corpus)")


def test_corpus_files_convert_to_one_event_per_line() -> None:
    done = convert("--json-lines", *FILES)
    assert done.returncode == 0, done.stderr
    events = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert [e["type"] for e in events] == [
        "org.hl7bridge.hl7v2.ADT_A01",
        "org.hl7bridge.hl7v2.ORU_R01",
        "org.hl7bridge.hl7v2.VXU_V04",
    ]
    for event in events:
        assert event["specversion"] == "1.0"
        assert event["subject"].startswith("Patient/")
        Bundle.model_validate(event["data"])
    assert done.stderr.strip() == "3 converted, 0 not converted"


def test_default_output_is_indented_and_data_only_prints_bundles() -> None:
    pretty = convert(FILES[0])
    assert pretty.returncode == 0, pretty.stderr
    assert pretty.stdout.startswith('{\n  "specversion": "1.0",')
    event = orjson.loads(pretty.stdout)
    data_only = convert("--data-only", FILES[0])
    bundle = orjson.loads(data_only.stdout)
    assert bundle["resourceType"] == "Bundle"
    # Same message, same deterministic ids: the Bundle is the event's data (but for
    # Bundle.timestamp, the time the Bundle was made).
    assert bundle.pop("timestamp")
    assert event["data"].pop("timestamp")
    assert bundle == event["data"]


def test_broken_message_exits_1_and_names_file_index_and_problem(tmp_path: Path) -> None:
    good = FILES[1].read_bytes()
    lines = FILES[0].read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r").split(b"\r")
    pid = next(i for i, line in enumerate(lines) if line.startswith(b"PID|"))
    fields = lines[pid].split(b"|")
    fields[7] = b"19881399"  # PID-7: month 13
    lines[pid] = b"|".join(fields)
    broken = b"\r".join(lines)
    path = tmp_path / "a.hl7"
    path.write_bytes(good + b"\n" + broken)
    done = convert("--json-lines", path)
    assert done.returncode == 1
    assert len(done.stdout.splitlines()) == 1  # the good message still converted
    orjson.loads(done.stdout)
    first = done.stderr.splitlines()[0]
    assert first.startswith(f"{path}#2: DataTypeError at PID-7: ")
    assert "19881399" not in done.stderr
    assert done.stderr.splitlines()[-1] == "1 converted, 1 not converted"


def test_missing_file_exits_2_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.hl7"
    done = convert(FILES[0], missing)
    assert done.returncode == 2
    assert done.stdout == ""
    assert str(missing) in done.stderr


def test_strict_mapping_and_identifier_systems_options(tmp_path: Path) -> None:
    path = tmp_path / "z.hl7"
    path.write_bytes(
        b"MSH|^~\\&|APP|FAC|||20240101||ADT^A04|C1|P|2.3\r"
        b"PID|1||77^^^HOSP||ROE^RICHARD||19700101|M\rZXT|1|x\r"
    )
    lenient = convert("--json-lines", "--identifier-systems", "HOSP=urn:oid:1.2.840.99", path)
    assert lenient.returncode == 0, lenient.stderr
    event = orjson.loads(lenient.stdout)
    assert "ZXT" in event["hl7unmapped"].split(",")
    patient = event["data"]["entry"][1]["resource"]
    assert patient["identifier"][0]["system"] == "urn:oid:1.2.840.99"
    strict = convert("--strict-mapping", path)
    assert strict.returncode == 1
    assert strict.stderr.startswith(f"{path}#1: UnmappedContent: ")
