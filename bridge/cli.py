"""The ``hl7bridge`` command line.

Signals are handled here and only here: every component below takes a stop
event or has ``stop()``. stdout carries what a script reads (the ``ready`` line,
ACK summaries, JSON); logs go to stderr.

Exit codes: 0 success; 1 a message was not accepted (``send``) or a runtime
failure; 2 bad usage or configuration (the message names the key); 3 a server
the command needs (ZooKeeper, Kafka) could not be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge import __version__
from bridge.config import SETTING_NAMES, Settings, build_settings, option_name
from bridge.errors import BridgeError, ConfigError, UnavailableError

if TYPE_CHECKING:
    from bridge.cluster.cluster_config import ClusterConfig
    from bridge.cluster.config_store import VersionedConfig
    from bridge.coordination import ZooKeeperSession

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3

log = logging.getLogger("hl7bridge")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # aiokafka logs a line per retry while a broker is away; one is enough.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    logging.getLogger("kazoo").setLevel(max(logging.WARNING, logging.getLevelName(level)))


def _run(main: Coroutine[Any, Any, int]) -> int:
    """Run the command's coroutine on uvloop when available."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result: int = runner.run(main)
        return result


def _stop_event() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM (the only place signals are handled)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _announce(line: str) -> None:
    # Everything allocated while starting lives as long as the process: move it
    # out of the collector's sight so full collections stay short on the ACK path.
    gc.freeze()
    print(line, flush=True)


# --- settings options -----------------------------------------------------------------


def _add_setting_options(parser: argparse.ArgumentParser, names: tuple[str, ...] = ()) -> None:
    """One ``--option`` per setting (all of them unless ``names`` is given)."""
    group = parser.add_argument_group(
        "settings", "each also settable in the --config YAML file and as HL7BRIDGE_<NAME>"
    )
    group.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("HL7BRIDGE_CONFIG"),
        help="YAML file of settings (env HL7BRIDGE_CONFIG)",
    )
    for name, field in Settings.model_fields.items():
        if names and name not in names:
            continue
        default = field.get_default(call_default_factory=False)
        shown = "" if default is None or field.default_factory else f" (default: {default})"
        if isinstance(default, tuple):
            shown = f" (default: {','.join(default)})"
        group.add_argument(
            option_name(name),
            dest=name,
            metavar=name.upper(),
            default=None,
            help=(field.description or name.replace("_", " ")) + shown,
        )


def _cli_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k in SETTING_NAMES and v is not None}


# --- serve ------------------------------------------------------------------------------


async def _serve(settings: Settings) -> int:
    from bridge.service import BridgeInstance

    stop = _stop_event()
    instance = BridgeInstance(settings)
    await instance.start()
    try:
        _announce(instance.ready_line())
        await stop.wait()
        log.info("stopping on signal")
    finally:
        await instance.stop()
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    settings = build_settings(file=args.config, cli=_cli_settings(args))
    _setup_logging(settings.log_level)
    return _run(_serve(settings))


# --- dev ----------------------------------------------------------------------------------


async def _dev(args: argparse.Namespace) -> int:
    from bridge.devstack import DevStack
    from bridge.service import BridgeInstance

    stop = _stop_event()
    stack = DevStack(args.data_dir)
    try:
        await asyncio.to_thread(stack.start)
        # The embedded servers win over any file or environment setting.
        forced = {
            "zookeeper": stack.zookeeper.hosts,
            "kafka": stack.broker.bootstrap,
            "kafka_idempotence": False,
            "kafka_replication_factor": 1,
        }
        base = {"mllp_host": "127.0.0.1", "http_host": "127.0.0.1", "cluster": "dev"}
        settings = build_settings(
            file=args.config, cli={**_cli_settings(args), **forced}, base=base
        )
        logging.getLogger().setLevel(settings.log_level)
        async with BridgeInstance(settings) as instance:
            _announce(instance.ready_line())
            await stop.wait()
            log.info("stopping on signal")
    finally:
        await asyncio.to_thread(stack.stop)
    return EXIT_OK


