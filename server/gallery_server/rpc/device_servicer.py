"""DeviceService over gRPC: the command channel and announcements."""

from __future__ import annotations

import contextvars
import datetime
import logging
import threading
import time
from collections.abc import Callable, Iterator

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from gallery.v1 import device_pb2 as pb
from gallery.v1 import device_pb2_grpc

from .. import devices as devices_module
from ..auth import Principal
from ..devices import Announcement, Channel, Devices
from ..errors import DatabaseUnavailable, GalleryError, InvalidArgument
from .interceptor import current_principal
from .servicer import metadata_json

log = logging.getLogger(__name__)

MAX_AGENT_LOGGED = 200  # a device's "name/version (platform)" is a few dozen


def _instant(timestamp: Timestamp) -> datetime.datetime:
    try:
        return timestamp.ToDatetime(tzinfo=datetime.UTC)
    except (ValueError, OverflowError):  # outside 0001..9999, which Timestamp also forbids
        raise InvalidArgument("INVALID_CREATED", "created is not a valid timestamp",
                              field="created") from None


def _first_within(messages: Iterator[pb.ConnectRequest], context: grpc.ServicerContext,
                  seconds: float) -> pb.ConnectRequest | None:
    """The stream's first message, the RPC cancelled if it does not come within `seconds` (a
    stream that never says hello would hold its thread for ever)."""
    lock, arrived = threading.Lock(), threading.Event()

    def too_late() -> None:
        with lock:  # not once the message is taken: Timer.cancel() cannot stop a running callback
            if not arrived.is_set():
                context.cancel()

    timer = threading.Timer(seconds, too_late)
    timer.start()
    try:
        return next(messages, None)
    finally:
        with lock:
            arrived.set()
        timer.cancel()


def _loggable(agent: str) -> str:
    """A device's free-form description of itself, cut to MAX_AGENT_LOGGED characters: a device
    that reconnects with megabytes of it must not fill the log volume."""
    return agent if len(agent) <= MAX_AGENT_LOGGED else agent[:MAX_AGENT_LOGGED] + "..."


class DeviceServicer(device_pb2_grpc.DeviceServiceServicer):
    def __init__(
        self, devices: Devices, principal: Callable[[], Principal] = current_principal
    ) -> None:
        self.devices = devices
        self.principal = principal

    def AnnounceEvents(self, request, context):  # type: ignore[no-untyped-def]
        max_metadata = self.devices.settings.max_metadata_bytes
        announcements = [
            Announcement(
                device_key=e.device_key,
                name=e.name,
                media_type=e.media_type,
                size=e.size,
                created=_instant(e.created) if e.HasField("created") else None,
                metadata_json=metadata_json(e.metadata, max_metadata),
                thumbnail=e.thumbnail,
                sha256=e.sha256,
            )
            for e in request.events
        ]
        events = self.devices.announce(self.principal(), request.device, announcements)
        return pb.AnnounceEventsResponse(results=[
            pb.AnnouncedEventResult(device_key=e.device_key or "", event_id=e.id, state=e.state)
            for e in events
        ])

    def Connect(self, request_iterator, context):  # type: ignore[no-untyped-def]
        principal = self.principal()
        with self.devices.greeting(principal):
            first = _first_within(request_iterator, context, devices_module.HELLO_SECONDS)
        if not context.is_active():  # cancelled as the hello came: too late
            return
        if first is None or first.WhichOneof("message") != "hello":
            raise InvalidArgument("HELLO_REQUIRED", "the first message must be a hello",
                                  field="hello")
        channel = self.devices.connect(principal, first.hello.device)
        context.add_callback(channel.close)  # the RPC ended, however it ended
        failure: list[GalleryError] = []  # a bad message the reader met: the RPC's error
        reader = threading.Thread(
            # In a copy of this RPC's context, so the reader's lines carry its request id.
            target=contextvars.copy_context().run,
            args=(self._read_replies, request_iterator, channel, failure),
            name=f"device-{channel.device}", daemon=True,
        )
        reader.start()
        connected = time.monotonic()
        log.info("device connected", extra={"device": channel.device, "connection": channel.id,
                                             "agent": _loggable(first.hello.agent)})
        try:
            for command in channel.commands():
                if command is None:
                    yield pb.ConnectResponse(heartbeat=pb.Heartbeat())
                    continue
                yield pb.ConnectResponse(command=pb.Command(
                    id=command.command_id,
                    upload_event=pb.UploadEventCommand(
                        event_id=command.event_id, device_key=command.device_key,
                        name=command.name,
                    ),
                ))
            if failure:  # the reader closed the channel on a bad message: end with its error
                raise failure[0]
        finally:
            channel.close()
            # The access line that follows says how it ended (CANCELLED: the device went).
            log.info("device disconnected", extra={"device": channel.device, "connection": channel.id,
                                                   "connected_seconds": round(time.monotonic() - connected, 1)})

    def _read_replies(self, request_iterator: Iterator[pb.ConnectRequest], channel: Channel,
                      failure: list[GalleryError]) -> None:
        """Apply the device's acks, progress and failures as they come.

        A device that half-closes its side keeps receiving commands: only the end of the RPC
        (a callback registered in Connect), a broken stream, an undecodable message or a second
        hello (recorded in `failure`, which Connect raises: INVALID_ARGUMENT MALFORMED_REQUEST or
        HELLO_REPEATED) closes the channel. An empty message is ignored."""
        device = channel.device
        try:
            for message in request_iterator:
                if message.WhichOneof("message") == "hello":  # of this device or another: ends it
                    raise InvalidArgument(
                        "HELLO_REPEATED", f"this channel said its hello already (device {device})",
                        field="hello",
                    )
                try:
                    self._apply(device, message)
                except DatabaseUnavailable:
                    # Every connected device's reports (progress, a second apart while it uploads)
                    # would each write an ERROR with its traceback; db.py tells of the outage, at
                    # most once a minute. The report is lost: the device sends the next.
                    log.debug("device message ignored: the database is unavailable", extra={"device": device})
                except Exception:  # one bad report must not end the device's channel
                    log.exception("device message ignored", extra={"device": device})
        except grpc.RpcError:
            channel.close()  # the device went away
        except GalleryError as exc:  # an undecodable message (interceptor.py): end the channel
            log.warning("device channel closed: bad message", extra={"device": device, "reason": exc.reason})
            failure.append(exc)
            channel.close()

    def _apply(self, device: str, message: pb.ConnectRequest) -> None:
        kind = message.WhichOneof("message")
        if kind == "ack":
            self.devices.acknowledge(device, message.ack.command_id)
        elif kind == "progress":
            self.devices.progress(device, message.progress.command_id, message.progress.bytes_sent)
        elif kind == "failure":
            self.devices.fail(device, message.failure.command_id, message.failure.reason)
