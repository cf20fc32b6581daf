"""The `pychat` command: serve, and user and chat administration."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import secrets
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pychat import __version__
from pychat.auth import TokenIssuer, hash_password
from pychat.config import Config, load_config
from pychat.control import ask_server
from pychat.errors import ApiError
from pychat.extras import MissingExtra, missing
from pychat.ids import new_id, now_ms
from pychat.plugins.host import PluginError
from pychat.server import Server
from pychat.store import Chat, Store, User, open_store, sqlite_file


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML configuration file")
    p.add_argument("--data-dir", help="where the database and media live")
    p.add_argument("--store", help="sqlite:///path or cassandra://host:port/keyspace")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pychat", description="pychat chat engine")
    parser.add_argument("--version", action="version", version=f"pychat {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a server node")
    doctor = sub.add_parser(
        "doctor",
        help="check the configuration, data dir, store, ports and cluster services `serve` would use"
        " (one line each; exit 1 if anything is wrong)",
    )
    for p in (serve, doctor):
        _common(p)
        p.add_argument("--host")
        p.add_argument("--port", type=int, help="REST port")
        p.add_argument("--ws-port", type=int, help="WebSocket port")
        p.add_argument("--kafka", help="cluster node: Kafka bootstrap servers (host:port)")
        p.add_argument("--redis", help="cluster node: Redis URL (redis://host:port/0)")
        p.add_argument("--node-id", help="cluster node: this node's id (default host-port)")
    plugins = sub.add_parser("plugins", help="load the configured plugins and list them with their hooks")
    _common(plugins)
    migrate = sub.add_parser("migrate", help="create or upgrade the store's schema, then exit")
    _common(migrate)
    user = sub.add_parser("user", help="user administration")
    usub = user.add_subparsers(dest="user_command", required=True)
    add = usub.add_parser("add", help="create a user and print a token for it")
    _common(add)
    add.add_argument("name")
    add.add_argument("--password", help="default: asked for, or random with --random-password")
    add.add_argument("--random-password", action="store_true")
    add.add_argument("--display-name")
    listing = usub.add_parser("list", help="list the users: id, username, created (no secrets)")
    _common(listing)
    listing.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    passwd = usub.add_parser("passwd", help="set a user's password (asked twice, or read from stdin)")
    _common(passwd)
    passwd.add_argument("name")
    passwd.add_argument(
        "--password-stdin", action="store_true", help="read the password from the first line of stdin"
    )
    chat = sub.add_parser("chat", help="chat administration")
    csub = chat.add_subparsers(dest="chat_command", required=True)
    create = csub.add_parser("create", help="create a chat between users (by username)")
    _common(create)
    create.add_argument("--kind", choices=["direct", "group"], default="group")
    create.add_argument("--title")
    create.add_argument("members", nargs="+", help="usernames; the first one is the creator")
    export = sub.add_parser(
        "export",
        help="export chats' histories into Parquet files by chat and day, incrementally (a watermark file in OUT)",
    )
    _common(export)
    export.add_argument("out", help="the folder to write (and its _watermark.json)")
    export.add_argument("--chat", action="append", default=[], help="this chat only (repeatable)")
    export.add_argument("--user", help="the chats of this user (by username)")
    export.add_argument("--quiet", action="store_true", help="no progress bar")
    verify = sub.add_parser(
        "verify",
        help="check an export (a `pychat export` folder or one exported file) against its hash chain",
    )
    _common(verify)
    verify.add_argument("export", help="the folder or file")
    verify.add_argument(
        "--against-store",
        action="store_true",
        help="also compare with the store: each chat's last message, and none it had stored before the export missing",
    )
    restore = sub.add_parser(
        "import",
        help="read a `pychat export` folder into an empty store (a restore, or a move between stores)",
    )
    _common(restore)
    restore.add_argument("export", help="the folder `pychat export` wrote")
    restore.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _print(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _tell_server(config: Config, chat_ids: list[str]) -> None:
    """Tells the server running on the data dir (if one does) which chats were written, so that
    they are live there at once (pychat.control); says on stderr what happened."""
    where = config.data_dir
    try:
        answer = ask_server(where, {"op": "chats_written", "chat_ids": chat_ids})
    except (OSError, ValueError) as e:
        print(f"pychat: the server on {where} did not take the change ({e}): restart it", file=sys.stderr)
        return
    what = "the chat" if len(chat_ids) == 1 else f"the {len(chat_ids)} chats"
    if answer is None:
        print(
            f"pychat: no server running on {where}: the next one started there serves {what}", file=sys.stderr
        )
    else:
        print(f"pychat: server pid {answer.pid} on {where} serves {what} now", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except MissingExtra as e:
        print(f"pychat: {e}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {"data_dir": args.data_dir, "store": args.store}
    if args.command in ("serve", "doctor"):
        overrides |= {
            "host": args.host,
            "port": args.port,
            "ws_port": args.ws_port,
            "kafka": args.kafka,
            "redis": args.redis,
            "node_id": args.node_id,
        }
    if args.command == "doctor":  # reports a configuration that does not load, among the rest
        return _doctor(args.config, overrides)
    try:
        config = load_config(args.config, overrides=overrides)
    except (OSError, ValueError) as e:
        print(f"pychat: configuration error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "serve":
        try:
            asyncio.run(Server(config).serve_forever())
        except PluginError as e:
            print(f"pychat: plugin error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.command == "plugins":
        return _plugins(config.plugins)
    if args.command == "verify" and not args.against_store:
        return _verify(None, args)  # the export alone: no store is opened
    if args.command == "import":
        return _import(config, args)  # the export is checked before the store is opened (made)
    database = sqlite_file(config.store, config.data_dir) if args.command == "verify" else None
    if database is not None and not database.exists():  # a wrong --data-dir: not made here
        print(f"pychat: no store to compare with at {database}", file=sys.stderr)
        return 2
    if args.command == "user" and args.user_command != "add":
        database = sqlite_file(config.store, config.data_dir)
        if database is not None and not database.exists():  # a wrong --data-dir: not made here
            print(f"pychat: no store at {database}: no users", file=sys.stderr)
            return 2
    # Admin commands write the same store; safe while a server runs (SQLite WAL, busy timeout).
    store = open_store(config.store, config.data_dir, config.sqlite_synchronous)
    try:
        if args.command == "migrate":
            print(f"pychat: the store's schema is current ({config.store or 'sqlite://'})")
            return 0
        if args.command == "user" and args.user_command == "list":
            return _user_list(store, args.json)
        if args.command == "user" and args.user_command == "passwd":
            return _user_passwd(store, args)
        if args.command == "user":
            password = args.password
            if password is None:
                password = (
                    secrets.token_urlsafe(12) if args.random_password else getpass.getpass("password: ")
                )
            problem = _password_problem(password)
            if problem is not None:
                print(f"pychat: {problem}", file=sys.stderr)
                return 2
            user = User(new_id("u"), args.name, args.display_name, hash_password(password), now_ms())
            store.create_user(user)
            token, expires_at = TokenIssuer(config.secret_bytes(), config.token_ttl_s).issue(user.user_id)
            out = user.public() | {"token": token, "expires_at": expires_at}
            if args.password is None and args.random_password:
                out["password"] = password
            _print(out)
            return 0
        if args.command == "export":
            return _export(store, args)
        if args.command == "verify":
            return _verify(store, args)
        if args.command == "chat":
            users = [store.user_by_name(n) for n in args.members]
            if any(u is None for u in users):
                missing = [n for n, u in zip(args.members, users, strict=True) if u is None]
                print(f"pychat: no such user: {', '.join(missing)}", file=sys.stderr)
                return 2
            ids = [u.user_id for u in users if u is not None]
            if args.kind == "direct" and len(set(ids)) != 2:
                print("pychat: a direct chat has exactly two members", file=sys.stderr)
                return 2
            key = "|".join(sorted(ids)) if args.kind == "direct" else None
            chat, _ = store.create_chat(
                Chat(new_id("c"), args.kind, args.title, ids[0], now_ms(), 0, ids), key
            )
            _print(chat.to_json())
            _tell_server(config, [chat.chat_id])
            return 0
    except ApiError as e:
        print(f"pychat: {e.code}: {e.message}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 2


# As registration (POST /api/users) takes them.
PASSWORD_MIN, PASSWORD_MAX = 8, 1024


def _password_problem(password: str) -> str | None:
    if len(password) < PASSWORD_MIN:
        return f"password must be at least {PASSWORD_MIN} characters"
    if len(password) > PASSWORD_MAX:
        return f"password must be at most {PASSWORD_MAX} characters"
    return None


def _user_list(store: Store, as_json: bool) -> int:
    users = sorted(store.all_users(), key=lambda u: u.username.lower())
    if as_json:
        _print([u.public() | {"created_at": u.created_at} for u in users])
        return 0
    rows = [("user_id", "username", "created (UTC)")] + [
        (
            u.user_id,
            u.username,
            datetime.fromtimestamp(u.created_at / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S"),
        )
        for u in users
    ]
    id_width, name_width = (max(len(r[i]) for r in rows) for i in (0, 1))
    for user_id, name, created in rows:
        print(f"{user_id:<{id_width}}  {name:<{name_width}}  {created}")
    return 0


def _user_passwd(store: Store, args: argparse.Namespace) -> int:
    user = store.user_by_name(args.name)
    if user is None:
        print(f"pychat: no such user: {args.name}", file=sys.stderr)
        return 2
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"new password for {user.username}: ")
        if getpass.getpass("again: ") != password:
            print("pychat: the two passwords differ; nothing changed", file=sys.stderr)
            return 2
    problem = _password_problem(password)
    if problem is not None:
        print(f"pychat: {problem}; nothing changed", file=sys.stderr)
        return 2
    if not store.set_password_hash(user.user_id, hash_password(password)):
        print(f"pychat: no such user: {args.name}", file=sys.stderr)
        return 2
    # Tokens are signed, not stored: those issued before stay valid until they expire.
    print(
        f"pychat: password of {user.username} changed; tokens issued before stay valid until they"
        " expire (token_ttl_s); changing secret_key ends every user's tokens at once",
        file=sys.stderr,
    )
    return 0


def _doctor(path: str | None, overrides: dict[str, Any]) -> int:
    from pychat.doctor import diagnose

    findings = diagnose(path, overrides)
    for finding in findings:
        print(finding.line())
    return 0 if all(f.ok for f in findings) else 1


def _export(store: Store, args: argparse.Namespace) -> int:
    from pathlib import Path

    try:
        from pychat.archive import export_chats
    except ModuleNotFoundError as e:
        raise missing("export", e) from None

    heads = dict(store.chat_heads())
    if args.chat:
        chats = [(c, heads.get(c, 0)) for c in args.chat]
    elif args.user:
        user = store.user_by_name(args.user)
        if user is None:
            print(f"pychat: no such user: {args.user}", file=sys.stderr)
            return 2
        chats = [(c, last) for c, _, last in store.sync_chats(user.user_id, {})]
    else:  # every chat (those without messages too: an import recreates them)
        chats = sorted((chat_id, heads.get(chat_id, 0)) for chat_id, _, _ in store.all_memberships())
    try:
        summary = export_chats(store, chats, Path(args.out), progress=not args.quiet)
    except ValueError as e:
        print(f"pychat: {e}", file=sys.stderr)
        return 2
    _print(summary.as_json())
    return 0


def _plugins(raw: list[dict[str, Any]]) -> int:
    import importlib.metadata

    from pychat.plugins.host import ENTRY_POINTS, PluginSpec, load

    try:
        loaded = load([PluginSpec.parse(r, f"plugins[{i}]") for i, r in enumerate(raw)])
    except PluginError as e:
        print(f"pychat: plugin error: {e}", file=sys.stderr)
        return 2
    _print(
        {
            "loaded": [
                {
                    "name": p.spec.name,
                    "use": p.spec.use,
                    "hooks": p.hooks,
                    "policy": p.spec.policy,
                    "budget_ms": p.spec.budget_ms,
                    "after_store_budget_ms": p.spec.after_store_budget_ms,
                }
                for p in loaded
            ],
            "available": sorted(
                f"{ep.name} ({ep.value})" for ep in importlib.metadata.entry_points(group=ENTRY_POINTS)
            ),
        }
    )
    for p in loaded:
        p.shutdown()
    return 0


def _verify(store: Store | None, args: argparse.Namespace) -> int:
    from pathlib import Path

    try:
        from pychat.verify import describe, verify_export
    except ModuleNotFoundError as e:
        raise missing("export", e) from None

    path = Path(args.export)
    if not path.exists():
        print(f"pychat: no such export: {path}", file=sys.stderr)
        return 2
    report = verify_export(path, against=store)
    for line in describe(report):
        print(line, file=sys.stderr)
    _print(report.as_json())
    return 0 if report.ok else 1


def _import(config: Config, args: argparse.Namespace) -> int:
    try:
        from pychat.archive import ImportRefused, check_export, import_export
    except ModuleNotFoundError as e:
        raise missing("export", e) from None

    try:
        # Everything that can refuse the export before the store is opened: a refused import
        # leaves no new database or keyspace behind.
        checked = check_export(Path(args.export))
        store = open_store(config.store, config.data_dir, config.sqlite_synchronous)
        try:
            summary = import_export(store, checked, progress=not args.quiet)
        finally:
            store.close()
    except ImportRefused as e:
        print(f"pychat: import refused: {e}", file=sys.stderr)
        return 1
    _print(summary.as_json())
    _tell_server(config, list(checked.chats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