def cmd_dev(args: argparse.Namespace) -> int:
    _setup_logging("INFO")
    return _run(_dev(args))


# --- send ---------------------------------------------------------------------------------


def cmd_send(args: argparse.Namespace) -> int:
    from bridge.sender import client_tls_context, parse_address, send_files

    host, port = parse_address(args.address)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    tls = client_tls_context(
        enabled=args.tls or args.tls_ca_file is not None or args.tls_cert_file is not None,
        ca_file=args.tls_ca_file,
        cert_file=args.tls_cert_file,
        key_file=args.tls_key_file,
    )
    return _run(
        send_files(
            host,
            port,
            [Path(f) for f in args.files],
            timeout_s=args.timeout_s,
            as_json=args.json,
            tls=tls,
            server_hostname=args.tls_server_name or host,
        )
    )


# --- convert ------------------------------------------------------------------------------

#: The settings that change what a message maps to; convert takes them like serve does
#: (strict_mapping too, as the flag --strict-mapping).
CONVERT_SETTINGS = ("identifier_systems", "hl7_default_timezone")


def cmd_convert(args: argparse.Namespace) -> int:
    from bridge.convert import convert_files, options_from_settings

    settings = build_settings(file=args.config, cli=_cli_settings(args))
    return convert_files(
        [Path(f) for f in args.files],
        options_from_settings(settings),
        data_only=args.data_only,
        json_lines=args.json_lines,
    )


# --- config and status (the cluster in ZooKeeper) -------------------------------------------

#: The settings that say which cluster in which ZooKeeper: `config` and `status` take them
#: like serve does (options, HL7BRIDGE_* variables, the --config file).
CLUSTER_SETTINGS = (
    "zookeeper",
    "zookeeper_chroot",
    "zookeeper_session_timeout_s",
    "zookeeper_digest",
    "zookeeper_tls",
    "zookeeper_tls_ca_file",
    "zookeeper_tls_cert_file",
    "zookeeper_tls_key_file",
    "cluster",
)


def _add_cluster_options(parser: argparse.ArgumentParser) -> None:
    _add_setting_options(parser, CLUSTER_SETTINGS)
    parser.add_argument(
        "--connect-timeout-s",
        type=float,
        default=10.0,
        help="give up (exit 3) if ZooKeeper cannot be reached within this long (default: 10)",
    )


def _cluster_command(
    args: argparse.Namespace,
    action: Callable[[ZooKeeperSession, Settings], Awaitable[int]],
    *,
    writes: bool = True,
) -> int:
    """Build the settings, connect to the cluster's ZooKeeper, run ``action``, disconnect.
    A command that only reads (``writes`` False) creates nothing, not even the
    cluster's base path (a mistyped ``--cluster`` must not leave a node behind)."""
    from bridge.coordination import ZooKeeperSession

    settings = build_settings(file=args.config, cli=_cli_settings(args))
    if not args.connect_timeout_s > 0:
        raise ConfigError("--connect-timeout-s must be greater than 0", key="connect_timeout_s")
    _setup_logging(settings.log_level)
    if settings.log_level != "DEBUG":
        # One clear message on failure instead of a kazoo warning per connection attempt.
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("kazoo").setLevel(logging.CRITICAL)

    async def run() -> int:
        session = ZooKeeperSession(
            settings.zookeeper_servers,
            settings.zookeeper_base_path,
            session_timeout_s=settings.zookeeper_session_timeout_s,
            connect_timeout_s=args.connect_timeout_s,
            create_base=writes,
            digest=settings.zookeeper_digest_value,
            tls=settings.zookeeper_tls_options(),
        )
        await session.start()
        try:
            return await action(session, settings)
        finally:
            await session.stop()

    return _run(run())


