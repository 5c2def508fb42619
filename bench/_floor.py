"""The floor of the small-request path: a trivial grpcio server behind the gallery's own Envoy.

It answers GetDevicePaths and GetStats with constants (no token check, no database, no log line),
on the same kind of server as the gallery's (grpcio's sync server, as many threads as the gallery's
reads get), behind an Envoy rendered from the same envoy/envoy.yaml. Whatever a gallery request
costs beyond this is ours; what this costs is the price of Python gRPC plus Envoy's transcoding on
this machine, and it bounds the request rate (and so the latency of 16 closed-loop clients) that
any handler could reach.

The same constants are also served by grpcio's asyncio server (grpc.aio: one event loop fed by
grpc's poller thread, no thread pool), behind an identical Envoy of its own: whether moving the
gallery's request path to grpc.aio would raise that bound is measured in every run, not assumed.

    python bench/_floor.py PORT [sync|aio]     # serves until killed
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from gallery.v1 import gallery_pb2 as pb
from gallery.v1 import gallery_pb2_grpc
from gallery_server import envoy_config, local_stack, supervisor
from gallery_server.settings import Settings

KINDS = ("sync", "aio")


# Each answer is built per call, as a real handler builds its own.
def _paths() -> pb.GetDevicePathsResponse:
    return pb.GetDevicePathsResponse(success=True, paths=pb.DevicePaths(incoming="/incoming", thumbnails="/thumbnails"))


def _stats() -> pb.GetStatsResponse:
    return pb.GetStatsResponse(total_events=1, total_size=1, by_type={"image": pb.TypeStats(count=1, size=1)})


class _Constant(gallery_pb2_grpc.GalleryServiceServicer):
    def GetDevicePaths(self, request, context):  # type: ignore[no-untyped-def]
        return _paths()

    def GetStats(self, request, context):  # type: ignore[no-untyped-def]
        return _stats()


class _AsyncConstant(gallery_pb2_grpc.GalleryServiceServicer):
    async def GetDevicePaths(self, request, context):  # type: ignore[no-untyped-def]
        return _paths()

    async def GetStats(self, request, context):  # type: ignore[no-untyped-def]
        return _stats()


def serve(port: int) -> None:
    # As many threads as the gallery gives these reads (GALLERY_GRPC_READ_WORKERS).
    workers = Settings.grpc_read_workers
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=[("grpc.so_reuseport", 0)])
    gallery_pb2_grpc.add_GalleryServiceServicer_to_server(_Constant(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    threading.Event().wait()


async def serve_aio(port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    gallery_pb2_grpc.add_GalleryServiceServicer_to_server(_AsyncConstant(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


class FloorStack:
    """The trivial server of `kind` (its own process) and an Envoy in front of it, on free ports."""

    def __init__(self, run_dir: str, kind: str = "sync") -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown floor server kind {kind!r}")
        self.grpc_port, self.http_port, admin_port = local_stack.free_ports(3)
        config = f"{run_dir}/floor-{kind}-envoy.yaml"
        with open(config, "w") as f:
            f.write(envoy_config.render(listen=f"127.0.0.1:{self.http_port}", admin_port=admin_port,
                                        backends=[f"127.0.0.1:{self.grpc_port}"]))
        self.envoy: subprocess.Popen[bytes] | None = None
        self.server = subprocess.Popen([sys.executable, __file__, str(self.grpc_port), kind])
        try:
            self.envoy = subprocess.Popen(
                [supervisor.envoy_binary(), "-c", config, "--disable-hot-restart", "--log-level", "error"],
                start_new_session=True,
            )
            supervisor.wait_grpc_healthy(f"127.0.0.1:{self.grpc_port}", process=self.server, listening=True)
            supervisor.wait_envoy_ready(admin_port, process=self.envoy)
            supervisor.wait_grpc_healthy(f"127.0.0.1:{self.http_port}", process=self.envoy)
        except BaseException:
            self.stop()
            raise
        time.sleep(0.5)  # Envoy's first health check of the backend

    @property
    def pids(self) -> dict[str, int]:
        assert self.envoy is not None
        return {"server": self.server.pid, "envoy": self.envoy.pid}

    def stop(self) -> None:
        processes = [p for p in (self.envoy, self.server) if p is not None]
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


if __name__ == "__main__":
    port, kind = int(sys.argv[1]), (sys.argv[2] if len(sys.argv) > 2 else "sync")
    if kind not in KINDS:
        sys.exit(f"unknown floor server kind {kind!r}")
    if kind == "aio":
        asyncio.run(serve_aio(port))
    else:
        serve(port)
