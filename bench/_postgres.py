"""A second gallery stack on PostgreSQL, for the listing scenario: the database that replicas share.

It runs when GALLERY_BENCH_POSTGRES_URL names a PostgreSQL server on which the bench may create and
drop a database (the Makefile points it at the machine's local server, as it points the tests);
without it the listing scenario measures SQLite alone and says so.

The stack is the one `gallery run` starts (server and Envoy, its own ports and data directory) on a
throw-away database. Its events are copied in with one COPY, the stats counters' triggers counting
them as they count any insert (once per statement on PostgreSQL: models.py), and VACUUM (ANALYZE)
then does what autovacuum would do after such a load, before the measurements rather than during
them. PostgreSQL's work is done by its backend processes: those connected to the throw-away
database are found in pg_stat_activity so that their CPU can be counted (on this machine only: a
server elsewhere has no /proc here).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import time
import uuid
from collections.abc import Iterable

import _stack
import psycopg
import sqlalchemy as sa

from gallery_server import local_stack

URL_VARIABLE = "GALLERY_BENCH_POSTGRES_URL"


def configured_url() -> str | None:
    return os.environ.get(URL_VARIABLE) or None


# A throw-away database is named with its creation time: one older than this was left by a bench
# that was killed (SIGKILL skips its clean-up), and the next bench drops it.
STALE_AFTER_SECONDS = 3600
_PREFIX = "gallery_bench_"


class PostgresStack:
    """A gallery stack on a database of its own, created on the server at `base_url` (a SQLAlchemy
    URL) and dropped by stop()."""

    def __init__(self, base_url: str, work_dir: pathlib.Path, *, jwt_secret: str, extra_env: dict[str, str]) -> None:
        url = sa.make_url(base_url)
        self.database = f"{_PREFIX}{int(time.time())}_{uuid.uuid4().hex[:8]}"
        self._admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._direct = url.set(drivername="postgresql", database=self.database).render_as_string(hide_password=False)
        # Loopback or a Unix socket: its backends are processes of this machine, whose CPU /proc shows.
        self.local = url.host in (None, "", "localhost", "127.0.0.1", "::1")
        with psycopg.connect(self._admin, autocommit=True) as connection:
            _drop_stale(connection)
            connection.execute(f'CREATE DATABASE "{self.database}"')
        try:
            work_dir.mkdir(parents=True, exist_ok=True)
            self.stack = local_stack.start_stack(
                work_dir / "data", work_dir / "gallery.log", jwt_secret=jwt_secret,
                extra_env=extra_env | {
                    "GALLERY_DATABASE_URL": url.set(database=self.database).render_as_string(hide_password=False),
                },
            )
        except BaseException:
            with contextlib.suppress(Exception):  # the stack's own error is the one to see
                self._drop()
            raise

    def seed(self, columns: tuple[str, ...], rows: Iterable[tuple[object, ...]]) -> float:
        """Copy `rows` into events in one transaction; returns the seconds it took."""
        started = time.monotonic()
        with psycopg.connect(self._direct) as connection:
            with connection.cursor().copy(f"COPY events ({', '.join(columns)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            connection.commit()
            # What autovacuum would soon do after such a load (a COPY of many rows sets it off),
            # done now rather than in the middle of a measurement.
            connection.autocommit = True
            connection.execute("VACUUM (ANALYZE) events")
        return time.monotonic() - started

    def backends_cpu(self) -> dict[int, float] | None:
        """CPU time so far of each client backend connected to this stack's database, by pid (None:
        the server is not a process of this machine)."""
        if not self.local:
            return None
        with psycopg.connect(self._direct, autocommit=True) as connection:
            pids = [pid for (pid,) in connection.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
            )]
        times = {}
        for pid in pids:
            with contextlib.suppress(FileNotFoundError):  # a backend that ended meanwhile
                times[pid] = _stack.cpu_seconds(pid)
        return times

    def stop(self) -> None:
        try:
            local_stack.stop_stack(self.stack)
        finally:
            self._drop()

    def _drop(self) -> None:
        with psycopg.connect(self._admin, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')


def cpu_spent(before: dict[int, float], after: dict[int, float]) -> float:
    """The backends' CPU between two backends_cpu() readings: a backend that connected meanwhile
    counts from 0; one that ended meanwhile is missed (the server's pool keeps its connections)."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def _drop_stale(connection: psycopg.Connection) -> None:  # type: ignore[type-arg]
    names = [name for (name,) in connection.execute(
        "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (_PREFIX,)
    )]
    for name in names:
        created = name.removeprefix(_PREFIX).partition("_")[0]
        if created.isdigit() and time.time() - int(created) > STALE_AFTER_SECONDS:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