def _read_cluster_config_file(path: Path) -> ClusterConfig:
    from bridge.cluster.cluster_config import parse_cluster_config

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}", key="FILE") from exc
    return parse_cluster_config(data, where=str(path))


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def cmd_config_push(args: argparse.Namespace) -> int:
    from bridge.cluster.config_store import ConfigStore

    # Validate before connecting: a bad file is refused and nothing is written.
    config = _read_cluster_config_file(args.file)

    async def push(session: ZooKeeperSession, settings: Settings) -> int:
        result = await ConfigStore(session).commit(config, source="cli")
        if result.changed:
            print(f"pushed version {result.version}")
        else:
            print(f"unchanged: version {result.version}")
        return EXIT_OK

    return _cluster_command(args, push)


def _show_yaml(versioned: VersionedConfig) -> str:
    import yaml

    header = [
        f"# cluster config version {versioned.version}, pushed {versioned.pushed_at}"
        + (f" by {versioned.source}" if versioned.source else ""),
        f"# digest sha256:{versioned.digest}",
    ]
    if versioned.rolled_back_to is not None:
        header.append(f"# a rollback to version {versioned.rolled_back_to}")
    body = yaml.safe_dump(
        versioned.config.canonical(), sort_keys=False, allow_unicode=True, width=100
    )
    return "\n".join(header) + "\n" + body


def cmd_config_show(args: argparse.Namespace) -> int:
    from bridge.cluster.config_store import ConfigStore

    async def show(session: ZooKeeperSession, settings: Settings) -> int:
        store = ConfigStore(session)
        versioned = await (store.get(args.version) if args.version else store.current())
        if versioned is None:
            print(
                f"hl7bridge config show: no cluster config has been pushed to cluster "
                f"{settings.cluster!r} ({session.base_path})",
                file=sys.stderr,
            )
            return EXIT_FAILED
        if args.json:
            _print_json(versioned.to_json())
        else:
            sys.stdout.write(_show_yaml(versioned))
        return EXIT_OK

    return _cluster_command(args, show, writes=False)


def cmd_config_history(args: argparse.Namespace) -> int:
    from bridge.cluster.config_store import ConfigStore

    async def history(session: ZooKeeperSession, settings: Settings) -> int:
        versions = await ConfigStore(session).history()
        if args.json:
            _print_json([{k: v for k, v in r.to_json().items() if k != "config"} for r in versions])
            return EXIT_OK
        if not versions:
            print(f"hl7bridge config history: no versions in {session.base_path}", file=sys.stderr)
            return EXIT_OK
        width = len(str(versions[-1].version))
        for r in versions:
            note = f"  rollback to {r.rolled_back_to}" if r.rolled_back_to is not None else ""
            print(f"{r.version:>{width}}  {r.pushed_at}  {r.digest[:12]}  {r.source or '-'}{note}")
        return EXIT_OK

    return _cluster_command(args, history, writes=False)


def cmd_config_rollback(args: argparse.Namespace) -> int:
    from bridge.cluster.config_store import ConfigStore

    async def rollback(session: ZooKeeperSession, settings: Settings) -> int:
        store = ConfigStore(session)
        earlier = await store.get(args.version)
        result = await store.commit(earlier.config, source="cli", rolled_back_to=args.version)
        if result.changed:
            print(f"pushed version {result.version} (rollback to version {args.version})")
        else:
            print(
                f"unchanged: version {result.version} "
                f"(already the content of version {args.version})"
            )
        return EXIT_OK

    return _cluster_command(args, rollback)


def cmd_status(args: argparse.Namespace) -> int:
    from bridge.cluster.status import read_status, render_status

    async def status(session: ZooKeeperSession, settings: Settings) -> int:
        found = await read_status(session, cluster=settings.cluster)
        if args.json:
            _print_json(found)
        else:
            sys.stdout.write(render_status(found))
        return EXIT_OK

    return _cluster_command(args, status, writes=False)


