"""The cluster config model: validation that names the key path, YAML and JSON alike,
the default diagnosis rule, the committed schema, and the stored record's form."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest

from bridge.cluster.cluster_config import (
    CRITICAL_RESULTS,
    ClusterConfig,
    DiagnosisRule,
    RuleMatch,
    effective_rules,
    json_schema,
    parse_cluster_config,
)
from bridge.cluster.config_store import VersionedConfig, canonical_json, config_digest
from bridge.cluster.status import render_status
from bridge.errors import ConfigError

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "config" / "cluster.example.yaml"
SCHEMA = ROOT / "schemas" / "cluster-config.schema.json"


def refused(text: str, where: str = "c.yaml") -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse_cluster_config(text, where=where)
    return caught.value


# --- the example and the two syntaxes ------------------------------------------------------


def test_the_example_file_is_valid() -> None:
    config = parse_cluster_config(EXAMPLE.read_bytes(), where=str(EXAMPLE))
    assert config.accept_message_types == ["ADT", "ORU", "ORM", "OML", "VXU", "MDM", "SIU"]
    assert [c.name for c in config.channels] == ["lab-drop", "legacy-adt"]
    lab, legacy = config.channels
    assert lab.kind == "directory"
    assert lab.path == "/var/spool/hl7bridge/lab"
    assert lab.pattern == "*.hl7"
    assert lab.poll_interval_s == 2.0
    assert lab.settle_s == 5.0
    assert lab.enabled is True
    assert lab.done_path == "/var/spool/hl7bridge/lab/done"
    assert lab.error_path == "/var/spool/hl7bridge/lab/error"
    assert legacy.done_path == "/mnt/legacy/processed"
    assert legacy.error_path == "/mnt/legacy/failed"
    assert legacy.enabled is False
    assert [r.name for r in config.diagnosis_rules] == [
        "critical-results",
        "critical-potassium",
        "emergency-admissions",
    ]
    potassium = config.diagnosis_rules[1]
    assert potassium.priority == 1
    assert potassium.escalation_s == 120.0
    assert potassium.match.codes == ["http://loinc.org|2823-3"]
    assert potassium.match.interpretation == ["HH", "LL"]
    assert config.diagnosis_rules[2].match.message_type == ["ADT^A01", "ADT^A04"]
    assert [(r.match, r.topic_suffix) for r in config.routes] == [
        ("ORU", "results"),
        ("ADT^A08", "adt.updates"),
        ("fhir:Observation", "results"),
    ]


def test_yaml_and_json_give_the_same_config_and_digest() -> None:
    from_yaml = parse_cluster_config(EXAMPLE.read_text(), where="example.yaml")
    as_json = json.dumps(from_yaml.canonical(), indent=1)
    from_json = parse_cluster_config(as_json, where="example.json")
    from_bytes = parse_cluster_config(b"\xef\xbb\xbf" + as_json.encode(), where="bom.json")
    from_dict = parse_cluster_config(json.loads(as_json), where="dict")
    assert from_yaml == from_json == from_bytes == from_dict
    assert config_digest(from_yaml) == config_digest(from_json)
    # Key order and defaults spelled out do not change the digest.
    short = parse_cluster_config("routes: [{topic_suffix: r, match: ORU}]", where="a")
    spelled = parse_cluster_config(
        '{"channels": [], "routes": [{"match": "ORU", "topic_suffix": "r"}], '
        '"accept_message_types": null}',
        where="b",
    )
    assert config_digest(short) == config_digest(spelled)
    assert config_digest(short) != config_digest(from_yaml)
    assert len(config_digest(short)) == 64


def test_canonical_json_has_sorted_keys_and_every_field() -> None:
    config = parse_cluster_config("channels: [{name: a, path: /in}]", where="x")
    data = orjson.loads(canonical_json(config))
    assert list(data) == sorted(data)
    assert data["channels"][0] == {
        "done_dir": None,
        "enabled": True,
        "error_dir": None,
        "kind": "directory",
        "name": "a",
        "path": "/in",
        "pattern": "*",
        "poll_interval_s": 1.0,
        "settle_s": 1.0,
    }
    assert data["diagnosis_rules"] == []
    assert data["accept_message_types"] is None


def test_an_empty_mapping_is_a_valid_config() -> None:
    config = parse_cluster_config("{}", where="x")
    assert config == ClusterConfig()
    assert config.accept_message_types is None
    assert config.channels == []


# --- errors name the key path ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("acept_message_types: [ADT]", "acept_message_types", "unknown key"),
        ("accept_message_types: [ADT, adt]", "accept_message_types[1]", "family like ADT"),
        ("accept_message_types: [ADT^A1]", "accept_message_types[0]", "type like ADT^A01"),
        ("accept_message_types: []", "accept_message_types", "at least one"),
        ("channels: [{path: /in}]", "channels[0].name", "required key is missing"),
        ("channels: [{name: Lab, path: /in}]", "channels[0].name", "lower-case"),
        ("channels: [{name: lab, path: in}]", "channels[0].path", "absolute path"),
        ("channels: [{name: lab, path: /in, kind: sftp}]", "channels[0].kind", "directory"),
        (
            "channels: [{name: lab, path: /in, done_dir: rel}]",
            "channels[0].done_dir",
            "absolute path",
        ),
        ("channels: [{name: lab, path: /in, pattern: a/b}]", "channels[0].pattern", "'/'"),
        (
            "channels: [{name: lab, path: /in, poll_interval_s: 0}]",
            "channels[0].poll_interval_s",
            "greater than 0",
        ),
        (
            "channels: [{name: lab, path: /in, poll_interval_s: 3601}]",
            "channels[0].poll_interval_s",
            "less than or equal to 3600",
        ),
        (
            "channels: [{name: lab, path: /in, settle_s: -1}]",
            "channels[0].settle_s",
            "greater than or equal to 0",
        ),
        ("channels: [{name: lab, path: /in, polling: 1}]", "channels[0].polling", "unknown key"),
        (
            "channels: [{name: lab, path: /in, error_dir: /in/}]",
            "channels[0]",
            "error_dir must not be the inbox",
        ),
        (
            "channels: [{name: a, path: /x}, {name: b, path: /y}, {name: a, path: /z}]",
            "channels",
            "unique; used more than once: ['a']",
        ),
        (
            "diagnosis_rules: [{name: r, match: {resource_type: Observation}, priority: 0}]",
            "diagnosis_rules[0].priority",
            "greater than or equal to 1",
        ),
        (
            "diagnosis_rules: [{name: r, match: {resource_type: Observation}, priority: 10}]",
            "diagnosis_rules[0].priority",
            "less than or equal to 9",
        ),
        (
            "diagnosis_rules: [{name: r, match: {resource_type: Observation}, escalation_s: 0}]",
            "diagnosis_rules[0].escalation_s",
            "greater than 0",
        ),
        ("diagnosis_rules: [{name: r}]", "diagnosis_rules[0].match", "required key is missing"),
        ("diagnosis_rules: [{name: r, match: {}}]", "diagnosis_rules[0].match", "at least one"),
        (
            "diagnosis_rules: [{name: r, match: {resource_type: observation}}]",
            "diagnosis_rules[0].match.resource_type",
            "FHIR resource type",
        ),
        (
            "diagnosis_rules: [{name: r, match: {codes: [ok, 'a|b|c']}}]",
            "diagnosis_rules[0].match.codes[1]",
            "'system|code' or 'code'",
        ),
        (
            "diagnosis_rules: [{name: r, match: {codes: ['|x']}}]",
            "diagnosis_rules[0].match.codes[0]",
            "'system|code' or 'code'",
        ),
        (
            "diagnosis_rules: [{name: r, match: {message_type: [ORU^R01, oru]}}]",
            "diagnosis_rules[0].match.message_type[1]",
            "family like ORU",
        ),
        (
            "diagnosis_rules: [{name: r, match: {interpretation: ['H H']}}]",
            "diagnosis_rules[0].match.interpretation[0]",
            "interpretation code",
        ),
        (
            "diagnosis_rules: [{name: r, match: {encounter_class: ['']}}]",
            "diagnosis_rules[0].match.encounter_class[0]",
            "non-empty",
        ),
        (
            "diagnosis_rules: [{name: r, match: {colour: red}}]",
            "diagnosis_rules[0].match.colour",
            "unknown key",
        ),
        (
            "diagnosis_rules: [{name: r, match: {source: [a]}}, {name: r, match: {source: [b]}}]",
            "diagnosis_rules",
            "used more than once: ['r']",
        ),
        ("routes: [{match: ORU}]", "routes[0].topic_suffix", "required key is missing"),
        ("routes: [{match: oru, topic_suffix: r}]", "routes[0].match", "fhir:<ResourceType>"),
        (
            "routes: [{match: 'fhir:observation', topic_suffix: r}]",
            "routes[0].match",
            "fhir:<ResourceType>",
        ),
        ("routes: [{match: ORU, topic_suffix: R}]", "routes[0].topic_suffix", "lower-case"),
        (
            "routes: [{match: ORU, topic_suffix: a}, {match: ORU, topic_suffix: b}]",
            "routes",
            "more than once: ['ORU']",
        ),
    ],
)
def test_each_error_names_its_key_path(text: str, key: str, problem: str) -> None:
    error = refused(text, where="cluster.yaml")
    assert error.key == key
    assert str(error).startswith("invalid cluster config in cluster.yaml: ")
    assert f"{key}: " in str(error)
    assert problem in str(error)
    assert "Traceback" not in str(error)


def test_every_problem_is_listed_not_only_the_first() -> None:
    error = refused("channels: [{name: A, path: x}]\nroutes: [{match: ORU, topic_suffix: _}]\n")
    message = str(error)
    assert error.key == "channels[0].name"
    for key in ("channels[0].name", "channels[0].path", "routes[0].topic_suffix"):
        assert f"{key}: " in message


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ("channels: [", "is not valid YAML or JSON at line 1"),
        ('{"channels": [}', "is not valid YAML or JSON at line 1"),
        ("- a\n- b\n", "must be a mapping"),
        ("just text", "must be a mapping"),
        ("", "is empty"),
        ("# only a comment\n", "is empty"),
        (b"\xff\xfe\x00", "is not UTF-8"),
    ],
)
def test_unreadable_documents_are_refused_with_where(data: str | bytes, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_cluster_config(data, where="in/c.yaml")
    assert "in/c.yaml" in str(caught.value)
    assert problem in str(caught.value)
    assert caught.value.key == "config"


def test_models_are_frozen_and_forbid_extra_keys_everywhere() -> None:
    for model in (ClusterConfig, DiagnosisRule, RuleMatch):
        assert model.model_config.get("extra") == "forbid"
        assert model.model_config.get("frozen") is True
    config = parse_cluster_config("{}", where="x")
    with pytest.raises(Exception, match="frozen"):
        config.routes = []  # type: ignore[misc]


# --- the default rule ------------------------------------------------------------------------


def test_without_rules_the_critical_results_rule_applies() -> None:
    rules = effective_rules(ClusterConfig())
    assert len(rules) == 1
    rule = rules[0]
    assert rule == CRITICAL_RESULTS
    assert rule.name == "critical-results"
    assert rule.priority == 5
    assert rule.escalation_s == 300.0
    assert rule.match.resource_type == "Observation"
    assert rule.match.interpretation == ["HH", "LL", "AA"]
    assert rule.match.codes == []


def test_configured_rules_replace_the_default() -> None:
    config = parse_cluster_config(
        "diagnosis_rules: [{name: k, match: {codes: ['http://loinc.org|2823-3']}}]", where="x"
    )
    assert [r.name for r in effective_rules(config)] == ["k"]
    assert effective_rules(config)[0].priority == 5


# --- the schema --------------------------------------------------------------------------------


def test_schema_file_is_generated_from_the_model() -> None:
    committed = json.loads(SCHEMA.read_text(encoding="utf-8"))
    assert committed == json_schema()
    assert SCHEMA.read_text(encoding="utf-8") == (
        json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"
    )
    assert committed["additionalProperties"] is False
    assert set(committed["properties"]) == {
        "accept_message_types",
        "channels",
        "diagnosis_rules",
        "routes",
    }
    for definition in committed["$defs"].values():
        assert definition["additionalProperties"] is False
    channel = committed["$defs"]["DirectoryChannelConfig"]["properties"]
    assert channel["settle_s"]["description"].startswith("A file must be unchanged")
    assert channel["name"]["pattern"] == "^[a-z0-9][a-z0-9-]{0,62}$"


# --- the stored record -----------------------------------------------------------------------


def test_versioned_config_round_trips_through_its_json() -> None:
    config = parse_cluster_config(EXAMPLE.read_text(), where="x")
    versioned = VersionedConfig(
        version=3,
        pushed_at="2024-05-01T12:00:00.000Z",
        digest=config_digest(config),
        config=config,
        source="cli",
        rolled_back_to=1,
    )
    record = versioned.to_json()
    assert record["rolled_back_to"] == 1
    assert VersionedConfig.decode(orjson.dumps(record), where="n") == versioned
    del record["rolled_back_to"]
    assert VersionedConfig.decode(orjson.dumps(record), where="n").rolled_back_to is None


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"not json", "does not hold JSON"),
        (b"[1]", "does not hold a JSON object"),
        (b'{"pushed_at": "t", "digest": "d", "config": {}}', "version is missing"),
        (b'{"version": 0, "pushed_at": "t", "digest": "d", "config": {}}', "version is missing"),
        (b'{"version": 1, "digest": "d", "config": {}}', "pushed_at is missing"),
        (b'{"version": 1, "pushed_at": "t", "digest": "d"}', "config is missing"),
        (
            b'{"version": 1, "pushed_at": "t", "digest": "d", "config": {"x": 1}}',
            "x: unknown key",
        ),
    ],
)
def test_a_bad_stored_record_is_a_config_error(raw: bytes, problem: str) -> None:
    with pytest.raises(ConfigError, match="node /c") as caught:
        VersionedConfig.decode(raw, where="node /c")
    assert problem in str(caught.value)


# --- status rendering ------------------------------------------------------------------------


def test_render_status_is_an_aligned_table() -> None:
    text = render_status(
        {
            "cluster": "prod",
            "leader": "b-2",
            "epoch": 4,
            "members": [
                {
                    "instance": "a-1",
                    "host": "h1",
                    "ports": {"mllp": 2575, "http": 8080},
                    "version": "0.1.0",
                    "started": "2024-05-01T10:00:00+00:00",
                    "load": {"mllp_connections": 3},
                    "session": "CONNECTED",
                    "leader": False,
                    "channels": ["lab-drop"],
                },
                {
                    "instance": "b-2",
                    "host": "host-two",
                    "ports": {},
                    "version": None,
                    "started": None,
                    "load": None,
                    "session": None,
                    "leader": True,
                    "channels": [],
                },
            ],
            "channels": [{"name": "lab-drop", "owner": "a-1"}, {"name": "x", "owner": None}],
            "config_version": 7,
        }
    )
    lines = text.splitlines()
    assert lines[0] == "cluster prod: 2 member(s), leader b-2 (epoch 4), config version 7"
    header, first, second = lines[2:5]
    assert header.split() == [
        "INSTANCE",
        "HOST",
        "PORTS",
        "VERSION",
        "SESSION",
        "STARTED",
        "LOAD",
        "CHANNELS",
    ]
    assert first.split() == [
        "a-1",
        "h1",
        "mllp=2575,http=8080",
        "0.1.0",
        "CONNECTED",
        "2024-05-01T10:00:00+00:00",
        "mllp_connections=3",
        "lab-drop",
    ]
    assert second.startswith("b-2 *")
    # Columns line up: every row's HOST starts where the header's does.
    assert first.index("h1") == header.index("HOST") == second.index("host-two")
    assert lines[6].split() == ["CHANNEL", "OWNER"]
    assert lines[7].split() == ["lab-drop", "a-1"]
    assert lines[8].split() == ["x", "-"]


def test_render_status_of_an_empty_cluster() -> None:
    text = render_status(
        {
            "cluster": "c",
            "leader": "gone-1",
            "epoch": 2,
            "members": [],
            "channels": [],
            "config_version": None,
        }
    )
    assert text.splitlines()[0] == (
        "cluster c: 0 member(s), leader gone-1 (epoch 2), not a live member, config not pushed"
    )
    assert "no members" in text
