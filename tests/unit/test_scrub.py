"""The scrub (`gallery verify`) on both databases (the `gallery` fixture runs on SQLite and
PostgreSQL), with real files under a temporary data root."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import sqlalchemy as sa

from gallery_server import cli, scrub
from gallery_server.clock import utcnow
from gallery_server.models import Event
from gallery_server.scrub import Scrub
from gallery_server.service import Gallery

from ..conftest import statements_run
from .test_service import PNG, store


def verifier(gallery: Gallery, **options: float) -> Scrub:
    return Scrub(gallery.db, gallery.settings.data_dir, **options)


def reported(caplog: pytest.LogCaptureFixture) -> dict[str, tuple[str, str]]:
    """event id -> (device, problem) of the ERROR lines naming damaged files."""
    return {r.event_id: (r.device, r.problem) for r in caplog.records
            if r.getMessage() == "stored media file damaged" and r.levelno == logging.ERROR}


def add_row(gallery: Gallery, event_id: str, *, sha256: str = "0" * 64, state: str = "stored") -> None:
    """A row with no file, as a media volume that did not mount leaves every one."""
    with gallery.db.session() as session:
        session.add(Event(id=event_id, device="cam1", name="a.png", media_type="image", mime_type="image/png",
                          size=10, sha256=sha256, created=utcnow(), state=state))
        session.commit()


def test_intact_files_pass_and_each_damaged_or_missing_one_is_reported(gallery, principal, caplog):
    intact = store(gallery, principal, "cam1", PNG + b"1", name="a.png")
    flipped = store(gallery, principal, "cam1", PNG + b"2", name="b.png")
    short = store(gallery, principal, "cam1", PNG + b"3", name="c.png")
    gone = store(gallery, principal, "cam1", PNG + b"4", name="d.png")
    add_row(gallery, "evt_ondevice000000000000", state="on_device")  # its content is on the device
    add_row(gallery, "evt_nodigest000000000000", sha256="")  # nothing to check it against
    caplog.set_level(logging.INFO, logger="gallery_server.scrub")

    clean = verifier(gallery).run()
    assert (clean.events, clean.checked, clean.skipped, clean.damaged, clean.missing) == (5, 4, 1, 0, 0)
    assert clean.bytes_read == 4 * (len(PNG) + 1)
    assert reported(caplog) == {}
    assert [r.levelno for r in caplog.records if r.getMessage() == "verified"] == [logging.INFO]

    media = gallery.storage.media_path
    with media("cam1", flipped.id).open("r+b") as f:  # bit rot: same size, other bytes
        f.seek(20)
        f.write(b"\xff")
    with media("cam1", short.id).open("r+b") as f:
        f.truncate(10)
    media("cam1", gone.id).unlink()
    caplog.clear()

    totals = verifier(gallery).run()
    assert (totals.checked, totals.skipped, totals.damaged, totals.missing) == (4, 1, 2, 1)
    assert reported(caplog) == {
        flipped.id: ("cam1", "sha256"), short.id: ("cam1", "size"), gone.id: ("cam1", "missing")}
    assert sorted(totals.examples) == sorted(f"cam1/{e.id}" for e in (flipped, short, gone))
    (summary,) = [r for r in caplog.records if r.getMessage() == "verified"]
    assert summary.levelno == logging.ERROR and (summary.damaged, summary.missing) == (2, 1)
    # Reported, never touched: every row and the damaged files stay as they were.
    assert media("cam1", intact.id).read_bytes() == PNG + b"1"
    assert len(media("cam1", flipped.id).read_bytes()) == len(PNG) + 1
    with gallery.db.session() as session:
        assert session.execute(sa.select(sa.func.count()).select_from(Event)).scalar_one() == 6


def test_a_folder_or_a_pipe_in_a_files_place_is_reported_and_the_scan_goes_on(gallery, principal, caplog):
    """A folder where a media file should be ended the scan with a traceback (open() of its
    descriptor): the files after it went unchecked and no totals were kept."""
    folder = store(gallery, principal, "cam1", PNG + b"1", name="a.png")
    pipe = store(gallery, principal, "cam1", PNG + b"2", name="b.png")
    intact = store(gallery, principal, "cam1", PNG + b"3", name="c.png")
    media = gallery.storage.media_path
    media("cam1", folder.id).unlink()
    media("cam1", folder.id).mkdir()
    media("cam1", pipe.id).unlink()
    os.mkfifo(media("cam1", pipe.id))
    caplog.set_level(logging.INFO, logger="gallery_server.scrub")
    totals = verifier(gallery).run()
    assert (totals.checked, totals.damaged, totals.missing, totals.bytes_read) == (3, 2, 0, len(PNG) + 1)
    assert reported(caplog) == {folder.id: ("cam1", "not a regular file"), pipe.id: ("cam1", "not a regular file")}
    assert media("cam1", intact.id).read_bytes() == PNG + b"3"


def test_device_limits_the_scope(gallery, principal, caplog):
    damaged = store(gallery, principal, "cam1", PNG + b"1")
    store(gallery, principal, "cam2", PNG + b"2")
    store(gallery, principal, "cam2", PNG + b"3", name="other.png")
    with gallery.storage.media_path("cam1", damaged.id).open("r+b") as f:
        f.write(b"x")
    caplog.set_level(logging.INFO, logger="gallery_server.scrub")

    other = verifier(gallery).run(device="cam2")
    assert (other.device, other.events, other.checked, other.damaged, other.missing) == ("cam2", 2, 2, 0, 0)
    assert reported(caplog) == {}
    mine = verifier(gallery).run(device="cam1")
    assert (mine.events, mine.checked, mine.damaged) == (1, 1, 1)
    assert reported(caplog) == {damaged.id: ("cam1", "sha256")}


def test_a_row_deleted_while_its_file_is_read_is_no_finding(gallery, principal, caplog):
    kept = store(gallery, principal, "cam1", PNG + b"1", name="a.png")
    going = store(gallery, principal, "cam1", PNG + b"2", name="b.png")
    scrubber = verifier(gallery)
    media_path = scrubber.media_path
    deleting = [going.id]

    def deleted_meanwhile(device: str, event_id: str) -> pathlib.Path:
        # The batch of rows is read, then a client deletes the event (row first, then its file)
        # before the scrub opens the file.
        if event_id in deleting:
            deleting.remove(event_id)
            gallery.delete_event(principal, device, event_id)
        return media_path(device, event_id)

    scrubber.media_path = deleted_meanwhile  # type: ignore[method-assign]
    caplog.set_level(logging.INFO, logger="gallery_server.scrub")
    totals = scrubber.run()
    assert not deleting and reported(caplog) == {}
    assert (totals.checked, totals.damaged, totals.missing) == (2, 0, 0)
    assert gallery.storage.media_path("cam1", kept.id).exists()


def test_a_file_replaced_while_it_is_read_is_read_again(gallery, principal, caplog, tmp_path):
    event = store(gallery, principal, "cam1", PNG)
    scrubber = verifier(gallery)
    media_path = scrubber.media_path
    # What the name held for a moment: another file than the one the row records.
    stale = tmp_path / "stale"
    stale.write_bytes(b"y" * len(PNG))
    names = [stale]
    scrubber.media_path = lambda d, e: names.pop() if names else media_path(d, e)  # type: ignore[method-assign]
    caplog.set_level(logging.INFO, logger="gallery_server.scrub")
    totals = scrubber.run()
    assert (totals.checked, totals.damaged, totals.missing) == (1, 0, 0) and reported(caplog) == {}
    assert totals.bytes_read == 2 * len(PNG)
    assert gallery.storage.media_path("cam1", event.id).read_bytes() == PNG


def test_rows_are_read_in_batches_and_every_lost_file_is_named(gallery, monkeypatch, caplog):
    monkeypatch.setattr(scrub, "ROW_BATCH", 3)
    monkeypatch.setattr(scrub, "PROGRESS_SECONDS", 0)  # a progress line after every file
    lost = [f"evt_lost{i:016d}" for i in range(8)]
    for event_id in lost:
        add_row(gallery, event_id)
    caplog.set_level(logging.INFO, logger="gallery_server.scrub")
    with statements_run(gallery.db) as statements:
        totals = verifier(gallery).run()
    assert (totals.checked, totals.missing) == (8, 8)
    assert reported(caplog) == {event_id: ("cam1", "missing") for event_id in lost}
    reads = [s for s in statements if "FROM events" in s]
    # The count, then per batch of 3 its rows and one re-read of its suspects; then an empty page.
    assert len(reads) == 1 + 2 * 3 + 1, reads
    progress = [r for r in caplog.records if r.getMessage() == "verify progress"]
    assert [(r.checked, r.events) for r in progress] == [(i, 8) for i in range(1, 9)]


def test_the_rate_limit_paces_the_reads(gallery, principal):
    size = 3 * scrub.CHUNK_BYTES
    store(gallery, principal, "cam1", PNG + b"\x00" * (size - len(PNG)), name="big.png")
    started = time.monotonic()
    totals = verifier(gallery, bytes_per_second=10e6).run()
    assert totals.bytes_read == size and totals.damaged == 0
    assert time.monotonic() - started >= 0.9 * size / 10e6


def test_cli_verify_runs_as_a_command(gallery, principal):
    """The real `gallery verify`, as an operator runs it: no JWT secret, JSON totals on stdout,
    JSON log lines on stderr, exit status 1 while a file is damaged."""
    damaged = store(gallery, principal, "cam1", PNG + b"1")
    store(gallery, principal, "cam2", PNG + b"2")
    with gallery.storage.media_path("cam1", damaged.id).open("r+b") as f:
        f.write(b"x")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GALLERY_")}
    env |= {"GALLERY_DATA_DIR": str(gallery.settings.data_dir), "GALLERY_DATABASE_URL": gallery.settings.database_url}

    def verify(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gallery_server", "verify", *args],
                              env=env, capture_output=True, text=True, timeout=120)

    result = verify()
    assert result.returncode == 1, result.stderr
    totals = json.loads(result.stdout)
    assert (totals["checked"], totals["damaged"], totals["missing"]) == (2, 1, 0)
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    (line,) = [line for line in lines if line["message"] == "stored media file damaged"]
    assert (line["level"], line["device"], line["event_id"], line["problem"]) == ("ERROR", "cam1", damaged.id, "sha256")
    (summary,) = [line for line in lines if line["message"] == "verified"]
    assert summary["level"] == "ERROR" and summary["damaged"] == 1 and "bytes_read" in summary

    kept = scrub.last(gallery.settings.data_dir)  # for the admin status and the metrics
    assert kept is not None and kept.to_json() == totals and kept.finished.endswith("Z")

    result = verify("--device", "cam2", "--max-mb-per-second", "100")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["checked"] == 1
    assert scrub.last(gallery.settings.data_dir) == kept  # one device's run has not seen the rest


@pytest.mark.parametrize("args", [["--device", "../x"], ["--max-mb-per-second", "-1"],
                                  ["--max-mb-per-second", "nan"]])
def test_cli_verify_refuses_bad_arguments(args):
    with pytest.raises(SystemExit) as exited:
        cli.main(["verify", *args])
    assert exited.value.code == 2


def test_cli_verify_changes_nothing_where_there_is_nothing(tmp_path):
    """A wrong GALLERY_DATA_DIR: no SQLite file made there, exit status 2."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GALLERY_")}
    env |= {"GALLERY_DATA_DIR": str(tmp_path / "typo")}
    result = subprocess.run([sys.executable, "-m", "gallery_server", "verify"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no database at" in result.stderr, result.stderr
    assert not (tmp_path / "typo").exists()


def test_verify_and_reconcile_refuse_a_database_that_holds_no_gallery(postgres_url, tmp_path):
    """An empty PostgreSQL database where GALLERY_DATABASE_URL points: verify ended with the
    driver's traceback (exit status 1, "damage found"), and reconcile made the schema there."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GALLERY_")}
    env |= {"GALLERY_DATA_DIR": str(tmp_path), "GALLERY_DATABASE_URL": postgres_url}
    for command in ("verify", "reconcile"):
        result = subprocess.run([sys.executable, "-m", "gallery_server", command], env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        assert "holds no gallery (no events table" in result.stderr and "Traceback" not in result.stderr
    engine = sa.create_engine(postgres_url)
    try:
        assert sa.inspect(engine).get_table_names() == []  # no schema made
    finally:
        engine.dispose()


def test_verify_and_reconcile_say_apart_that_the_database_did_not_answer(tmp_path):
    """Exit status 3, not the 1 of damage found or rows without files: a cron job's alert must tell
    a database that is down from a gallery that lost data. One line, naming the setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GALLERY_")}
    url = "postgresql+psycopg://postgres@127.0.0.1:1/gallery"  # nothing listens on port 1: refused at once
    env |= {"GALLERY_DATA_DIR": str(tmp_path), "GALLERY_DATABASE_URL": url}
    for command in ("verify", "reconcile"):
        result = subprocess.run([sys.executable, "-m", "gallery_server", command], env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == cli.DATABASE_UNREACHABLE == 3, (command, result.stderr)
        assert result.stderr.startswith(f"gallery: GALLERY_DATABASE_URL={url}: "), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert result.stdout == ""


def test_cli_verify_stopped_by_ctrl_c_prints_what_it_did_and_keeps_no_totals(gallery, principal):
    big = store(gallery, principal, "cam1", PNG + b"\x00" * (4 * scrub.CHUNK_BYTES), name="big.png")
    media = gallery.storage.media_path("cam1", big.id)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GALLERY_")}
    env |= {"GALLERY_DATA_DIR": str(gallery.settings.data_dir), "GALLERY_DATABASE_URL": gallery.settings.database_url}
    process = subprocess.Popen([sys.executable, "-m", "gallery_server", "verify", "--max-mb-per-second", "1"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not _has_open(process.pid, media):
            assert process.poll() is None and time.monotonic() < deadline, "verify never opened the file"
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130, err
    totals = json.loads(out)
    assert totals["interrupted"] is True and totals["finished"] == "" and totals["started"].endswith("Z")
    assert totals["checked"] == 1 and totals["bytes_read"] < media.stat().st_size  # stopped in its first file
    lines = [json.loads(line) for line in err.splitlines()]
    assert [(line["level"], line["message"]) for line in lines] == [("WARNING", "verify stopped before its end")]
    assert not scrub.status_path(gallery.settings.data_dir).exists()
    assert scrub.last(gallery.settings.data_dir) is None


def _has_open(pid: int, path: pathlib.Path) -> bool:
    """Whether the process has `path` open now; a descriptor closed between the listing and its
    reading (the process opens and closes others meanwhile) is not it."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                return True
        except OSError:
            continue
    return False