#: How a command reaches Kafka: servers, TLS, SASL.
KAFKA_SETTINGS = (
    "kafka",
    "kafka_security_protocol",
    "kafka_ssl_ca_file",
    "kafka_ssl_cert_file",
    "kafka_ssl_key_file",
    "kafka_ssl_check_hostname",
    "kafka_sasl_mechanism",
    "kafka_sasl_username",
    "kafka_sasl_password",
)
SUBSCRIBE_SETTINGS = (
    *CLUSTER_SETTINGS,
    *KAFKA_SETTINGS,
    "topic_prefix",
    "kafka_idempotence",
    "kafka_publish_timeout_s",
    "log_level",
)


def cmd_subscribe(args: argparse.Namespace) -> int:
    from bridge.diagnosis.handlers import ExecHandler, Handler, WebhookHandler
    from bridge.diagnosis.subscriber import Subscriber, SubscriberSettings

    settings = build_settings(file=args.config, cli=_cli_settings(args))
    if not args.max_attempts >= 1:
        raise ConfigError("--max-attempts must be at least 1", key="max_attempts")
    if not args.handler_timeout_s > 0:
        raise ConfigError("--handler-timeout-s must be greater than 0", key="handler_timeout_s")
    _setup_logging(settings.log_level)
    handler: Handler
    if args.exec_command is not None:
        handler = ExecHandler(args.exec_command, timeout_s=args.handler_timeout_s)
    else:
        handler = WebhookHandler(args.webhook, timeout_s=args.handler_timeout_s)
    values: dict[str, Any] = {
        "zookeeper": settings.zookeeper_servers,
        "base_path": settings.zookeeper_base_path,
        "kafka": settings.kafka_client(),
        "topic_prefix": settings.topic_prefix,
        "rules": tuple(args.rule),
        "max_attempts": args.max_attempts,
        "session_timeout_s": settings.zookeeper_session_timeout_s,
        "digest": settings.zookeeper_digest_value,
        "zookeeper_tls": settings.zookeeper_tls_options(),
        "kafka_idempotence": settings.kafka_idempotence,
        "kafka_publish_timeout_s": settings.kafka_publish_timeout_s,
    }
    if args.subscriber_id:
        values["subscriber_id"] = args.subscriber_id
    subscriber = Subscriber(SubscriberSettings(**values), handler)

    async def run() -> int:
        stop = _stop_event()
        await subscriber.start()
        try:
            _announce(
                f"ready subscriber={subscriber.settings.subscriber_id} "
                f"rules={','.join(subscriber.settings.rules)} cluster={settings.cluster}"
            )
            await stop.wait()
        finally:
            await subscriber.stop()
        return EXIT_OK

    return _run(run())


# --- replay ---------------------------------------------------------------------------------

#: The settings that say where the records are: replay takes them like serve does.
REPLAY_SETTINGS = (*KAFKA_SETTINGS, "topic_prefix", "log_level")


def cmd_replay(args: argparse.Namespace) -> int:
    from bridge.kafka import Topics
    from bridge.replay import ReplayItem, ReplayTarget, Selection, replay, select_records

    settings = build_settings(file=args.config, cli=_cli_settings(args))
    if not args.timeout_s > 0:
        raise ConfigError("--timeout-s must be greater than 0", key="timeout_s")
    partitions = None if args.partition is None else [args.partition]
    criteria: dict[str, Any] = {
        "partitions": partitions,
        "from_offset": args.from_offset,
        "to_offset": args.to_offset,
        "since": args.since,
        "until": args.until,
        "sender": args.sender,
        "control_id": args.control_id,
    }
    Selection.build(**criteria)  # bad criteria: exit 2 before connecting to anything
    target = None if args.dry_run else ReplayTarget.parse(args.to, timeout_s=args.timeout_s)
    _setup_logging(settings.log_level)
    if settings.log_level != "DEBUG":
        # One clear message on failure instead of aiokafka's line per connection attempt.
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    topics = Topics(settings.topic_prefix)
    topic = topics.dlq if args.dlq else topics.raw_hl7v2

    def show(item: ReplayItem) -> None:
        line = json.dumps(item.to_json(), ensure_ascii=False) if args.json else item.line()
        print(line, flush=True)

    async def run() -> int:
        kafka = settings.kafka_client()
        records = select_records(kafka, topic, timeout_s=args.timeout_s, **criteria)
        report = await replay(records, target, dry_run=args.dry_run, on_item=show)
        if args.json:
            print(json.dumps({"summary": report.summary()}))
        else:
            print(report.summary_line())
        return EXIT_OK if report.ok else EXIT_FAILED

    return _run(run())


