"""The znode layout under a cluster's base path, in one place (DESIGN.md §4).

=================================  ============================================================
``members/<instance>``             ephemeral; JSON: instance, host, ports, version, started,
                                   load, ``session`` (the member's ZooKeeper state as it last
                                   wrote it)
``election/n_<seq>``               ephemeral sequential; data: the candidate's instance id
``leader``                         persistent; JSON ``{"leader": id, "epoch": n, "since": t}``;
                                   the epoch grows by one at every change of leader
``config``                         persistent; JSON ``{"version": n, "pushed_at": t,
                                   "digest": sha256, "config": {...}}``
``config-history/v<NNNNNNNNNN>``   persistent; the same JSON for every version ever pushed
``channels/<name>/assignment``     persistent; JSON ``{"instance": id, "epoch": n}``, written by
                                   the leader (checked against ``leader``'s version)
``channels/<name>/owner``          ephemeral; JSON ``{"instance": id, "since": t}``
``channels/<name>/fence``          persistent; its version is the channel's ownership token
``channels/<name>/progress/<key>`` persistent; a file's progress (a hash of its name, never
                                   the name itself): JSON, see ``bridge.cluster.channels``
=================================  ============================================================
"""

from __future__ import annotations

from typing import Final

MEMBERS: Final = "members"
ELECTION: Final = "election"
ELECTION_PREFIX: Final = "n_"
LEADER: Final = "leader"
CONFIG: Final = "config"
CONFIG_HISTORY: Final = "config-history"
CHANNELS: Final = "channels"
ASSIGNMENT: Final = "assignment"
OWNER: Final = "owner"
FENCE: Final = "fence"
PROGRESS: Final = "progress"


def history_node(version: int) -> str:
    """The name of a config version's node under ``config-history`` (sorts by name)."""
    return f"v{version:010d}"


def version_of(node: str) -> int:
    return int(node.removeprefix("v"))
