"""Instance settings: defaults, layering, and errors that name the key and its origin."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from bridge.config import (
    DEFAULT_ACCEPTED_MESSAGE_TYPES,
    Settings,
    build_settings,
    env_settings,
    load_yaml,
)
from bridge.errors import ConfigError

pytestmark = pytest.mark.timeout(30)


def write_yaml(tmp_path: Path, text: str, name: str = "bridge.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def settings(**kwargs: Any) -> Settings:
    kwargs.setdefault("environ", {})
    return build_settings(**kwargs)


# --- defaults and derived values --------------------------------------------------------


def test_defaults() -> None:
    s = settings()
    assert s.topic_prefix == "health"
    assert s.accept_message_types == DEFAULT_ACCEPTED_MESSAGE_TYPES
    assert s.accept_message_types == ("ADT", "ORU", "ORM", "OML", "VXU", "MDM", "SIU")
    assert s.cluster == "default"
    assert s.zookeeper_chroot is None
    assert s.zookeeper_base_path == "/hl7bridge/default"
    assert s.mllp_port == 2575
    assert s.max_frame_bytes == 1024 * 1024
    assert s.kafka_idempotence is True


def test_default_instance_ids_are_unique_znode_names() -> None:
    a, b = settings().instance_id, settings().instance_id
    assert a != b
    assert "/" not in a


def test_chroot_default_follows_the_cluster() -> None:
    assert settings(cli={"cluster": "prod"}).zookeeper_base_path == "/hl7bridge/prod"


@pytest.mark.parametrize(
    ("zookeeper", "chroot", "expected"),
    [
        ("h:1/x", None, "/x/hl7bridge/c"),
        ("h:1,g:2/x/y", None, "/x/y/hl7bridge/c"),
        ("h:1/", None, "/hl7bridge/c"),
        ("h:1", "/custom/path", "/custom/path"),
        ("h:1/x", "/custom", "/x/custom"),
    ],
)
def test_zookeeper_base_path(zookeeper: str, chroot: str | None, expected: str) -> None:
    s = settings(cli={"zookeeper": zookeeper, "cluster": "c", "zookeeper_chroot": chroot})
    assert s.zookeeper_base_path == expected
    assert s.zookeeper_servers == zookeeper.split("/", 1)[0]


@pytest.mark.parametrize("chroot", ["relative", "/trailing/", "/a//b"])
def test_bad_chroot_is_refused(chroot: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings(cli={"zookeeper_chroot": chroot})
    assert caught.value.key == "zookeeper_chroot"
    assert "--zookeeper-chroot" in str(caught.value)


def test_settings_are_frozen() -> None:
    s = settings()
    with pytest.raises(ValidationError):
        s.mllp_port = 1  # type: ignore[misc]
    assert s.mllp_port == 2575


# --- layering ---------------------------------------------------------------------------


def test_layers_override_in_order_base_file_env_cli(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        "mllp_port: 3001\nhttp_port: 3002\ncluster: from-file\ntopic_prefix: file\n",
    )
    s = build_settings(
        base={"mllp_port": 1000, "http_port": 1001, "kafka_partitions": 3, "cluster": "base"},
        file=path,
        environ={"HL7BRIDGE_HTTP_PORT": "4002", "HL7BRIDGE_TOPIC_PREFIX": "env"},
        cli={"topic_prefix": "cli", "mllp_port": None},
    )
    assert s.kafka_partitions == 3  # base only
    assert s.cluster == "from-file"  # file over base
    assert s.mllp_port == 3001  # file over base; a None CLI value does not count
    assert s.http_port == 4002  # env over file
    assert s.topic_prefix == "cli"  # cli over env


def test_environment_values_are_parsed_to_their_types() -> None:
    s = settings(
        environ={
            "HL7BRIDGE_MLLP_PORT": "2600",
            "HL7BRIDGE_KAFKA_IDEMPOTENCE": "false",
            "HL7BRIDGE_DEDUPE_WINDOW_S": "0.5",
            "PATH": "/usr/bin",
        }
    )
    assert s.mllp_port == 2600
    assert s.kafka_idempotence is False
    assert s.dedupe_window_s == 0.5


def test_accept_message_types_from_a_comma_string() -> None:
    s = settings(environ={"HL7BRIDGE_ACCEPT_MESSAGE_TYPES": "ADT, ORU^R01"})
    assert s.accept_message_types == ("ADT", "ORU^R01")


def test_accept_message_types_from_a_yaml_list(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "accept_message_types:\n  - '*'\n  - ADT^A01\n")
    assert settings(file=path).accept_message_types == ("*", "ADT^A01")


def test_empty_yaml_file_is_no_settings(tmp_path: Path) -> None:
    assert load_yaml(write_yaml(tmp_path, "")) == {}
    assert settings(file=write_yaml(tmp_path, "# nothing\n")).mllp_port == 2575


def test_hl7bridge_config_is_not_a_setting() -> None:
    environ = {"HL7BRIDGE_CONFIG": "/etc/hl7bridge.yaml", "HL7BRIDGE_CLUSTER": "x"}
    assert env_settings(environ) == {"cluster": "x"}
    assert settings(environ=environ).cluster == "x"


# --- unknown keys -----------------------------------------------------------------------


def test_unknown_yaml_key_is_refused_with_the_key_and_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "mllp_port: 2575\nmlp_port: 2576\n")
    with pytest.raises(ConfigError) as caught:
        settings(file=path)
    assert caught.value.key == "mlp_port"
    assert "'mlp_port'" in str(caught.value)
    assert str(path) in str(caught.value)


def test_unknown_environment_variable_is_refused_by_name() -> None:
    with pytest.raises(ConfigError) as caught:
        settings(environ={"HL7BRIDGE_MLP_PORT": "2576"})
    assert caught.value.key == "mlp_port"
    assert "HL7BRIDGE_MLP_PORT" in str(caught.value)


def test_unknown_cli_key_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        settings(cli={"mlp_port": 1})
    assert caught.value.key == "mlp_port"
    assert "--mlp-port" in str(caught.value)


@pytest.mark.parametrize(
    "text",
    ["- mllp_port\n- 2575\n", "just a string\n", "42\n"],
    ids=["list", "string", "number"],
)
def test_yaml_that_is_not_a_mapping_is_refused(tmp_path: Path, text: str) -> None:
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        settings(file=path)
    assert caught.value.key == "config"
    assert str(path) in str(caught.value)
    assert "mapping" in str(caught.value)


def test_invalid_yaml_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as bad:
        settings(file=write_yaml(tmp_path, "mllp_port: [2575\n"))
    assert bad.value.key == "config"
    with pytest.raises(ConfigError) as missing:
        settings(file=tmp_path / "absent.yaml")
    assert missing.value.key == "config"
    assert "absent.yaml" in str(missing.value)


# --- bad values: the key and where it was set -------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("mllp_port", "70000"),
        ("mllp_port", "-1"),
        ("kafka_idempotence", "maybe"),
        ("topic_prefix", "a b"),
        ("topic_prefix", "health/prod"),
        ("instance_id", "a/b"),
        ("cluster", ""),
        ("accept_message_types", "ADT, adt^a01"),
        ("accept_message_types", "ADT^A01^ADT_A01"),
        ("zookeeper", "localhost"),
        ("kafka", "host:99999"),
        ("kafka_compression", "brotli"),
    ],
)
def test_bad_value_from_the_environment_names_key_and_variable(key: str, value: str) -> None:
    variable = "HL7BRIDGE_" + key.upper()
    with pytest.raises(ConfigError) as caught:
        settings(environ={variable: value})
    assert caught.value.key == key
    assert f"{key} (from {variable})" in str(caught.value)


@pytest.mark.parametrize(
    ("key", "value", "option"),
    [
        ("mllp_port", 65536, "--mllp-port"),
        ("instance_id", "a/b", "--instance-id"),
        ("max_frame_bytes", 10, "--max-frame-bytes"),
    ],
)
def test_bad_value_from_the_cli_names_key_and_option(key: str, value: Any, option: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings(cli={key: value})
    assert caught.value.key == key
    assert f"{key} (from {option})" in str(caught.value)


def test_bad_value_from_a_file_names_key_and_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "http_port: not-a-port\n")
    with pytest.raises(ConfigError) as caught:
        settings(file=path)
    assert caught.value.key == "http_port"
    assert f"http_port (from config file {path})" in str(caught.value)


def test_bad_file_value_overridden_by_env_is_not_an_error(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "http_port: not-a-port\n")
    assert settings(file=path, environ={"HL7BRIDGE_HTTP_PORT": "8081"}).http_port == 8081


def test_validation_error_does_not_chain_the_pydantic_error() -> None:
    with pytest.raises(ConfigError) as caught:
        settings(environ={"HL7BRIDGE_MLLP_PORT": "x"})
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__ is True


# --- Kafka security --------------------------------------------------------------------------


def test_plaintext_kafka_by_default_is_just_the_bootstrap() -> None:
    client = settings().kafka_client()
    assert client.options() == {
        "bootstrap_servers": "127.0.0.1:9092",
        "security_protocol": "PLAINTEXT",
    }


def test_kafka_tls_with_a_ca_and_a_client_certificate(tls_cert: tuple[Path, Path]) -> None:
    cert, key = tls_cert
    client = settings(
        environ={
            "HL7BRIDGE_KAFKA_SECURITY_PROTOCOL": "SSL",
            "HL7BRIDGE_KAFKA_SSL_CA_FILE": str(cert),
            "HL7BRIDGE_KAFKA_SSL_CERT_FILE": str(cert),
            "HL7BRIDGE_KAFKA_SSL_KEY_FILE": str(key),
            "HL7BRIDGE_KAFKA_SSL_CHECK_HOSTNAME": "false",
        }
    ).kafka_client()
    options = client.options()
    assert options["security_protocol"] == "SSL" and "sasl_mechanism" not in options
    context = options["ssl_context"]
    assert context.check_hostname is False
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "localhost"),),)]


def test_kafka_sasl_ssl_passes_the_user_and_never_shows_the_password() -> None:
    client = settings(
        environ={
            "HL7BRIDGE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "HL7BRIDGE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
            "HL7BRIDGE_KAFKA_SASL_USERNAME": "bridge",
            "HL7BRIDGE_KAFKA_SASL_PASSWORD": "pa55word",
        }
    ).kafka_client()
    options = client.options()
    assert options["sasl_mechanism"] == "SCRAM-SHA-256"
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == (
        "bridge",
        "pa55word",
    )
    assert options["ssl_context"].verify_mode.name == "CERT_REQUIRED"  # system CAs
    assert "pa55word" not in repr(client) and str(client) == "127.0.0.1:9092"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"HL7BRIDGE_KAFKA_SSL_CA_FILE": "/etc/hostname"}, "kafka_security_protocol is PLAINTEXT"),
        (
            {
                "HL7BRIDGE_KAFKA_SECURITY_PROTOCOL": "SSL",
                "HL7BRIDGE_KAFKA_SSL_CERT_FILE": "/etc/hostname",
            },
            "must be set together",
        ),
        (
            {
                "HL7BRIDGE_KAFKA_SECURITY_PROTOCOL": "SSL",
                "HL7BRIDGE_KAFKA_SSL_CA_FILE": "/nonexistent.pem",
            },
            "no such file",
        ),
        ({"HL7BRIDGE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "needs kafka_sasl_username"),
        ({"HL7BRIDGE_KAFKA_SASL_USERNAME": "bridge"}, "a SASL user is set"),
        ({"HL7BRIDGE_KAFKA_SECURITY_PROTOCOL": "TLS"}, "kafka_security_protocol"),
    ],
)
def test_inconsistent_kafka_security_is_refused(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings(environ=environ)
    assert message in str(caught.value)


def test_an_unreadable_kafka_ca_file_is_a_config_error(tmp_path: Path) -> None:
    bogus = write_yaml(tmp_path, "not a certificate", name="ca.pem")
    loaded = settings(
        environ={
            "HL7BRIDGE_KAFKA_SECURITY_PROTOCOL": "SSL",
            "HL7BRIDGE_KAFKA_SSL_CA_FILE": str(bogus),
        }
    )
    with pytest.raises(ConfigError) as caught:
        loaded.kafka_client()
    assert caught.value.key == "kafka_ssl_ca_file"


def test_proxy_protocol_with_mllp_tls_at_the_bridge_is_refused(tls_cert: tuple[Path, Path]) -> None:
    cert, key = tls_cert
    assert settings(environ={"HL7BRIDGE_MLLP_PROXY_PROTOCOL": "true"}).mllp_proxy_protocol
    with pytest.raises(ConfigError) as caught:
        settings(
            environ={
                "HL7BRIDGE_MLLP_PROXY_PROTOCOL": "true",
                "HL7BRIDGE_MLLP_TLS_CERT_FILE": str(cert),
                "HL7BRIDGE_MLLP_TLS_KEY_FILE": str(key),
            }
        )
    assert "mllp_proxy_protocol cannot be combined with MLLP TLS" in str(caught.value)


@pytest.mark.parametrize("listener", ["mllp", "http"])
def test_a_listener_certificate_needs_its_key(listener: str, tls_cert: tuple[Path, Path]) -> None:
    cert, key = tls_cert
    prefix = f"HL7BRIDGE_{listener.upper()}_TLS"
    with pytest.raises(ConfigError) as caught:
        settings(environ={f"{prefix}_CERT_FILE": str(cert)})
    assert f"{listener}_tls_cert_file and {listener}_tls_key_file must be set together" in str(
        caught.value
    )
    loaded = settings(environ={f"{prefix}_CERT_FILE": str(cert), f"{prefix}_KEY_FILE": str(key)})
    context = getattr(loaded, f"{listener}_ssl_context")()
    assert context is not None and context.verify_mode.name == "CERT_NONE"  # no client CA


def test_zookeeper_tls_options(tls_cert: tuple[Path, Path]) -> None:
    cert, key = tls_cert
    assert settings().zookeeper_tls_options() is None
    tls = settings(
        environ={
            "HL7BRIDGE_ZOOKEEPER_TLS": "true",
            "HL7BRIDGE_ZOOKEEPER_TLS_CA_FILE": str(cert),
            "HL7BRIDGE_ZOOKEEPER_TLS_CERT_FILE": str(cert),
            "HL7BRIDGE_ZOOKEEPER_TLS_KEY_FILE": str(key),
        }
    ).zookeeper_tls_options()
    assert tls is not None
    assert tls.kazoo_options() == {
        "use_ssl": True,
        "verify_certs": True,
        "ca": str(cert),
        "certfile": str(cert),
        "keyfile": str(key),
    }
    with pytest.raises(ConfigError) as caught:
        settings(environ={"HL7BRIDGE_ZOOKEEPER_TLS_CA_FILE": str(cert)})
    assert "zookeeper_tls is false" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        settings(
            environ={
                "HL7BRIDGE_ZOOKEEPER_TLS": "true",
                "HL7BRIDGE_ZOOKEEPER_TLS_KEY_FILE": str(key),
            }
        )
    assert "must be set together" in str(caught.value)