def _add_message_selection(parser: argparse.ArgumentParser, group: Any | None = None) -> Any:
    """``--sender`` and ``--control-id`` (in ``group``, or a new selection group)."""
    select = group or parser.add_argument_group("selection (every criterion given must hold)")
    select.add_argument(
        "--sender", metavar="APP|FAC", help="MSH-3|MSH-4 exactly, or APP for any facility"
    )
    select.add_argument("--control-id", metavar="ID", help="MSH-10")
    return select


# --- tail ------------------------------------------------------------------------------------


def cmd_tail(args: argparse.Namespace) -> int:
    from bridge.kafka import Topics
    from bridge.tail import TOPIC_NAMES, Trace, json_line, start_of, tail, text_line, topic_name

    settings = build_settings(file=args.config, cli=_cli_settings(args))
    if not args.timeout_s > 0:
        raise ConfigError("--timeout-s must be greater than 0", key="timeout_s")
    topics = Topics(settings.topic_prefix)
    if args.all and args.topics:
        raise ConfigError("name topics or give --all, not both", key="topic")
    names = TOPIC_NAMES if args.all else (args.topics or ["events"])
    chosen = list(dict.fromkeys(topic_name(topics, n) for n in names))
    trace = Trace.build(
        since=args.since,
        until=args.until,
        sender=args.sender,
        control_id=args.control_id,
        event_id=args.event_id,
    )
    follow = not args.no_follow and args.until is None
    start = start_of(
        from_beginning=args.from_beginning, since=args.since, last=args.last, follow=follow
    )
    _setup_logging(settings.log_level)
    if settings.log_level != "DEBUG":
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)

    def show(record: Any) -> None:
        if args.json:
            print(json_line(record, data=args.data), flush=True)
        else:
            print(text_line(record, settings.topic_prefix, data=args.data), flush=True)

    async def run() -> int:
        stop = _stop_event()
        shown = await tail(
            settings.kafka_client(), chosen, trace, show,
            start=start, follow=follow, stop=stop, timeout_s=args.timeout_s,
        )  # fmt: skip
        if follow or shown:
            return EXIT_OK
        print(f"hl7bridge tail: no record matched in {', '.join(chosen)}", file=sys.stderr)
        return EXIT_FAILED

    return _run(run())


