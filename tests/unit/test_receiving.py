"""ReceivePermits (receiving.py): the bound on upload messages held at once, all streams together."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from gallery_server import receiving
from gallery_server.errors import FailedPrecondition
from gallery_server.receiving import ReceivePermits
from gallery_server.settings import ConfigError, Settings
from gallery_server.uploads import IdleWatchdog

from ..conftest import wait_until


class Ended(Exception):
    """What a transport's request iterator raises once its RPC is over."""


class Transport:
    """Stands in for one RPC's request stream: messages put by the test, an end that runs the
    callbacks registered through `on_end` (as a gRPC context's add_callback does)."""

    def __init__(self) -> None:
        self._items: list[object] = []
        self._ready = threading.Condition()
        self._callbacks: list[Callable[[], None]] = []
        self.over = False

    def send(self, *items: object) -> None:
        with self._ready:
            self._items.extend(items)
            self._ready.notify_all()

    def close(self) -> None:
        self.send(StopIteration)

    def end(self) -> None:
        with self._ready:
            self.over = True
            callbacks, self._callbacks = self._callbacks, []
            self._ready.notify_all()
        for callback in callbacks:
            callback()

    def on_end(self, callback: Callable[[], None]) -> bool:
        with self._ready:
            if self.over:
                return False
            self._callbacks.append(callback)
            return True

    def messages(self) -> Iterator[object]:
        while True:
            with self._ready:
                while not (self._items or self.over):
                    self._ready.wait()
                if self.over:
                    raise Ended
                item = self._items.pop(0)
            if item is StopIteration:
                return
            yield item


