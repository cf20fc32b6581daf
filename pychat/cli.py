"""The `pychat` command: serve, and user and chat administration."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import secrets
import sys
from typing import Any

from pychat import __version__
from pychat.auth import TokenIssuer, hash_password
from pychat.config import load_config
from pychat.errors import ApiError
from pychat.extras import MissingExtra, missing
from pychat.ids import new_id, now_ms
from pychat.plugins.host import PluginError
from pychat.server import Server
from pychat.store import Chat, Store, User, open_store


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML configuration file")
    p.add_argument("--data-dir", help="where the database and media live")
    p.add_argument("--store", help="sqlite:///path or cassandra://host:port/keyspace")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pychat", description="pychat chat engine")
    parser.add_argument("--version", action="version", version=f"pychat {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a server node")
    _common(serve)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int, help="REST port")
    serve.add_argument("--ws-port", type=int, help="WebSocket port")
    serve.add_argument("--kafka", help="cluster node: Kafka bootstrap servers (host:port)")
    serve.add_argument("--redis", help="cluster node: Redis URL (redis://host:port/0)")
    serve.add_argument("--node-id", help="cluster node: this node's id (default host-port)")
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
        "--against-store", action="store_true", help="also compare each chat's last message with the store's"
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


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except MissingExtra as e:
        print(f"pychat: {e}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {"data_dir": args.data_dir, "store": args.store}
    if args.command == "serve":
        overrides |= {
            "host": args.host,
            "port": args.port,
            "ws_port": args.ws_port,
            "kafka": args.kafka,
            "redis": args.redis,
            "node_id": args.node_id,
        }
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
    # Admin commands write the same store; safe while a server runs (SQLite WAL, busy timeout).
    store = open_store(config.store, config.data_dir, config.sqlite_synchronous)
    try:
        if args.command == "migrate":
            print(f"pychat: the store's schema is current ({config.store or 'sqlite://'})")
            return 0
        if args.command == "user":
            password = args.password
            if password is None:
                password = (
                    secrets.token_urlsafe(12) if args.random_password else getpass.getpass("password: ")
                )
            if len(password) < 8:
                print("pychat: password must be at least 8 characters", file=sys.stderr)
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
        if args.command == "import":
            return _import(store, args)
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
            print("note: a running server learns of this chat on restart", file=sys.stderr)
            return 0
    except ApiError as e:
        print(f"pychat: {e.code}: {e.message}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 2


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


def _import(store: Store, args: argparse.Namespace) -> int:
    from pathlib import Path

    try:
        from pychat.archive import ImportRefused, import_export
    except ModuleNotFoundError as e:
        raise missing("export", e) from None

    try:
        summary = import_export(store, Path(args.export), progress=not args.quiet)
    except ImportRefused as e:
        print(f"pychat: import refused: {e}", file=sys.stderr)
        return 1
    _print(summary.as_json())
    print("note: a running server learns of imported chats on restart", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
