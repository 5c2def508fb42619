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
            database_up=status.counts is not None,
        )
        counts = status.counts
        if counts is not None:
            response.counts.CopyFrom(pb.AdminCounts(
                events_stored=counts.events_stored,
                events_on_device=counts.events_on_device,
                stored_bytes=counts.stored_bytes,
                upload_sessions=counts.upload_sessions,
                upload_grants=counts.upload_grants,
                uploads_in_flight=counts.uploads_in_flight,
                thumbnails_pending=counts.thumbnails_pending,
                pulls_open=counts.pulls_open,
            ))
        storage = status.device_storage
        if storage is not None:
            response.device_storage.CopyFrom(pb.DeviceStorage(
                quota_bytes=storage.limit,
                devices_at_quota=storage.at_quota,
                devices_near_quota=storage.near_quota,
                largest=[pb.DeviceStorageUsage(device=device, used_bytes=used) for device, used in storage.largest],
            ))
        run = status.last_reconcile
        if run is not None:
            response.last_reconcile.CopyFrom(pb.ReconcileRun(
                started=run.started, finished=run.finished, replica=run.replica,
                staging_removed=run.staging_removed,
                orphan_media_removed=run.orphan_media_removed,
                orphan_thumbnails_removed=run.orphan_thumbnails_removed,
                expired_grants_removed=run.expired_grants_removed,
                closed_commands_removed=run.closed_commands_removed,
                deleted_captures_forgotten=run.deleted_captures_forgotten,
                bytes_reclaimed=run.bytes_reclaimed,
                rows_checked=run.rows_checked,
                missing_media=run.missing_media,
                size_mismatch=run.size_mismatch,
                examples=run.examples,
            ))
        verified = status.last_verify
        if verified is not None:
            response.last_verify.CopyFrom(pb.VerifyRun(
                started=verified.started, finished=verified.finished, events=verified.events,
                checked=verified.checked, skipped=verified.skipped, bytes_read=verified.bytes_read,
                damaged=verified.damaged, missing=verified.missing, seconds=verified.seconds,
                examples=verified.examples,
            ))
        backlog = status.drop_backlog
        if backlog is not None:
            response.incoming.CopyFrom(pb.DropBacklog(
                files=backlog.files, bytes=backlog.bytes, oldest=backlog.oldest, scanned=backlog.scanned,
            ))
        return response