def run(target: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """`target` on a thread; the list gets its result or its exception."""
    outcome: list[object] = []

    def body() -> None:
        try:
            outcome.append(target())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, outcome


def test_at_most_permits_messages_are_held_at_once():
    permits = ReceivePermits(2, lend_after=10)  # no client is slow here: nothing is lent
    held, most = 0, 0
    lock = threading.Lock()

    def producer(count: int) -> Iterator[int]:
        nonlocal held, most
        for i in range(count):
            with lock:
                held += 1
                most = max(most, held)
            yield i

    def consume() -> int:
        nonlocal held
        total = 0
        for message in permits.bounded(producer(20)):
            time.sleep(0.002)  # writing the chunk
            total += message
            with lock:
                held -= 1
        return total

    workers = [run(consume) for _ in range(6)]
    for thread, _ in workers:
        thread.join(30)
    assert [outcome for _, outcome in workers] == [[190]] * 6
    assert most <= 2
    assert permits.free == 2 and permits.waiting == 0


def test_a_stream_that_gives_its_permit_back_goes_behind_those_waiting():
    permits = ReceivePermits(1, lend_after=10)
    order: list[str] = []
    first = permits.bounded(iter(["a1", "a2"]))
    order.append(next(first))  # holds the only permit while "writing" a1
    second, _ = run(lambda: order.extend(permits.bounded(iter(["b1"]))))
    assert wait_until(lambda: permits.waiting == 1)
    thread, _ = run(lambda: order.append(next(first)))  # gives a1's permit back, asks again
    thread.join(5)
    assert order == ["a1", "b1", "a2"]
    assert list(first) == []
    second.join(5)
    assert permits.free == 1


def test_permit_given_back_when_the_consumer_fails():
    permits = ReceivePermits(1)
    with pytest.raises(ValueError):
        for _ in permits.bounded(iter([1, 2, 3])):
            raise ValueError("the chunk was refused")
    assert permits.free == 1
    assert list(permits.bounded(iter([4]))) == [4]


def test_permit_given_back_when_the_transport_fails():
    permits = ReceivePermits(1)

    def broken() -> Iterator[int]:
        yield 1
        raise Ended

    with pytest.raises(Ended):
        list(permits.bounded(broken()))
    assert permits.free == 1


def test_an_ended_rpc_gives_its_permit_back_even_if_its_handler_never_unwinds():
    # A handler that failed keeps its generator alive for as long as the exception's traceback
    # does; the end of the RPC frees the permit all the same.
    permits = ReceivePermits(1, lend_after=10)
    transport = Transport()
    transport.send(1)
    abandoned = permits.bounded(transport.messages(), on_end=transport.on_end)
    assert next(abandoned) == 1
    assert permits.free == 0
    transport.end()
    assert permits.free == 1
    del abandoned
    assert permits.free == 1


def test_a_stream_waiting_for_a_permit_stops_waiting_when_its_rpc_ends():
    permits = ReceivePermits(1, lend_after=10)
    holder = permits.bounded(iter([1, 2]))
    assert next(holder) == 1
    waiter = Transport()
    waiter.send("never received")
    thread, outcome = run(lambda: list(permits.bounded(waiter.messages(), on_end=waiter.on_end)))
    assert wait_until(lambda: permits.waiting == 1)
    waiter.end()  # the client cancels while the stream waits for a permit
    thread.join(5)
    assert not thread.is_alive() and isinstance(outcome[0], Ended)
    assert permits.waiting == 0 and permits.free == 0  # the holder still has its permit
    assert list(holder) == [2]
    assert permits.free == 1


def test_an_rpc_over_before_its_first_message_never_waits():
    permits = ReceivePermits(1, lend_after=10)
    holder = permits.bounded(iter([1, 2]))
    assert next(holder) == 1
    over = Transport()
    over.end()
    with pytest.raises(Ended):
        list(permits.bounded(over.messages(), on_end=over.on_end))
    assert permits.waiting == 0


def test_a_silent_client_does_not_starve_the_others():
    permits = ReceivePermits(1, lend_after=0.1)
    silent = Transport()
    silent_thread, silent_got = run(lambda: list(permits.bounded(silent.messages())))
    assert wait_until(lambda: permits.free == 0)  # the silent stream waits in next() with the permit
    started = time.monotonic()
    assert list(permits.bounded(iter(range(5)))) == [0, 1, 2, 3, 4]
    assert time.monotonic() - started < 2
    assert permits.lent >= 1
    # The silent client speaks at last: its message waits for a permit, then goes through.
    silent.send("late")
    silent.close()
    silent_thread.join(5)
    assert silent_got == [["late"]]
    assert permits.free == 1 and permits.waiting == 0


def test_a_handler_blocked_between_messages_does_not_hold_the_others_up():
    """A resumable write waiting for its session's lock (or any slow work between two messages)
    loses its permit to a waiting stream instead of stalling every upload (review finding)."""
    permits = ReceivePermits(1, lend_after=0.1)
    blocked, release = threading.Event(), threading.Event()

    def blocking_handler() -> list[object]:
        got = []
        for message in permits.bounded(iter(["first", "second"])):
            got.append(message)
            if message == "first":
                blocked.set()
                release.wait(10)  # e.g. resumable.py waiting for the session's lock
        return got

    thread, outcome = run(blocking_handler)
    assert blocked.wait(5)
    started = time.monotonic()
    assert list(permits.bounded(iter(range(3)))) == [0, 1, 2]
    assert time.monotonic() - started < 2
    assert permits.lent >= 1
    release.set()
    thread.join(5)
    assert outcome == [["first", "second"]]
    assert permits.free == 1 and permits.waiting == 0


def test_messages_that_came_after_their_permit_was_lent_go_in_arrival_order():
    permits = ReceivePermits(1, lend_after=0.1)
    x, y, z = Transport(), Transport(), Transport()
    order: list[object] = []

    def consume(transport: Transport) -> None:
        for message in permits.bounded(transport.messages()):
            order.append(message)

    threads = [run(lambda: consume(x))[0]]
    assert wait_until(lambda: permits.free == 0)  # x waits on its client with the permit
    threads.append(run(lambda: consume(y))[0])
    assert wait_until(lambda: permits.lent == 1)  # lent to y, which waits on its client too
    threads.append(run(lambda: consume(z))[0])
    assert wait_until(lambda: permits.lent == 2)  # lent to z
    x.send("x")  # x's message comes, then y's: both wait for z's permit, in that order
    assert wait_until(lambda: permits.waiting == 1)
    y.send("y")
    assert wait_until(lambda: permits.waiting == 2)
    assert wait_until(lambda: order == ["x", "y"])  # z's permit is lent on: x first, then y
    for transport in (x, y, z):
        transport.close()
    for thread in threads:
        thread.join(5)
    assert permits.free == 1 and permits.waiting == 0


class SlowWake(threading.Event):
    """A waiting stream's thread that takes its time to run once woken (a busy server: dozens of
    threads at the GIL), longer than a permit may be held while others wait."""

    def wait(self, timeout: float | None = None) -> bool:
        woken = super().wait(timeout)
        time.sleep(0.3)
        return woken


def test_a_permit_granted_to_a_stream_not_yet_awake_is_not_lent_away_from_it(monkeypatch):
    """Found by `make bench` (one of 16 uploads hung until Envoy's 300 s idle timeout): a permit
    handed to a waiting stream was lent on before its thread ran, as if the stream had stalled with
    it; the stream then woke holding nothing, in no queue, and waited forever."""
    stream = receiving._Stream
    monkeypatch.setattr(receiving, "_Stream", lambda: stream(wake=SlowWake()))
    permits = ReceivePermits(1, lend_after=0.05)

    def consume(i: int) -> list[int]:
        got = []
        for message in permits.bounded(iter([i] * 3)):
            time.sleep(0.02)  # writing it: the others queue meanwhile
            got.append(message)
        return got

    workers = [run(lambda i=i: consume(i)) for i in range(4)]
    assert wait_until(lambda: permits.waiting >= 2)  # permits are handed to sleeping streams
    deadline = time.monotonic() + 20  # ~5 s when nothing hangs (every wake-up takes 0.3 s)
    for thread, _ in workers:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert [outcome for _, outcome in workers] == [[[i] * 3] for i in range(4)]
    assert permits.free == 1 and permits.waiting == 0


def test_waiting_for_a_permit_is_not_client_idleness():
    # Composed as Gallery.watch_upload composes them: the permit is taken outside the idle watch.
    permits = ReceivePermits(1, lend_after=10)
    watchdog = IdleWatchdog(0.2)
    cancelled: list[str] = []
    waiting = permits.bounded(watchdog.watch(iter(["w1", "w2"]), lambda: cancelled.append("waiting")))
    busy = permits.bounded(watchdog.watch(iter(["b1", "b2"]), lambda: cancelled.append("busy")))
    assert next(waiting) == "w1"
    busy_thread, busy_got = run(lambda: next(busy))
    assert wait_until(lambda: permits.waiting == 1)
    thread, outcome = run(lambda: list(waiting))  # gives w1's permit to busy, waits for the next
    busy_thread.join(5)
    assert busy_got == ["b1"]
    time.sleep(0.6)  # busy writes b1 for three idle limits; waiting waits for the permit meanwhile
    assert thread.is_alive() and permits.waiting == 1
    assert list(busy) == ["b2"]
    thread.join(5)
    assert outcome == [["w2"]] and cancelled == []
    assert permits.free == 1


def test_a_stream_waiting_on_its_client_is_still_aborted_when_idle():
    permits = ReceivePermits(1)
    watchdog = IdleWatchdog(0.2)
    transport = Transport()
    with pytest.raises(FailedPrecondition) as idle:
        list(permits.bounded(watchdog.watch(transport.messages(), transport.end), on_end=transport.on_end))
    assert idle.value.reason == "UPLOAD_IDLE"
    assert permits.free == 1


def settings_env(tmp_path, **values: str) -> dict[str, str]:
    return {"GALLERY_DATA_DIR": str(tmp_path), "GALLERY_JWT_SECRET": "s" * 40, **values}


def test_the_setting_defaults_to_sixteen_and_must_be_positive(tmp_path):
    assert Settings.from_env(settings_env(tmp_path)).upload_messages_in_flight == 16
    chosen = Settings.from_env(settings_env(tmp_path, GALLERY_UPLOAD_MESSAGES_IN_FLIGHT="3"))
    assert chosen.upload_messages_in_flight == 3
    for bad in ("0", "-1", "x"):
        with pytest.raises(ConfigError):
            Settings.from_env(settings_env(tmp_path, GALLERY_UPLOAD_MESSAGES_IN_FLIGHT=bad))
    with pytest.raises(ValueError):
        ReceivePermits(0)
