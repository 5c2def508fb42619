"""The floor of the small-request path: a trivial grpcio server behind the gallery's own Envoy.

It answers GetDevicePaths and GetStats with constants (no token check, no database, no log line),
on the same kind of server as the gallery's (grpcio's sync server, as many threads as the gallery's
reads get), behind an Envoy rendered from the same envoy/envoy.yaml. Whatever a gallery request
costs beyond this is ours; what this costs is the price of Python gRPC plus Envoy's transcoding on
this machine, and it bounds the request rate (and so the latency of 16 closed-loop clients) that
any handler could reach.

    python bench/_floor.py PORT      # serves until killed
"""

from __future__ import annotations

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


class _Constant(gallery_pb2_grpc.GalleryServiceServicer):
    def GetDevicePaths(self, request, context):  # type: ignore[no-untyped-def]
        return pb.GetDevicePathsResponse(
            success=True, paths=pb.DevicePaths(incoming="/incoming", thumbnails="/thumbnails")
        )

    def GetStats(self, request, context):  # type: ignore[no-untyped-def]
        return pb.GetStatsResponse(total_events=1, total_size=1, by_type={"image": pb.TypeStats(count=1, size=1)})


def serve(port: int) -> None:
    # As many threads as the gallery gives these reads (GALLERY_GRPC_READ_WORKERS).
    workers = Settings.__dataclass_fields__["grpc_read_workers"].default
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=[("grpc.so_reuseport", 0)])
    gallery_pb2_grpc.add_GalleryServiceServicer_to_server(_Constant(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    threading.Event().wait()


class FloorStack:
    """The trivial server (its own process) and an Envoy in front of it, on free ports."""

    def __init__(self, run_dir: str) -> None:
        self.grpc_port = local_stack.free_port()
        self.http_port = local_stack.free_port()
        admin_port = local_stack.free_port()
        config = f"{run_dir}/floor-envoy.yaml"
        with open(config, "w") as f:
            f.write(envoy_config.render(listen=f"127.0.0.1:{self.http_port}", admin_port=admin_port,
                                        backends=[f"127.0.0.1:{self.grpc_port}"]))
        self.envoy: subprocess.Popen[bytes] | None = None
        self.server = subprocess.Popen([sys.executable, __file__, str(self.grpc_port)])
        try:
            self.envoy = subprocess.Popen(
                [supervisor.envoy_binary(), "-c", config, "--disable-hot-restart", "--log-level", "error"],
                start_new_session=True,
            )
            supervisor.wait_grpc_healthy(f"127.0.0.1:{self.grpc_port}", process=self.server)
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
    serve(int(sys.argv[1]))
