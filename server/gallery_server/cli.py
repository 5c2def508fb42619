"""The `gallery` command: run the stack; or, for a deployment of several replicas, serve gRPC alone
and run Envoy in front of them; reconcile files and rows once; verify every stored file's bytes;
take a backup, restore one; mint a bearer token; run a device agent. Every setting comes from
GALLERY_* environment variables (README "Configuration")."""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import signal
import stat
import sys
import tempfile
from collections.abc import Callable

from . import auth, logs, validation
from .addresses import split_address
from .errors import InvalidArgument
from .settings import (
    A_YEAR,
    ConfigError,
    Settings,
    data_dir_from_env,
    ensure_secret_file,
    min_reconcile_grace,
    prepare_data_dir,
    refuse_while_restoring,
    shown_database_url,
)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before a command handles it (imports, start-up): no traceback
        return 130


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="gallery", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="start the gRPC server and Envoy; Ctrl-C stops both",
                        description="Start the gRPC server and Envoy on GALLERY_GRPC_ADDRESS and "
                        "GALLERY_HTTP_ADDRESS; every setting comes from GALLERY_* environment variables "
                        "(README \"Configuration\"). Ctrl-C stops both.")
    commands.add_parser("serve", help="start only the gRPC server (GALLERY_GRPC_ADDRESS): one replica",
                        description="Start one gRPC server (a replica) on GALLERY_GRPC_ADDRESS, without "
                        "Envoy (see `gallery envoy`); settings from GALLERY_* environment variables. "
                        "SIGTERM drains it for GALLERY_DRAIN_SECONDS, then stops it.")
    envoy = commands.add_parser(
        "envoy", help="run Envoy in front of gRPC servers started with `gallery serve`",
        description="Run Envoy on GALLERY_HTTP_ADDRESS (admin on 127.0.0.1:GALLERY_ENVOY_ADMIN_PORT) in "
        "front of the given gRPC servers, with the configuration `gallery run` uses: REST, native gRPC, "
        "health checks of each server, and downloads sent from GALLERY_DATA_DIR/media when "
        "GALLERY_ENVOY_SENDS_FILES (the servers' shared storage, mounted at the same path here).",
    )
    envoy.add_argument("--backend", action="append", required=True, metavar="HOST:PORT",
                       help="a server's GALLERY_GRPC_ADDRESS; repeat for each replica")
    envoy.add_argument("--config", type=pathlib.Path, default=None,
                       help="where to write Envoy's configuration (default: gallery-<uid>/envoy-<port>.yaml "
                       "in this host's temporary folder, rewritten at each start; not on the servers' "
                       "shared storage)")
    reconcile = commands.add_parser(
        "reconcile", help="reconcile files and rows once and print the findings as JSON",
        description="One pass of the reconciler that every server runs periodically (safe while "
        "servers run). Exit status 1 when stored rows lack their media file.",
    )
    reconcile.add_argument("--grace", type=float, default=None,
                           help="seconds a leftover file must be old to be removed "
                           "(default: GALLERY_RECONCILE_GRACE_SECONDS); below the servers' floor "
                           "(max(2 x GALLERY_UPLOAD_IDLE_SECONDS, 300)) only with --force")
    reconcile.add_argument("--force", action="store_true",
                           help="allow a grace below the floor: only while no server of this data "
                           "folder runs (refused when one answers on GALLERY_GRPC_ADDRESS; "
                           "replicas on other hosts are not seen: stop them first)")
    # A command of its own, not `reconcile --verify`: it reads every byte (hours on a large
    # gallery), removes nothing and takes no lock, so the reconciler's passes (which a held
    # reconcile lock would skip) go on meanwhile, and --grace/--force mean nothing to it.
    verify = commands.add_parser(
        "verify", help="read every stored media file and check it against its recorded SHA-256",
        description="Read each stored event's media file whole and compare it with the size and "
        "SHA-256 recorded at upload (safe while servers run; changes nothing). Logs each damaged or "
        "missing file as an ERROR line, prints the totals as JSON. Exit status 1 when any is.",
    )
    verify.add_argument("--device", type=_verify_device, default=None, metavar="ID",
                        help="check only this device's events (default: every device's)")
    verify.add_argument("--max-mb-per-second", type=_rate, default=0.0, metavar="MB",
                        help="read at most this many MB (10^6 bytes) per second, to leave the disk to "
                        "uploads and downloads; 0 for no limit (default)")
    backup = commands.add_parser(
        "backup", help="copy the database and every stored file into a new folder, while servers run",
        description="Take a consistent backup into DEST (which must not exist, or be empty): the "
        "database as one snapshot (SQLite's online backup, or pg_dump for PostgreSQL), the media files it "
        "names, hard-linked (copied from another filesystem, or with --copy), and the data folder's "
        "jwt-secret. DEST is then a data folder a gallery can run on (README \"Backup and restore\"). "
        "Prints what it holds as JSON.",
    )
    backup.add_argument("destination", type=pathlib.Path, metavar="DEST", help="a new or empty folder")
    backup.add_argument("--copy", action="store_true",
                        help="copy the files even on the same filesystem (default: hard links, which "
                        "share the live files' blocks: a snapshot to ship elsewhere, not a second copy)")
    restore = commands.add_parser(
        "restore", help="make a backup the gallery again, in a new data folder and database",
        description="Restore a backup made by `gallery backup` into GALLERY_DATA_DIR (which must not exist, "
        "or be empty) and GALLERY_DATABASE_URL (on PostgreSQL, a database without tables: createdb it "
        "first), with no server running on them: the database (SQLite: the backup's file; PostgreSQL: "
        "pg_restore, then the events the backup lists as deleted while it ran are deleted), the media "
        "files (hard-linked from the backup on its filesystem, else copied; --copy to copy) and the "
        "jwt-secret. Prints what it restored as JSON (README \"Backup and restore\").",
    )
    restore.add_argument("backup_folder", type=pathlib.Path, metavar="BACKUP", help="a folder `gallery backup` made")
    restore.add_argument("--copy", action="store_true",
                         help="copy the files even on the backup's filesystem (default: hard links: the "
                         "gallery never writes into a stored file, so its changes leave the backup as it was)")
    token = commands.add_parser("token", help="mint a bearer token signed with the server's secret")
    token.add_argument("--sub", required=True, type=_token_subject,
                       help="the token's subject (who it is for; not blank)")
    token.add_argument(
        "--device", action="append", required=True, type=_token_device,
        help="a device id the token grants, or '*' for all; repeat for several",
    )
    token.add_argument("--scope", default=f"{auth.READ} {auth.WRITE}", type=_token_scope,
                       help=f"space-separated scopes, of {' '.join(TOKEN_SCOPES)} (default: %(default)s)")
    token.add_argument("--ttl", type=_token_ttl, default=86400,
                       help=f"lifetime in seconds, at most {MAX_TOKEN_TTL} (10 years; default: %(default)s)")
    agent = commands.add_parser(
        "agent", help="run a device agent: announce a folder's files, upload them when pulled",
        description="Watches a folder, announces its files to the gallery and uploads a file when "
        "someone pulls it. The token (scope gallery:device) is read from GALLERY_AGENT_TOKEN "
        "unless --token is given (an environment variable is not visible in ps).",
    )
    agent.add_argument("--device", required=True, help="this device's id")
    agent.add_argument("--dir", required=True, type=pathlib.Path, help="the folder to watch")
    agent.add_argument("--server", default="http://localhost:8001",
                       help="gallery URL: http://host:port, host:port or https://host (default: %(default)s)")
    agent.add_argument("--token", default=None, help="bearer token (default: $GALLERY_AGENT_TOKEN)")
    agent.add_argument("--scan-interval", type=_interval, default=2.0,
                       help="seconds between scans of the folder, at least 0.1 (default: %(default)s)")
    agent.add_argument("--max-rate", type=_rate, default=0,
                       help="upload bandwidth limit in bytes per second; 0 for none (default)")
    args = parser.parse_args(argv)
    if args.command == "token" and auth.wildcard_beside_ids(args.device):
        token.error("--device: '*' grants every device and must stand alone (the server refuses it beside ids)")

    if args.command == "agent":
        return _agent(args)

    try:
        if args.command not in ("token", "restore"):  # restore makes the data folder, empty: the only one
            refuse_while_restoring(data_dir_from_env())
        if args.command not in ("token", "verify", "backup", "restore"):  # these only read the data folder
            prepare_data_dir(data_dir_from_env())
        if args.command == "run" and not os.environ.get("GALLERY_JWT_SECRET"):
            ensure_secret_file(data_dir_from_env())
        secretless = ("reconcile", "verify", "envoy", "backup", "restore")
        settings = Settings.from_env(needs_secret=args.command not in secretless)
        if args.command == "envoy":
            backends = [_backend(text) for text in args.backend]
    except ConfigError as exc:
        print(f"gallery: {exc}", file=sys.stderr)
        return 2

    if args.command == "token" and settings.issuer_tokens:
        print("gallery: this server takes RS256/ES256 tokens from its identity provider;"
              " `gallery token` mints HS256 tokens that it refuses", file=sys.stderr)
        return 2
    if args.command == "token":
        token = auth.mint(settings.jwt_secret, subject=args.sub, devices=args.device, scope=args.scope,
                          ttl_seconds=args.ttl, issuer=settings.jwt_issuer, audience=settings.jwt_audience)
        if len(token) > MAX_TOKEN_BYTES:
            print(f"gallery token: the token would be {len(token)} bytes, over the {MAX_TOKEN_BYTES} a request"
                  " may carry in its headers through Envoy: grant fewer devices per token, or '*'", file=sys.stderr)
            return 2
        print(token)
        return 0
    if args.command == "envoy":
        from .supervisor import PortTaken, check_ports_free, envoy_command

        try:
            check_ports_free(settings, edge_only=True)
            config = args.config or _host_local_config(settings.http_address)
            command = envoy_command(settings, backends, config)
            os.execvp(command[0], command)  # Envoy is the process: its signals and exit status are its own
        except (OSError, ValueError, PortTaken) as exc:  # a held port, an unwritable --config, no Envoy binary, ...
            print(f"gallery: {exc}", file=sys.stderr)
            return 2
    logs.configure(settings.log_level)
    if args.command == "backup":
        return _backup(settings, args.destination, copy=args.copy)
    if args.command == "restore":
        return _restore(settings, args.backup_folder, copy=args.copy)
    if args.command in ("reconcile", "verify", "serve"):
        import sqlalchemy as sa

        from .errors import DatabaseUnavailable

        try:
            if args.command == "reconcile":
                return _reconcile(settings, args.grace, force=args.force)
            if args.command == "verify":
                return _verify(settings, args.device, args.max_mb_per_second * 1e6)
            from .identity import NotThisGallery
            from .rpc.server import CannotListen, serve

            try:
                serve(settings)
            except (CannotListen, NotThisGallery) as exc:
                print(f"gallery: {exc}", file=sys.stderr)
                return 1
            return 0
        except (sa.exc.OperationalError, sa.exc.ArgumentError, DatabaseUnavailable) as exc:
            # The database cannot be reached (or its URL names no driver) at start: one line that
            # says so, not a traceback of the driver's connection attempt. No password is in it.
            # (DatabaseUnavailable: db.py's reads wrap the driver's error, its __cause__.)
            cause = exc.__cause__ if isinstance(exc, DatabaseUnavailable) and exc.__cause__ else exc
            why = " ".join(str(getattr(cause, "orig", None) or cause).split())  # psycopg's words span lines
            print(f"gallery: GALLERY_DATABASE_URL={shown_database_url(settings.database_url)}: {why}",
                  file=sys.stderr)
            # The tools' 1 says "damage found": a cron alert must tell a database that did not answer
            # from it. A URL that names no driver is a bad setting (2).
            if isinstance(exc, sa.exc.ArgumentError):
                return 2 if args.command in ("reconcile", "verify") else 1
            return DATABASE_UNREACHABLE if args.command in ("reconcile", "verify") else 1
    from .supervisor import run

    return run(settings)