def _add_tail_parser(sub: Any) -> None:
    tail = sub.add_parser(
        "tail",
        help="follow the bridge's topics, or trace one message through them",
        description=(
            "Print the records of the named topics (short names: raw.hl7v2, raw.fhir, "
            "events, dlq, diagnosis, or a routed topic's suffix; default events; --all for "
            "the five) one line each: time, topic, PARTITION@OFFSET, event type and the ids, "
            "codes, sender and DLQ reason from the headers, never the content. Reads from "
            "the end and follows new records (Ctrl-C stops); --no-follow reads up to the "
            "current end, from the beginning unless --since/--last says otherwise. To trace "
            "a message: --all --no-follow --control-id ID (its raw record, event, DLQ "
            "record, and the remote-diagnosis case records of its event). Exit 0; with "
            "--no-follow 1 if no record matched; 2 bad usage; 3 Kafka unreachable."
        ),
    )
    tail.add_argument("topics", nargs="*", metavar="TOPIC", help="short topic names")
    tail.add_argument("--all", action="store_true", help="the five topics, in pipeline order")
    where = tail.add_mutually_exclusive_group()
    where.add_argument(
        "--from-beginning", action="store_true", help="start at the beginning of each partition"
    )
    where.add_argument("--since", metavar="T", help="start at records written at or after T")
    where.add_argument("--last", type=int, metavar="N", help="start N records before the end")
    tail.add_argument(
        "--until", metavar="T", help="only records written at or before T (implies --no-follow)"
    )
    tail.add_argument("--no-follow", action="store_true", help="stop at the current end")
    select = _add_message_selection(tail)
    select.add_argument(
        "--event-id",
        metavar="ID",
        help="ce_id (the X-Event-Id of a FHIR answer), or a case's event",
    )
    tail.add_argument("--json", action="store_true", help="one JSON object per record")
    tail.add_argument(
        "--data",
        action="store_true",
        help="also print each record's key and value: PATIENT DATA, for your terminal only",
    )
    tail.add_argument(
        "--timeout-s", type=float, default=30.0, help="to reach Kafka and per reading step (30)"
    )
    _add_setting_options(tail, REPLAY_SETTINGS)
    tail.set_defaults(func=cmd_tail)


def _add_replay_parser(sub: Any) -> None:
    replay = sub.add_parser(
        "replay",
        help="re-send selected DLQ or raw HL7 v2 records to a bridge instance over MLLP",
        description=(
            "Read <prefix>.dlq (--dlq) or <prefix>.raw.hl7v2 (--raw) up to its current end, "
            "select records (every criterion given must hold; bounds are included) and send "
            "each to a bridge instance's MLLP listener (--to), one connection, one ACK per "
            "message, in record-time order; or list them (--dry-run). The instance applies its "
            "usual rules: a message it accepted within dedupe_window_s is answered as a "
            "duplicate and not published again; DLQ records were never accepted and publish "
            "normally once accepted. FHIR records are skipped and counted. Prints "
            "'PARTITION:OFFSET CONTROL-ID → ACK-CODE' (or 'would send ...') per record and a "
            "summary. Exit 0 if every replayed message got AA/CA, 1 otherwise, 2 bad usage, "
            "3 Kafka unreachable."
        ),
    )
    source = replay.add_mutually_exclusive_group(required=True)
    source.add_argument("--dlq", action="store_true", help="replay from <prefix>.dlq")
    source.add_argument("--raw", action="store_true", help="replay from <prefix>.raw.hl7v2")
    select = replay.add_argument_group("selection")
    select.add_argument("--partition", type=int, metavar="N", help="only this partition")
    select.add_argument(
        "--from-offset", type=int, metavar="N", help="first offset (needs --partition)"
    )
    select.add_argument(
        "--to-offset", type=int, metavar="N", help="last offset, included (needs --partition)"
    )
    select.add_argument(
        "--since", metavar="T", help="records written at or after T (RFC 3339, with offset)"
    )
    select.add_argument("--until", metavar="T", help="records written at or before T (RFC 3339)")
    _add_message_selection(replay, select)
    action = replay.add_mutually_exclusive_group(required=True)
    action.add_argument("--to", metavar="HOST:PORT", help="the MLLP listener to send to")
    action.add_argument(
        "--dry-run", action="store_true", help="list what would be sent; send nothing"
    )
    replay.add_argument("--json", action="store_true", help="one JSON object per record")
    replay.add_argument(
        "--timeout-s",
        type=float,
        default=30.0,
        help="wait this long per ACK, and for Kafka (default: 30)",
    )
    _add_setting_options(replay, REPLAY_SETTINGS)
    replay.set_defaults(func=cmd_replay)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a version number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"versions start at 1, not {value}")
    return value


