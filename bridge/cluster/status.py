"""What ``hl7bridge status`` shows: members, leader, channel owners, config version.

Read-only: the nodes are read as they are (:mod:`bridge.cluster.layout`). A node
that vanishes while it is read (a member leaving) is left out; a node whose data
is not the JSON expected is shown with what could be read, never an error, so
status works on a cluster in any state.

The JSON shape, for scripts::

    {"cluster": "prod", "leader": "a-1" | null, "epoch": 4 | null,
     "members": [{"instance": "a-1", "host": "...", "ports": {"mllp": 2575, ...},
                  "version": "0.1.0", "started": "...", "load": {...},
                  "session": ..., "leader": true, "channels": ["lab-drop"]}],
     "channels": [{"name": "lab-drop", "owner": "a-1" | null}],
     "config_version": 3 | null,
     "diagnosis": {"open_cases": {"critical-results": 2}, "claimed": 1,
                   "subscribers": [{"subscriber": "s-1", "rules": ["critical-results"],
                                    "host": "..."}]}}

Diagnosis shows counts and subscriber names only: a case node holds pointers, and
status does not even read those.

Members are sorted by instance id, channels by name. ``channels`` lists every
channel that has a node under ``channels/`` and every channel of the current
cluster config, owned or not.
"""

from __future__ import annotations

from typing import Any

import orjson
from kazoo.exceptions import NoNodeError

from bridge.cluster import layout
from bridge.coordination import ZooKeeperSession


def _json(raw: bytes | None) -> Any:
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _ports(data: dict[str, Any]) -> dict[str, Any]:
    """``ports`` as the layout has it, or the ``<name>_port`` keys older members write."""
    ports = data.get("ports")
    if isinstance(ports, dict):
        return ports
    return {
        key.removesuffix("_port"): value
        for key, value in data.items()
        if key.endswith("_port") and value is not None
    }


def _read_sync(session: ZooKeeperSession) -> dict[str, Any]:
    client = session.client

    def get(*parts: str) -> bytes | None:
        try:
            data: bytes = client.get(session.path(*parts))[0]
        except NoNodeError:
            return None
        return data

    def children(*parts: str) -> list[str]:
        try:
            names: list[str] = client.get_children(session.path(*parts))
        except NoNodeError:
            return []
        return names

    members: dict[str, dict[str, Any]] = {}
    for name in children(layout.MEMBERS):
        raw = get(layout.MEMBERS, name)
        if raw is None:  # left while we looked
            continue
        data = _json(raw)
        members[name] = data if isinstance(data, dict) else {}

    leader_data = _json(get(layout.LEADER))
    leader_data = leader_data if isinstance(leader_data, dict) else {}

    owners: dict[str, str | None] = {}
    for name in children(layout.CHANNELS):
        owner = _json(get(layout.CHANNELS, name, layout.OWNER))
        owners[name] = _str(owner.get("instance")) if isinstance(owner, dict) else None

    config = _json(get(layout.CONFIG))
    config = config if isinstance(config, dict) else {}
    content = config.get("config")
    configured = content.get("channels") if isinstance(content, dict) else None
    for channel in configured if isinstance(configured, list) else []:
        configured_name = _str(channel.get("name")) if isinstance(channel, dict) else None
        if configured_name is not None:
            owners.setdefault(configured_name, None)

    diagnosis_cases = {
        rule: len(children("diagnosis", "cases", rule)) for rule in children("diagnosis", "cases")
    }
    subscribers = []
    for name in sorted(children("diagnosis", "subscribers")):
        info = _json(get("diagnosis", "subscribers", name))
        info = info if isinstance(info, dict) else {}
        rules = info.get("rules")
        subscribers.append(
            {
                "subscriber": name,
                "rules": rules if isinstance(rules, list) else [],
                "host": _str(info.get("host")),
            }
        )
    return {
        "diagnosis": {
            "open_cases": {rule: n for rule, n in sorted(diagnosis_cases.items())},
            "claimed": len(children("diagnosis", "claims")),
            "subscribers": subscribers,
        },
        "members": members,
        "leader": _str(leader_data.get("leader")),
        "epoch": _int(leader_data.get("epoch")),
        "owners": owners,
        "config_version": _int(config.get("version")),
    }