# What `gallery token` mints must be a token the server takes (auth.py): checked before minting,
# since a refused token is otherwise found only at its first request.
TOKEN_SCOPES = (auth.READ, auth.WRITE, auth.DEVICE, auth.ADMIN)
MAX_TOKEN_TTL = 10 * 365 * 86400  # a leaked development token must not stay good for ever
# Envoy answers 431 to a request whose headers pass 32 KiB (envoy.yaml max_request_headers_kb): half
# of it leaves the rest of a browser's or a client library's headers room. ~90 device ids of 128.
MAX_TOKEN_BYTES = 16 << 10
# `gallery reconcile` and `verify`: 1 says what they found; this says they could not look.
DATABASE_UNREACHABLE = 3


def _token_subject(text: str) -> str:
    if not text.strip():  # the server refuses it: the access log says who did what by it
        raise argparse.ArgumentTypeError("must not be empty or blank")
    return text


def _host_local_config(http_address: str) -> pathlib.Path:
    """Where `gallery envoy` writes its configuration by default: a file of its own on this host.
    <data>/run/ is the servers' shared storage, which the edge should not need to write to, and
    where two edges would write the same file. One name per listener, rewritten at each start:
    Envoy becomes the process (exec), so nothing is left to remove the file after it, and a new
    name per start left one behind each time. In a folder of this user's own (0700): a name known
    in advance in the shared temporary folder is one another user could take first."""
    folder = pathlib.Path(tempfile.gettempdir()) / f"gallery-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    st = folder.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ValueError(f"{folder} is not a folder of this user's own (0700): pass --config")
    port = split_address(http_address, "")[1]
    return folder / f"envoy-{port}.yaml"


