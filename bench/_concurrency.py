"""Scenario: many uploads at once (native gRPC through Envoy): aggregate throughput and peak RSS.

Every count (4, 16, 64 streams) uploads `size` bytes per stream from one client thread per stream,
all started together on one channel to Envoy (as many devices behind one proxy would look to the
server). The client does not hash here (the payload's digest is computed once), so that its CPU goes
to sending. Each run checks every stored event (size, sha256) and deletes them. The stack runs with
the upload limits raised to 64 per device and 128 in total (one token may have half the total
awaiting a first message), and 160 gRPC workers (run.py), so that no stream is refused (the defaults
would answer 429 past 4 uploads of one device).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator

import _stack
import grpc
from _common import (
    DEVICE,
    REQUEST_TIMEOUT_S,
    Bench,
    BenchError,
    KiB,
    MiB,
    Section,
    cpu_now,
    fmt_size,
    md_table,
    median,
    spread,
    text_table,
)

from gallery.v1 import gallery_pb2 as pb
from gallery.v1 import gallery_pb2_grpc

COUNTS = (4, 16, 64)
RSS_LIMIT_MIB = 256


def _blocks(bench: Bench, size: int) -> Iterator[bytes]:
    blocks, chunk = bench.payload.blocks, bench.payload.chunk_bytes
    full, rest = divmod(size, chunk)
    for i in range(full):
        yield blocks[i % len(blocks)]
    if rest:
        yield blocks[full % len(blocks)][:rest]


def _upload_all(bench: Bench, count: int, size: int, sha256: str) -> tuple[float, list[str]]:
    stub = gallery_pb2_grpc.GalleryServiceStub(bench.envoy_channel)
    metadata = list(bench.auth_header.items())
    barrier = threading.Barrier(count + 1)
    results: list[str | BaseException] = [""] * count

    def one(i: int) -> None:
        def requests() -> Iterator[pb.UploadEventRequest]:
            yield pb.UploadEventRequest(header=pb.UploadHeader(
                device=DEVICE, name=f"concurrent-{i}.bin", media_type="other", size=size))
            for block in _blocks(bench, size):
                yield pb.UploadEventRequest(media_chunk=block)
            yield pb.UploadEventRequest(finish=pb.UploadFinish(sha256=sha256))

        barrier.wait()
        try:
            reply = stub.UploadEvent(requests(), metadata=metadata, timeout=REQUEST_TIMEOUT_S)
            results[i] = reply.event_id
        except grpc.RpcError as exc:
            results[i] = BenchError(f"upload {i} of {count}: {exc.code()} {exc.details()}")

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.monotonic()
    for t in threads:
        t.join()
    seconds = time.monotonic() - started
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise errors[0]
    return seconds, [r for r in results if isinstance(r, str)]


def _check_and_delete(bench: Bench, ids: list[str], size: int, sha256: str) -> None:
    listed = bench.http.get(f"/api/gallery/{DEVICE}/events", params={"limit": 1000}, headers=bench.auth_header)
    events = {e["id"]: e for e in listed.json()}
    for event_id in ids:
        event = events.get(event_id)
        if event is None or event["size"] != size or event["sha256"] != sha256:
            raise BenchError(f"concurrent upload {event_id}: listed as {event!r:.300}")
        deleted = bench.http.delete(f"/api/gallery/{DEVICE}/events/{event_id}", headers=bench.auth_header)
        if deleted.status_code != 200:
            raise BenchError(f"delete {event_id}: HTTP {deleted.status_code}")


def payload(bench: Bench) -> tuple[int, str]:
    """The size of each stream's upload and its sha256."""
    size = 2 * MiB if bench.options.quick else 64 * MiB
    digest = hashlib.sha256()
    for block in _blocks(bench, size):
        digest.update(block)
    return size, digest.hexdigest()


def batch(bench: Bench, count: int, size: int, sha256: str) -> None:
    """`count` uploads of `payload(bench)` at once, checked and deleted: the load the profiles
    section samples."""
    _, ids = _upload_all(bench, count, size, sha256)
    _check_and_delete(bench, ids, size, sha256)