async def read_status(session: ZooKeeperSession, *, cluster: str | None = None) -> dict[str, Any]:
    """The cluster's state as one JSON-able dict (shape in the module docstring).

    ``cluster`` names the cluster in the result; default: the last part of the
    session's base path (``/hl7bridge/<cluster>``).
    """
    raw = await session.call(_read_sync, session)
    leader: str | None = raw["leader"]
    owners: dict[str, str | None] = raw["owners"]
    members = []
    for instance in sorted(raw["members"]):
        data = raw["members"][instance]
        members.append(
            {
                "instance": instance,
                "host": data.get("host"),
                "ports": _ports(data),
                "version": data.get("version"),
                "started": data.get("started"),
                "load": data.get("load"),
                "session": data.get("session"),
                "leader": instance == leader,
                "channels": sorted(name for name, owner in owners.items() if owner == instance),
            }
        )
    return {
        "cluster": cluster or session.base_path.rstrip("/").rsplit("/", 1)[-1] or "/",
        "leader": leader,
        "epoch": raw["epoch"],
        "members": members,
        "channels": [{"name": name, "owner": owners[name]} for name in sorted(owners)],
        "config_version": raw["config_version"],
        "diagnosis": raw["diagnosis"],
    }


def _cell(value: Any) -> str:
    if value is None or value == {} or value == []:
        return "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={_cell(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ",".join(_cell(v) for v in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def render_status(status: dict[str, Any]) -> str:
    """A short human-readable form of :func:`read_status`'s result (ends with a newline)."""
    leader = status.get("leader")
    members = status.get("members") or []
    live = {m["instance"] for m in members}
    if leader is None:
        leader_text = "none"
    else:
        leader_text = f"{leader} (epoch {_cell(status.get('epoch'))})"
        if leader not in live:
            leader_text += ", not a live member"
    version = status.get("config_version")
    lines = [
        f"cluster {status.get('cluster')}: {len(members)} member(s), leader {leader_text}, "
        f"config {'version ' + str(version) if version is not None else 'not pushed'}",
        "",
    ]
    if members:
        rows = [
            [
                m["instance"] + (" *" if m.get("leader") else ""),
                _cell(m.get("host")),
                _cell(m.get("ports")),
                _cell(m.get("version")),
                _cell(m.get("session")),
                _cell(m.get("started")),
                _cell(m.get("load")),
                _cell(m.get("channels")),
            ]
            for m in members
        ]
        header = ["INSTANCE", "HOST", "PORTS", "VERSION", "SESSION", "STARTED", "LOAD", "CHANNELS"]
        lines += _table(header, rows)
    else:
        lines.append("no members")
    channels = status.get("channels") or []
    if channels:
        lines.append("")
        lines += _table(
            ["CHANNEL", "OWNER"],
            [[c["name"], _cell(c.get("owner"))] for c in channels],
        )
    diagnosis = status.get("diagnosis") or {}
    open_cases = diagnosis.get("open_cases") or {}
    subscribers = diagnosis.get("subscribers") or []
    if open_cases or subscribers:
        lines.append("")
        lines.append(
            f"diagnosis: {sum(open_cases.values())} open case(s) "
            f"({_cell(open_cases)}), {diagnosis.get('claimed', 0)} claimed, "
            f"{len(subscribers)} subscriber(s)"
        )
        if subscribers:
            lines += _table(
                ["SUBSCRIBER", "RULES", "HOST"],
                [
                    [x["subscriber"], _cell(x.get("rules")), _cell(x.get("host"))]
                    for x in subscribers
                ],
            )
    return "\n".join(lines) + "\n"