def _backend(text: str) -> str:
    """A `gallery envoy --backend`: a server's host:port (a port of 0 binds, it reaches nothing)."""
    try:
        host, port = split_address(text.strip(), "")
    except ValueError as exc:
        raise ConfigError(f"--backend {exc}") from None
    if not host or not port:
        raise ConfigError(f"--backend {text!r}: name the server's host and its port (10.0.0.5:50051)")
    return text.strip()


def _token_device(text: str) -> str:
    if text == "*":  # every device
        return text
    try:
        return validation.device_id(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device id ({exc.message}; '*' for all)") from None


def _token_scope(text: str) -> str:
    unknown = [scope for scope in text.split() if scope not in TOKEN_SCOPES]
    if unknown or not text.split():
        raise argparse.ArgumentTypeError(
            f"{'unknown scope ' + ' '.join(unknown) if unknown else 'no scope'}: the scopes are"
            f" {', '.join(TOKEN_SCOPES)}"
        )
    return text


def _token_ttl(text: str) -> int:
    try:
        ttl = int(text)
    except ValueError:
        ttl = 0  # not a whole number: refused below, with the range
    if not 1 <= ttl <= MAX_TOKEN_TTL:
        raise argparse.ArgumentTypeError(
            f"{text}: must be a whole number of seconds from 1 to {MAX_TOKEN_TTL} (10 years)"
        )
    return ttl


def _reconcile(settings: Settings, grace: float | None, *, force: bool = False) -> int:
    import json
    import math
    import socket

    if grace is not None:
        floor = min_reconcile_grace(settings.upload_idle_seconds)
        if not math.isfinite(grace) or not 0 <= grace <= A_YEAR:  # longer overflows the date arithmetic
            print(f"gallery reconcile: --grace must be a number from 0 to {A_YEAR} (a year)", file=sys.stderr)
            return 2
        if grace < floor and not force:
            print(f"gallery reconcile: --grace below {floor:g} s may remove the files of uploads in"
                  " progress: stop the servers and add --force", file=sys.stderr)
            return 2
        if grace < floor:
            try:
                socket.create_connection(split_address(settings.grpc_address, "127.0.0.1"), timeout=1).close()
            except (OSError, ValueError):
                pass
            else:
                print(f"gallery reconcile: a server answers on {settings.grpc_address}: stop it"
                      " before reconciling with a short grace", file=sys.stderr)
                return 2

    from .db import Database
    from .reconcile import Reconciler
    from .service import BACKGROUND_POOL_SIZE, Gallery
    from .storage import Storage

    if (why := _no_gallery_at(settings)) is not None:
        print(f"gallery: {why}", file=sys.stderr)
        return 2
    # Not background_gallery: the tables come first, before the Storage makes the data folders.
    db = Database(settings.database_url, pool_size=BACKGROUND_POOL_SIZE)
    try:
        db.create_tables()
        findings = Reconciler(Gallery(settings, db, Storage.from_settings(settings)), grace_seconds=grace).run_once()
    finally:
        db.dispose()
    print(json.dumps(findings.to_json()))
    return 1 if findings.missing_media or findings.size_mismatch else 0


# An agent scanning more often would spend a core on its folder's listing.
MIN_SCAN_INTERVAL_SECONDS = 0.1


def _no_gallery_at(settings: Settings) -> str | None:
    """Why the settings' database is no gallery's, for a tool that acts on one (None: it is one):
    a SQLite file that is not there (opening it would make a new, empty one where a mistyped
    GALLERY_DATA_DIR or GALLERY_DATABASE_URL points), a database without the events table, or one
    that is not the data folder's gallery (identity.py)."""
    import sqlalchemy as sa

    from . import identity
    from .db import Database

    url = sa.make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database and not pathlib.Path(url.database).exists():
        return f"no database at {url.database} (GALLERY_DATA_DIR or GALLERY_DATABASE_URL)"
    db = Database(settings.database_url, pool_size=1)
    try:
        if not db.holds_a_gallery():
            return (f"GALLERY_DATABASE_URL={shown_database_url(settings.database_url)} holds no gallery"
                    " (no events table; none is made)")
        return identity.mismatch(db.engine, settings.data_dir)
    finally:
        db.dispose()


def _verify_device(text: str) -> str:
    try:
        return validation.device_id(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device id ({exc.message})") from None


def _interval(text: str) -> float:
    """Seconds between an agent's scans: 0, a negative number or nan made it scan without pause."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not MIN_SCAN_INTERVAL_SECONDS <= seconds <= A_YEAR:  # nan fails too
        raise argparse.ArgumentTypeError(f"{text}: must be a number of seconds from {MIN_SCAN_INTERVAL_SECONDS:g}")
    return seconds


def _rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        rate = -1.0
    if not 0 <= rate < float("inf"):  # nan fails too
        raise argparse.ArgumentTypeError(f"{text}: must be a number >= 0")
    return rate


def _verify(settings: Settings, device: str | None, bytes_per_second: float) -> int:
    import json

    from . import scrub
    from .db import Database

    # No create_tables, unlike `gallery reconcile`: verifying changes no row, nor the schema.
    if (why := _no_gallery_at(settings)) is not None:
        print(f"gallery: {why}", file=sys.stderr)
        return 2
    db = Database(settings.database_url, pool_size=1)
    try:
        totals = scrub.Scrub(db, settings.data_dir, bytes_per_second=bytes_per_second).run(device=device)
    except PermissionError as exc:
        print(f"gallery: cannot read {exc.filename}: run `gallery verify` as the server's user or group",
              file=sys.stderr)
        return 2
    finally:
        db.dispose()
    print(json.dumps(totals.to_json()))
    if totals.interrupted:
        return 130
    if device is None:
        try:
            scrub.record(settings.data_dir, totals)
        except OSError as exc:  # the findings are in the log and above: say so, do not fail for it
            print(f"gallery: the totals were not kept for the admin status and metrics"
                  f" ({scrub.status_path(settings.data_dir)}: {exc.strerror})", file=sys.stderr)
    return 1 if totals.damaged or totals.missing else 0


class _Stopped(BaseException):
    """A signal that ends the command (SIGTERM from a service manager or `timeout`, SIGHUP), raised
    where the command is, so that it cleans up as after Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, _frame: object) -> None:
    raise _Stopped(signum)


def _backup(settings: Settings, destination: pathlib.Path, *, copy: bool) -> int:
    from .backup import BackupRefused, backup

    return _undone_on_failure("backup", f"nothing kept in {destination}", BackupRefused,
                              lambda: backup(settings, destination, copy=copy))


def _restore(settings: Settings, backup_folder: pathlib.Path, *, copy: bool) -> int:
    from .restore import RestoreRefused, restore

    return _undone_on_failure("restore", f"nothing restored into {settings.data_dir}", RestoreRefused,
                              lambda: restore(settings, backup_folder, copy=copy))


def _undone_on_failure(command: str, undone: str, refused: type[Exception], work: Callable[[], object]) -> int:
    """Run a backup or a restore, which remove what they wrote when they fail or are stopped (Ctrl-C,
    SIGTERM, SIGHUP): print what it made as JSON, or why it did not in one line, with its exit status
    (2: refused, nothing written; 1: failed; 128 + the signal)."""
    from .stoppable import STOPPING

    previous = {signum: signal.getsignal(signum) for signum in STOPPING}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_stopped)
    try:
        return _run_and_say(command, undone, refused, work)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run_and_say(command: str, undone: str, refused: type[Exception], work: Callable[[], object]) -> int:
    """`work`, then what became of it on stdout or stderr; its exit status."""
    import dataclasses
    import json
    import sqlite3

    import sqlalchemy as sa

    from .stoppable import STOPPING

    try:
        try:
            made = work()
        finally:  # done, or undone: a signal now (a second Ctrl-C) would only interrupt saying so
            for signum in STOPPING:
                signal.signal(signum, signal.SIG_IGN)
    except refused as exc:
        print(f"gallery: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gallery: {command} stopped, {undone}", file=sys.stderr)
        return 128 + signal.SIGINT
    except _Stopped as stopped:
        print(f"gallery: {command} stopped by {stopped}, {undone}", file=sys.stderr)
        return 128 + stopped.signum
    except (OSError, RuntimeError, sqlite3.Error, sa.exc.SQLAlchemyError) as exc:
        why = " ".join(str(getattr(exc, "orig", None) or exc).split())
        print(f"gallery: {command} failed, {undone}: {why}", file=sys.stderr)
        return 1
    print(json.dumps(dataclasses.asdict(made)))  # type: ignore[call-overload]
    return 0


def _agent(args: argparse.Namespace) -> int:
    from .agent import Agent

    token = args.token or os.environ.get("GALLERY_AGENT_TOKEN", "")
    if not token:
        print("gallery agent: no token: set GALLERY_AGENT_TOKEN or pass --token", file=sys.stderr)
        return 2
    if not args.dir.is_dir():
        print(f"gallery agent: {args.dir} is not a folder", file=sys.stderr)
        return 2
    try:
        validation.device_id(args.device)
    except InvalidArgument as exc:
        print(f"gallery agent: --device {args.device!r}: {exc.message}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gallery-agent: %(message)s")
    try:
        agent = Agent(device=args.device, root=args.dir, server=args.server, token=token,
                      scan_interval=args.scan_interval, max_rate=args.max_rate)
    except ValueError as exc:
        print(f"gallery agent: {exc}", file=sys.stderr)
        return 2
    return agent.run()


if __name__ == "__main__":
    sys.exit(main())