def scenario_concurrent(bench: Bench) -> Section:
    opts = bench.options
    size, sha256 = payload(bench)
    pids = {"server": bench.stack.server_pid, "envoy": bench.stack.envoy_pid}
    samples: dict[int, list[dict[str, float]]] = {n: [] for n in COUNTS}
    _upload_all(bench, 2, MiB, hashlib.sha256(bench.payload.blocks[0]).hexdigest())  # warm-up, not kept
    _cleanup(bench)
    for run in range(opts.runs):
        order = COUNTS[run % len(COUNTS):] + COUNTS[:run % len(COUNTS)]  # rotate: noise spreads over all
        for count in order:
            before = cpu_now(pids)
            with _stack.MemoryProbe(pids) as probe:
                seconds, ids = _upload_all(bench, count, size, sha256)
            after = cpu_now(pids)
            _check_and_delete(bench, ids, size, sha256)
            gb = count * size / 1e9
            sample = {
                "mb_s": gb * 1000 / seconds, "seconds": seconds,
                "server_peak_mib": probe.peak["server"] / KiB, "envoy_peak_mib": probe.peak["envoy"] / KiB,
                "server_before_mib": probe.baseline["server"] / KiB,
                "server_cpu_per_gb": (after["server"] - before["server"]) / gb,
                "envoy_cpu_per_gb": (after["envoy"] - before["envoy"]) / gb,
                "client_cpu_per_gb": (after["client"] - before["client"]) / gb,
                # Of the machine's 2 vCPUs: how close to its limit the batch ran.
                "machine_busy_cpus": (after["machine"] - before["machine"]) / seconds,
            }
            samples[count].append(sample)
            print(f"  run {run + 1}/{opts.runs}  {count:3d} x {fmt_size(size)}  {sample['mb_s']:7.1f} MB/s  "
                  f"server peak {sample['server_peak_mib']:5.0f} MiB  envoy peak {sample['envoy_peak_mib']:5.0f} MiB",
                  flush=True)
    header = ["streams", "aggregate MB/s median", "min – max", "÷ 4 streams (same run)", "server peak RSS MiB",
              "max", "Envoy peak RSS MiB", "server CPU s/GB", "Envoy CPU s/GB", "client CPU s/GB",
              "machine CPUs busy"]
    rows, failures = [], []
    for count in COUNTS:
        group = samples[count]
        ratios = [s["mb_s"] / b["mb_s"] for s, b in zip(group, samples[COUNTS[0]], strict=True)]
        peak = [s["server_peak_mib"] for s in group]
        rows.append([
            str(count), f"{median([s['mb_s'] for s in group]):.0f}", spread([s["mb_s"] for s in group]),
            f"{median(ratios):.2f}", f"{median(peak):.0f}", f"{max(peak):.0f}",
            f"{median([s['envoy_peak_mib'] for s in group]):.0f}",
            f"{median([s['server_cpu_per_gb'] for s in group]):.2f}",
            f"{median([s['envoy_cpu_per_gb'] for s in group]):.2f}",
            f"{median([s['client_cpu_per_gb'] for s in group]):.2f}",
            f"{median([s['machine_busy_cpus'] for s in group]):.2f}",
        ])
        if count > COUNTS[0]:
            bench.targets.append((f"{count} x {fmt_size(size)} concurrent uploads", ">= 1.0x the 4-stream aggregate",
                                  f"{median(ratios):.2f}x", median(ratios) >= 1.0))
            bench.targets.append((f"{count} x {fmt_size(size)} concurrent uploads", f"server peak RSS <= "
                                  f"{RSS_LIMIT_MIB} MiB", f"{max(peak):.0f} MiB (max of runs)",
                                  max(peak) <= RSS_LIMIT_MIB))
    markdown = (
        f"4, 16 and 64 native gRPC uploads of {fmt_size(size)} each at once through Envoy (one client thread per "
        "stream, one HTTP/2 connection to Envoy, started together; timed until the last response), "
        f"{opts.runs} runs with the order of the counts rotated. Peak RSS is VmHWM reset before each "
        "batch, and the 50 ms samples. Every event is checked (size, sha256) and deleted.\n\n"
        + md_table(header, rows)
    )
    return Section(f"Concurrent uploads of {fmt_size(size)}", text_table(header, rows), markdown,
                   {str(k): v for k, v in samples.items()}, failures)


def _cleanup(bench: Bench) -> None:
    listed = bench.http.get(f"/api/gallery/{DEVICE}/events", params={"limit": 1000}, headers=bench.auth_header)
    for event in listed.json():
        bench.http.delete(f"/api/gallery/{DEVICE}/events/{event['id']}", headers=bench.auth_header)
