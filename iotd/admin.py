"""``iotd-admin``: keys and backups, with the daemon stopped or running.

Works on the daemon's store (``[store] url``: SQLite or PostgreSQL); every
key write bumps the key revision.  ``backup`` copies an SQLite store; on
PostgreSQL it says to use ``pg_dump`` (exit 2).  A running daemon honours a key created here on its very next
request (it looks an unknown key up in the store before answering 401) and
notices a revocation within a second.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import time

from iotd import config as configmod
from iotd.auth import ACTIONS, RESOURCES, key_row
from iotd.store import keys as keysql
from iotd.store import open_error, open_sync, run_in_transaction
from iotd.store.sqlite import make_private
from iotd.timefmt import iso


def _permission(text: str) -> str:
    resource, _, action = text.partition(":")
    if resource not in RESOURCES or action not in ACTIONS:
        raise argparse.ArgumentTypeError(f"not a resource:action grant: {text!r}")
    return text


def _when(micros: int | None) -> str:
    return iso(micros) if micros is not None else "-"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="iotd-admin", description="Manage an iotd store.")
    p.add_argument("-c", "--config", help="path to iotd.ini (default: built-in defaults)")
    sub = p.add_subparsers(dest="command", required=True)
    key = sub.add_parser("key", help="API keys").add_subparsers(dest="action", required=True)
    create = key.add_parser("create", help="create a key and print it (shown once)")
    create.add_argument("--role", required=True, choices=["admin", "read_only", "group"])
    create.add_argument("--name", default="cli")
    create.add_argument("--tenant")
    create.add_argument("--group", action="append", default=[], dest="groups")
    create.add_argument("--permission", action="append", default=[], dest="permissions", type=_permission)
    key.add_parser("list", help="list keys (never the secrets)")
    revoke = key.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("id")
    backup = sub.add_parser("backup", help="write a consistent copy of the store")
    backup.add_argument("path")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        cfg = configmod.load(args.config)
    except configmod.ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    if args.command == "backup" and cfg.store.url:
        print("iotd-admin: backup copies an SQLite store; for PostgreSQL use pg_dump "
              "(pg_dump -Fc -d DBNAME -f FILE)", file=sys.stderr)
        return 2
    try:
        conn = open_sync(cfg)
    except Exception as e:
        print(open_error(cfg, e).replace("iotd: ", "iotd-admin: ", 1), file=sys.stderr)
        return 1
    try:
        if args.command == "backup":
            make_private(args.path)  # a copy of the keys' digests and every event: owner only
            target = sqlite3.connect(args.path)
            with target:
                conn.backup(target)
            target.close()
            print(f"backup written to {args.path}")
            return 0
        if args.action == "create":
            if args.role == "group" and not args.groups:
                print("iotd-admin: a group key needs at least one --group", file=sys.stderr)
                return 2
            row, secret = key_row(args.tenant or cfg.iotd.tenant, args.name, args.role, args.groups,
                                  args.permissions, int(time.time() * 1_000_000))
            run_in_transaction(conn, keysql.insert, row)
            print(secret)
            print(f"id {row['id']} tenant {row['tenant']} role {row['role']}", file=sys.stderr)
            return 0
        if args.action == "list":
            _, rows = keysql.all_keys(conn)
            for r in rows:
                print(f"{r['id']}\t{r['tenant']}\t{r['role']}\t{r['name']}\t"
                      f"groups={','.join(r['groups'])}\tpermissions={','.join(r['permissions'])}\t"
                      f"created={iso(r['created_at'])}\texpires={_when(r['expires_at'])}\t"
                      f"last_used={_when(r['last_used_at'])}")
            return 0
        if args.action == "revoke":
            if not run_in_transaction(conn, keysql.delete, args.id):
                print(f"iotd-admin: no key {args.id}", file=sys.stderr)
                return 1
            print(f"revoked {args.id}")
            return 0
    finally:
        conn.close()
    return 1


if __name__ == "__main__":
    sys.exit(main())
