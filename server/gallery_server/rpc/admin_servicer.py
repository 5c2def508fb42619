"""GalleryAdminService over gRPC: the admin status (reconcile.py) as a message."""

from __future__ import annotations

from collections.abc import Callable

from gallery.v1 import admin_pb2 as pb
from gallery.v1 import admin_pb2_grpc

from ..auth import Principal
from ..reconcile import Reconciler
from .interceptor import current_principal


class AdminServicer(admin_pb2_grpc.GalleryAdminServiceServicer):
    def __init__(
        self, reconciler: Reconciler, principal: Callable[[], Principal] = current_principal
    ) -> None:
        self.reconciler = reconciler
        self.principal = principal

    def GetAdminStatus(self, request, context):  # type: ignore[no-untyped-def]
        status = self.reconciler.admin_status(self.principal())
        response = pb.GetAdminStatusResponse(
            disk=pb.DiskStatus(
                total_bytes=status.disk.total_bytes,
                free_bytes=status.disk.free_bytes,
                min_free_bytes=status.min_free_bytes,
                accepting_uploads=status.accepting_uploads,
            ),
            counts=pb.AdminCounts(
                events_stored=status.counts.events_stored,
                events_on_device=status.counts.events_on_device,
                stored_bytes=status.counts.stored_bytes,
                upload_sessions=status.counts.upload_sessions,
                upload_grants=status.counts.upload_grants,
                uploads_in_flight=status.counts.uploads_in_flight,
            ),
            device_storage=pb.DeviceStorage(
                quota_bytes=status.device_storage.limit,
                devices_at_quota=status.device_storage.at_quota,
                devices_near_quota=status.device_storage.near_quota,
                largest=[
                    pb.DeviceStorageUsage(device=device, used_bytes=used)
                    for device, used in status.device_storage.largest
                ],
            ),
        )
        run = status.last_reconcile
        if run is not None:
            response.last_reconcile.CopyFrom(pb.ReconcileRun(
                started=run.started, finished=run.finished, replica=run.replica,
                staging_removed=run.staging_removed,
                orphan_media_removed=run.orphan_media_removed,
                orphan_thumbnails_removed=run.orphan_thumbnails_removed,
                expired_grants_removed=run.expired_grants_removed,
                closed_commands_removed=run.closed_commands_removed,
                bytes_reclaimed=run.bytes_reclaimed,
                rows_checked=run.rows_checked,
                missing_media=run.missing_media,
                size_mismatch=run.size_mismatch,
                examples=run.examples,
            ))
        return response