def _add_config_parser(sub: Any) -> None:
    config = sub.add_parser(
        "config",
        help="push, show, list and roll back the cluster config kept in ZooKeeper",
        description=(
            "The cluster config (accepted message types, directory channels, diagnosis rules, "
            "topic routes; schema: schemas/cluster-config.schema.json) is shared by every "
            "instance of a cluster and versioned in ZooKeeper. Every push makes a new version; "
            "old versions are kept."
        ),
    )
    actions = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")

    push = actions.add_parser(
        "push",
        help="validate a YAML or JSON file and make it the current version",
        description=(
            "Validate FILE (YAML or JSON) and make it the new current version. A file that "
            "does not validate is refused (exit 2, the message names the key) and nothing is "
            "written. Prints 'pushed version N', or 'unchanged: version N' if the content is "
            "already current."
        ),
    )
    push.add_argument("file", metavar="FILE", type=Path)
    _add_cluster_options(push)
    push.set_defaults(func=cmd_config_push)

    show = actions.add_parser(
        "show",
        help="print the current (or an earlier) version",
        description=(
            "Print the current version as YAML (a valid input for push), or as JSON with "
            "its version, pushed_at and digest. Exit 1 if none was pushed."
        ),
    )
    show.add_argument(
        "--version", type=_positive_int, metavar="N", help="this version instead of the current"
    )
    show.add_argument("--json", action="store_true", help="print JSON with version and digest")
    _add_cluster_options(show)
    show.set_defaults(func=cmd_config_show)

    history = actions.add_parser(
        "history",
        help="list every version pushed, oldest first",
        description="One line per version: version, pushed_at, digest (12 hex), source.",
    )
    history.add_argument(
        "--json", action="store_true", help="a JSON list (every field but the config itself)"
    )
    _add_cluster_options(history)
    history.set_defaults(func=cmd_config_history)

    rollback = actions.add_parser(
        "rollback",
        help="push the content of an earlier version again, as a new version",
        description=(
            "Make the content of version N current again as a new version (history stays "
            "linear; the new version records rolled_back_to N). Prints 'pushed version M "
            "(rollback to version N)'."
        ),
    )
    rollback.add_argument("version", metavar="N", type=_positive_int)
    _add_cluster_options(rollback)
    rollback.set_defaults(func=cmd_config_rollback)


