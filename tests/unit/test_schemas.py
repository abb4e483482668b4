"""The contracts in schemas/ stay true to the code that writes and reads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bridge.config import Settings
from bridge.envelope import EventAttributes
from bridge.kafka import Topics

pytestmark = pytest.mark.timeout(30)

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def test_config_schema_is_generated_from_the_settings_model() -> None:
    committed = json.loads((SCHEMAS / "config.schema.json").read_text())
    generated = Settings.model_json_schema()
    assert committed["properties"] == generated["properties"]
    assert committed["additionalProperties"] is False


def test_every_header_the_bridge_writes_is_documented() -> None:
    schema = json.loads((SCHEMAS / "event-envelope.schema.json").read_text())
    attributes = EventAttributes(
        id="i",
        source="s",
        type="t",
        time="x",
        subject="Patient/p",
        hl7_control_id="c",
        hl7_message_type="ADT^A01",
        hl7_version="2.5",
        bridge_instance="b",
        leader_epoch=1,
        unmapped=("ZPI",),
        fhir_interaction="create",
    )
    written = {name for name, _ in attributes.headers()}
    assert written <= set(schema["properties"])
    assert set(schema["required"]) <= written


def test_asyncapi_names_every_topic() -> None:
    document = yaml.safe_load((SCHEMAS / "asyncapi.yaml").read_text())
    addresses = {channel["address"] for channel in document["channels"].values()}
    assert addresses == {t.replace("p.", "{prefix}.", 1) for t in Topics("p").all()}


def test_example_config_is_valid() -> None:
    from bridge.config import build_settings

    example = SCHEMAS.parent / "deploy" / "config" / "bridge.example.yaml"
    settings = build_settings(file=example, environ={})
    assert settings.zookeeper_base_path == "/hl7bridge/prod"
    assert settings.kafka_replication_factor == 3


def test_tls_cert_and_key_go_together(tmp_path: Path) -> None:
    from bridge.config import build_settings
    from bridge.errors import ConfigError

    cert = tmp_path / "c.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError, match="mllp_tls_cert_file and mllp_tls_key_file"):
        build_settings(cli={"mllp_tls_cert_file": str(cert)}, environ={})
    with pytest.raises(ConfigError, match="no such file"):
        build_settings(
            cli={"mllp_tls_cert_file": str(cert), "mllp_tls_key_file": str(tmp_path / "nope")},
            environ={},
        )