# --- parser and main ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hl7bridge",
        description=(
            "HL7 v2 / FHIR R4 integration bridge: MLLP and FHIR in, CloudEvents on Kafka out."
        ),
    )
    parser.add_argument("--version", action="version", version=f"hl7bridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dev = sub.add_parser(
        "dev",
        help="run an embedded ZooKeeper and Kafka-protocol broker and one bridge instance",
        description=(
            "Start ZooKeeper and the Tansu broker as child processes, create the topics, run "
            "one bridge instance and print one 'ready ...' line. Ctrl-C or SIGTERM stops all."
        ),
    )
    dev.add_argument("--data-dir", type=Path, default=None, help="keep server data here")
    _add_setting_options(dev)
    dev.set_defaults(func=cmd_dev)

    serve = sub.add_parser(
        "serve",
        help="run a bridge instance against external ZooKeeper and Kafka",
        description="Run one bridge instance of a cluster. Prints one 'ready ...' line.",
    )
    _add_setting_options(serve)
    serve.set_defaults(func=cmd_serve)

    send = sub.add_parser(
        "send",
        help="send HL7 v2 messages from files over MLLP and print each ACK",
        description=(
            "Send every message in the files over one MLLP connection, waiting for each ACK. "
            "Prints MSA-1, MSA-2 and any ERR per message; exits 1 if any answer is not AA/CA."
        ),
    )
    send.add_argument("address", metavar="HOST:PORT")
    send.add_argument("files", metavar="FILE", nargs="+")
    send.add_argument("--timeout-s", type=float, default=30.0, help="wait this long per ACK")
    send.add_argument("--json", action="store_true", help="one JSON object per ACK")
    tls = send.add_argument_group("TLS", "MLLP over TLS; the server certificate is always verified")
    tls.add_argument("--tls", action="store_true", help="connect with TLS (system CA store)")
    tls.add_argument("--tls-ca-file", type=Path, help="PEM CA bundle to verify the server with")
    tls.add_argument("--tls-cert-file", type=Path, help="PEM client certificate (mutual TLS)")
    tls.add_argument("--tls-key-file", type=Path, help="PEM key of the client certificate")
    tls.add_argument("--tls-server-name", help="name to check in the server certificate")
    send.set_defaults(func=cmd_send)

    convert = sub.add_parser(
        "convert",
        help="convert HL7 v2 messages from files to the CloudEvents the bridge publishes",
        description=(
            "Offline, no servers: parse, validate and map every message in the files and print "
            "its CloudEvent in structured JSON (the same id, type, subject and FHIR data as on "
            "Kafka). Messages of any type are converted (accept_message_types does not apply). "
            "Exits 1 if any message could not be converted (FILE#N and the reason on stderr), "
            "2 if a file cannot be read."
        ),
    )
    convert.add_argument("files", metavar="FILE", nargs="+")
    convert.add_argument(
        "--data-only", action="store_true", help="print only the FHIR Bundle, not the event"
    )
    convert.add_argument(
        "--json-lines", action="store_true", help="one JSON document per line (default: indented)"
    )
    convert.add_argument(
        "--strict-mapping",
        dest="strict_mapping",
        action="store_const",
        const=True,
        default=None,
        help="fail a message with content the mapping does not carry (setting strict_mapping)",
    )
    _add_setting_options(convert, CONVERT_SETTINGS)
    convert.set_defaults(func=cmd_convert)

    _add_config_parser(sub)

    status = sub.add_parser(
        "status",
        help="show the cluster's members, leader, channel owners and config version",
        description=(
            "Read the cluster's state from ZooKeeper: live members (host, ports, version, "
            "load, ZooKeeper session), the leader and its epoch, which member owns each "
            "channel, the current config version. --json prints it for scripts."
        ),
    )
    status.add_argument("--json", action="store_true", help="print one JSON document")
    _add_cluster_options(status)
    status.set_defaults(func=cmd_status)

    subscribe = sub.add_parser(
        "subscribe",
        help="work remote-diagnosis cases of some rules with a command or a webhook",
        description=(
            "Register as a remote-diagnosis subscriber of the given rules, take each new "
            "case (one subscriber per case), fetch its event from Kafka and run the handler: "
            "--exec runs CMD through the shell with the event (CloudEvent JSON) on stdin and "
            "HL7BRIDGE_CASE_ID, HL7BRIDGE_RULE, HL7BRIDGE_EVENT_ID, HL7BRIDGE_ATTEMPT in the "
            "environment, and publishes what it prints (a FHIR resource) as the result; "
            "--webhook POSTs a subscription notification Bundle and publishes the resource "
            "the webhook answers with. Prints a ready line, runs until SIGINT or SIGTERM."
        ),
    )
    subscribe.add_argument(
        "--rule", action="append", required=True, help="a rule to serve (repeat for more)"
    )
    handler = subscribe.add_mutually_exclusive_group(required=True)
    handler.add_argument("--exec", dest="exec_command", metavar="CMD", help="shell command")
    handler.add_argument("--webhook", metavar="URL", help="URL to POST notifications to")
    subscribe.add_argument("--subscriber-id", help="this subscriber's name (default: host+random)")
    subscribe.add_argument(
        "--max-attempts", type=int, default=3, help="tries per case before it fails (3)"
    )
    subscribe.add_argument("--handler-timeout-s", type=float, default=60.0, help="per attempt (60)")
    _add_setting_options(subscribe, SUBSCRIBE_SETTINGS)
    subscribe.set_defaults(func=cmd_subscribe)

    _add_replay_parser(sub)
    _add_tail_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as exc:
        print(f"hl7bridge {args.command}: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UnavailableError as exc:
        print(f"hl7bridge {args.command}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except BridgeError as exc:
        print(f"hl7bridge {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
