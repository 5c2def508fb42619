"""Renders envoy/envoy.yaml for a given listener, admin port and set of gRPC backends."""

from __future__ import annotations

import base64
import json
import os
import pathlib
import re
import string

from google.api import annotations_pb2
from google.protobuf import descriptor_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from . import downloads
from .addresses import ANY_HOST, split_address
from .errors import ERROR_DOMAIN, RETRY_AFTER_HEADER

ROOT = pathlib.Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "envoy" / "envoy.yaml"
DESCRIPTOR = ROOT / "generated" / "gallery_descriptor.pb"

# Envoy's own answers to REST requests (refused before the server sees them: a query value of the
# wrong type, an unparsable JSON body, a path no route has or a method it has not, oversized
# headers, no server up) take the server's error shape, a JSON google.rpc.Status with an
# ErrorInfo, so that a client reads every error one way. HTTP status -> (gRPC code, ErrorInfo
# reason); the message is Envoy's.
LOCAL_REPLIES = {
    400: (code_pb2.INVALID_ARGUMENT, "MALFORMED_REQUEST"),  # the server's reason for what it cannot parse
    404: (code_pb2.NOT_FOUND, "NOT_FOUND"),
    405: (code_pb2.UNIMPLEMENTED, "METHOD_NOT_ALLOWED"),  # a path the API has, with a method it has not
    408: (code_pb2.DEADLINE_EXCEEDED, "REQUEST_TIMEOUT"),  # headers late, or a stream silent too long
    413: (code_pb2.RESOURCE_EXHAUSTED, "BODY_TOO_LARGE"),  # as the server's own size limits
    416: (code_pb2.OUT_OF_RANGE, "RANGE_NOT_SATISFIABLE"),  # a file Envoy sends shrank since the Check
    431: (code_pb2.RESOURCE_EXHAUSTED, "HEADERS_TOO_LARGE"),
    502: (code_pb2.UNAVAILABLE, "SERVER_UNAVAILABLE"),  # no server up, or it went away
    503: (code_pb2.UNAVAILABLE, "SERVER_UNAVAILABLE"),
    504: (code_pb2.DEADLINE_EXCEEDED, "SERVER_TIMEOUT"),
}
# Envoy's own 502 and 503 (no server up, a server gone mid-call, Envoy overloaded) say when to try
# again, as the server's 503s and 429s do (rpc/status.py): Envoy checks the servers' health every
# second (envoy.yaml), so it knows within that of one back up.
RETRY_AFTER_NO_SERVER_SECONDS = 1
# A read one replica has not begun to answer after this long is sent to another as well, the first
# answer winning (envoy.yaml, hedge_policy): a replica that hangs holds reads no longer than this,
# while its health check takes it out. Far above a healthy read's time (stats and a kept page take
# milliseconds, a deep offset page a few hundred), so that a busy replica sends none. A database
# slow for every replica (a table locked, its disk saturated) does: each read that slow runs once
# more, at most (one retry per read), on another replica.
READ_HEDGE_AFTER_SECONDS = 3
# Envoy's circuit breaker allows this many streams (and retries) at once per gRPC server it has,
# in all: above what a server's own limits admit (GALLERY_GRPC_WORKERS threads, 256 by default),
# so those answer first.
REQUESTS_PER_BACKEND = 1024
# Envoy's own answers to native gRPC calls whose gRPC status, derived from the HTTP one, says
# nothing a client can act on (413 would be UNKNOWN).
GRPC_LOCAL_REPLIES = {
    # "Takes": envoy.yaml's buffer limits, named in README "Reliability and security", not here.
    413: (code_pb2.RESOURCE_EXHAUSTED, "BODY_TOO_LARGE", "the request is larger than Envoy takes for this call"),
}
OTHER_LOCAL_REPLY = (code_pb2.UNKNOWN, "REQUEST_FAILED")  # a status Envoy seldom answers itself
# What Envoy takes for gRPC, whose local replies it sends as a gRPC status (grpc-message): those
# keep Envoy's own form. The Lua filter in envoy.yaml draws the same line.
_GRPC_CONTENT_TYPE = r"application/grpc(\+.*)?"


# What Envoy holds of a request body whose token it has not checked (envoy.yaml's gallery.token_check,
# rpc/token_check.py, runs for the others): a tokenless client sending bodies slowly on many
# connections held up to a MiB each and took Envoy past its overload limit. A GET's, which no GET of
# the API has (the transcoder reads one as JSON into the request all the same), and the message of a
# call that takes no token (a pre-signed URL's status, a health check): a few times what an idle
# request costs Envoy anyway. (A route's buffer cap bounds its answers too: those are small.)
GET_BODY_BYTES = 1024
SMALL_BODY_BYTES = 16 * 1024
# A REST body the transcoder turns into a message (FindExistingChecksums' 1,000 digests: ~70 KiB).
REST_BODY_BYTES = 1 << 20


def transcoder(max_request_body_size: int) -> dict[str, object]:
    """The grpc_json_transcoder's configuration: Envoy's, and a route's for GETs (GET_BODY_BYTES)."""
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
        "proto_descriptor": str(DESCRIPTOR),
        "services": ["gallery.v1.GalleryService", "gallery.v1.GalleryAdminService"],
        "print_options": {
            "add_whitespace": False, "always_print_primitive_fields": True,
            "always_print_enums_as_ints": False, "preserve_proto_field_names": False,
        },
        "convert_grpc_status": True,
        # Unknown query parameters are ignored (as HTTP servers do) rather than letting the request
        # through untranscoded.
        "ignore_unknown_query_parameters": True,
        # `+` in a query is a space, as HTML forms, URLSearchParams, Python's urlencode and Java's
        # URLEncoder write one (`?filename=my+clip.mp4`), and as the HTTP frameworks of such
        # services read it; a `+` is sent as %2B.
        "query_param_unescape_plus": True,
        # A path variable comes from the path only: a query parameter of the same name would
        # replace it in the message (`.../events/A/content?eventId=B` read B), while the file
        # handoff's Check, a HEAD and a conditional GET went by the path, so one URL described two
        # events.
        "ignored_query_parameters": ["device", "event_id", "eventId", "token"],
        "request_validation_options": {
            "reject_unknown_method": True,
            # Likewise for a JSON body (`body: "*"`): `{"device": "B"}` posted to
            # `/api/gallery/A/checksums` replaced A, past any rule keyed on the path.
            "reject_binding_body_field_collisions": True,
        },
        "max_request_body_size": max_request_body_size,
        "max_response_body_size": 4 << 20,
    }


# What a web page on an allowed origin may send and read (GALLERY_CORS_ORIGINS). Tokens travel in
# the Authorization header, never in cookies, so no credentials are allowed: a page gets only
# what its own token grants. The request headers are those the REST API reads; the exposed ones
# every header it answers with that is not CORS-safelisted (README "Browsers").
CORS_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE")
CORS_REQUEST_HEADERS = (
    "authorization", "content-type", "content-range", "range", "if-match", "if-none-match",
    "if-range", "if-modified-since", "if-unmodified-since", "x-request-id",
)
CORS_EXPOSED_HEADERS = (
    downloads.ETAG, downloads.ACCEPT_RANGES, downloads.CONTENT_RANGE, downloads.SIZE,
    downloads.SHA256, "content-disposition", "x-next-page-token", "x-committed-size",
    "x-upload-complete", "x-event-id",
    "range",  # a resumable PUT's 308: what the server holds (README "Resumable uploads over REST")
    "www-authenticate",  # a 401's: which token problem (RFC 6750)
    "x-request-id",  # every answer's: what the logs call the request
    "allow",  # a 405's: the methods the path takes (method_not_allowed_routes)
    RETRY_AFTER_HEADER,  # a 429's or 503's: when to try again (rpc/status.py)
)
CORS_MAX_AGE_SECONDS = 600  # how long a browser may reuse a preflight's answer


# The indentation of the line the generated routes take the place of.
_ROUTES_INDENT = re.search(r"^( *)\$\{METHOD_NOT_ALLOWED_ROUTES\}$", TEMPLATE.read_text(), re.MULTILINE)[1]


def render(
    *, listen: str, admin_port: int, backends: list[str], media_root: pathlib.Path | None = None,
    keepalive_seconds: float = 20.0, cors_origins: tuple[str, ...] = (),
) -> str:
    """The configuration; with `media_root` (the servers' <data>/media, as Envoy's host sees it)
    Envoy sends REST downloads itself (rpc/file_handoff.py). Envoy PINGs its HTTP/2 clients every
    `keepalive_seconds` and closes a connection that leaves one unanswered as long
    (Settings.keepalive_seconds). Web pages on `cors_origins` (serialized origins, or "*" for
    any) may call the REST API (Settings.cors_origins)."""
    listen_host, listen_port = split_address(listen, ANY_HOST)
    endpoints = []
    for backend in backends:
        host, port = split_address(backend, ANY_HOST)
        endpoints.append(
            {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
        )
    return string.Template(TEMPLATE.read_text()).substitute(
        ADMIN_PORT=admin_port,
        LISTEN_HOST=listen_host,
        LISTEN_PORT=listen_port,
        TRANSCODER=json.dumps(transcoder(REST_BODY_BYTES)),
        GET_TRANSCODER=json.dumps(transcoder(GET_BODY_BYTES)),
        SMALL_BODY_BUFFER=json.dumps({
            "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.BufferPerRoute",
            "buffer": {"max_request_bytes": SMALL_BODY_BYTES},
        }),
        BACKENDS=json.dumps(endpoints),  # JSON is YAML: a flow sequence
        FILE_HANDOFF_OFF="false" if media_root else "true",
        MEDIA_ROOT=_quoted_text(str(media_root or "/nonexistent")),
        LOCAL_REPLY_MAPPERS=json.dumps(_local_reply_mappers(bool(cors_origins))),
        KEEPALIVE=f"{keepalive_seconds:.3f}s",
        MAX_REQUESTS=REQUESTS_PER_BACKEND * len(backends),
        # 0s: no per-try timeout, so no hedge, with one replica (it would only run a slow read twice).
        READ_HEDGE_AFTER=f"{READ_HEDGE_AFTER_SECONDS}s" if len(backends) > 1 else "0s",
        SAFETY_HEADERS=json.dumps(_headers_to_add(bool(cors_origins))),
        VIRTUAL_HOST_FILTERS=json.dumps(
            {"envoy.filters.http.cors": cors_policy(cors_origins)} if cors_origins else {}
        ),
        # One flow mapping (JSON) per line, each an item of the block sequence the line is in.
        METHOD_NOT_ALLOWED_ROUTES=f"\n{_ROUTES_INDENT}".join(
            f"- {json.dumps(route)}" for route in method_not_allowed_routes()
        ),
    )


def http_bindings() -> set[tuple[str, str, str]]:
    """(RPC, HTTP method, path template) of every REST binding in the descriptor Envoy loads."""
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR.read_bytes())
    bindings = set()
    for file in files.file:
        for service in file.service:
            for method in service.method:
                rule = method.options.Extensions[annotations_pb2.http]
                for binding in (rule, *rule.additional_bindings):
                    kind = binding.WhichOneof("pattern")
                    if kind == "custom":
                        bindings.add((method.name, binding.custom.kind, binding.custom.path))
                    elif kind is not None:
                        bindings.add((method.name, kind.upper(), getattr(binding, kind)))
    return bindings


def method_not_allowed_routes() -> list[dict[str, object]]:
    """A route for each REST path template, taken by the methods it has no binding for: Lua answers
    405 with the Allow header (RFC 9110), where the transcoder would answer 404 as for a path that
    does not exist. Lua, not a direct_response, for the same reason as the percent-encoded query
    route in envoy.yaml: Lua runs before the transcoder, and the CORS filter serves routes to a
    cluster only. HEAD is allowed wherever GET is (envoy.yaml's Lua filter answers it)."""
    bound: dict[str, set[str]] = {}
    for _, method, template in http_bindings():
        bound.setdefault(template, set()).add(method)
    routes: list[dict[str, object]] = []
    for template in sorted(bound):
        # A path that another template matches too takes that template's methods as well.
        allowed = set().union(*(bound[other] for other in bound if _may_match_one_path(template, other)))
        if "GET" in allowed:
            allowed = allowed | {"HEAD"}
        allow = ", ".join(sorted(allowed))
        # Not naming the method asked: a HEAD's Content-Length must be its GET's.
        answer = (
            "function envoy_on_request(handle)\n"
            f"  handle:respond({{[\":status\"] = \"405\", [\"allow\"] = \"{allow}\"}},\n"
            f"    \"method not allowed: {template} takes {allow}\")\n"
            "end\n"
        )
        routes.append({
            "match": {
                "safe_regex": {"regex": _path_regex(template)},
                "headers": [{"name": ":method", "invert_match": True,
                             "string_match": {"safe_regex": {"regex": "|".join(sorted(allowed))}}}],
            },
            "route": {"cluster": "gallery_grpc", "timeout": "60s"},
            "typed_per_filter_config": {"envoy.filters.http.lua": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.LuaPerRoute",
                "source_code": {"inline_string": answer},
            }},
        })
    return routes


def _path_regex(template: str) -> str:
    """The RE2 regex of the paths a binding's template matches, with a trailing slash too (as the
    transcoder takes them); only the single-segment variables this API uses (`{device}`), so
    that a template with more fails loudly here."""
    segments = []
    for segment in template.split("/"):
        if re.fullmatch(r"\{[A-Za-z_][A-Za-z0-9_]*\}", segment):
            segments.append("[^/]+")
        elif re.fullmatch(r"[A-Za-z0-9._~-]*", segment):
            segments.append(re.escape(segment))
        else:
            raise ValueError(f"path template {template!r}: only literal and {{name}} segments are supported")
    return "/".join(segments) + "/?"


def _may_match_one_path(template: str, other: str) -> bool:
    """Whether some path matches both templates (segment by segment, a variable matching any)."""
    ours, theirs = template.split("/"), other.split("/")
    return len(ours) == len(theirs) and all(
        a == b or a.startswith("{") or b.startswith("{") for a, b in zip(ours, theirs, strict=True)
    )


def cors_policy(origins: tuple[str, ...]) -> dict[str, object]:
    """Envoy's CORS policy for web pages on `origins`; "*" alone allows any origin."""
    if origins == ("*",):
        allowed: list[dict[str, str]] = [{"safe_regex": {"regex": ".+"}}]
    else:
        allowed = [{"exact": origin} for origin in origins]
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
        "allow_origin_string_match": allowed,
        "allow_methods": ",".join(CORS_METHODS),
        "allow_headers": ",".join(CORS_REQUEST_HEADERS),
        "expose_headers": ",".join(CORS_EXPOSED_HEADERS),
        "max_age": str(CORS_MAX_AGE_SECONDS),
        "allow_credentials": False,
    }


def _headers_to_add(cors: bool) -> list[dict[str, object]]:
    """downloads.SAFETY_HEADERS as Envoy's headers to add; with a CORS policy, `Vary: Origin` too:
    the answer's Access-Control-Allow-Origin names the asking page's origin, so a cache must not
    hand it to a page on another."""
    headers = [
        {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        for key, value in downloads.SAFETY_HEADERS
    ]
    if cors:
        # Overwritten, not appended: Envoy's own answers get both the virtual host's headers and
        # their mapper's (vary: origin,origin), and no answer of the server's varies otherwise.
        headers.append({"header": {"key": "vary", "value": "origin"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"})
    return headers


def _local_reply_mappers(cors: bool) -> list[dict[str, object]]:
    """LOCAL_REPLIES as Envoy's local_reply_config mappers, the first match applying."""
    rest = {"or_filter": {"filters": [
        {"header_filter": {"header": {
            "name": "content-type", "string_match": {"safe_regex": {"regex": _GRPC_CONTENT_TYPE}},
            "invert_match": True, "treat_missing_header_as_empty": True,
        }}},
        # A REST request the transcoder began to turn into gRPC (its content type is gRPC's now)
        # before refusing it, as a query value of the wrong type.
        {"header_filter": {"header": {"name": "x-envoy-original-method", "present_match": True}}},
    ]}}

    def body(code: int, reason: str) -> dict[str, object]:
        return {"json_format": {"code": code, "message": "%LOCAL_REPLY_BODY%", "details": [{
            "@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason,
            "domain": ERROR_DOMAIN, "metadata": {},
        }]}}

    def status_is(status: int) -> dict[str, object]:
        return {"status_code_filter": {"comparison": {
            "op": "EQ", "value": {"default_value": status, "runtime_key": f"gallery.local_reply.{status}"},
        }}}

    # Each mapper adds the virtual host's headers too: Envoy's answers that no route took (a
    # request refused before routing) do not get the virtual host's. First, a token refused
    # before its body (rpc/token_check.py): the server's own answer, kept as it is.
    mappers: list[dict[str, object]] = [
        {"filter": {"response_flag_filter": {"flags": ["UAEX"]}}, "headers_to_add": _headers_to_add(cors)},
    ]
    mappers.extend(
        {
            "filter": {"and_filter": {"filters": [rest, status_is(status)]}},
            "body_format_override": body(code, reason),
            "headers_to_add": [*_headers_to_add(cors), *(
                [{"header": {"key": RETRY_AFTER_HEADER, "value": str(RETRY_AFTER_NO_SERVER_SECONDS)},
                  "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}] if status in (502, 503) else []
            )],
        }
        for status, (code, reason) in LOCAL_REPLIES.items()
    )
    mappers.append({"filter": rest, "body_format_override": body(*OTHER_LOCAL_REPLY),
                    "headers_to_add": _headers_to_add(cors)})
    native = {"header_filter": {"header": {
        "name": "content-type", "string_match": {"safe_regex": {"regex": _GRPC_CONTENT_TYPE}},
    }}}
    mappers.extend(
        {
            "filter": {"and_filter": {"filters": [native, status_is(status)]}},
            # The body is the grpc-message of Envoy's answer.
            "body": {"inline_string": message},
            "headers_to_add": [*_headers_to_add(cors), *_grpc_status_headers(code, reason, message)],
        }
        for status, (code, reason, message) in GRPC_LOCAL_REPLIES.items()
    )
    return mappers


def _grpc_status_headers(code: int, reason: str, message: str) -> list[dict[str, object]]:
    """grpc-status and its details (an ErrorInfo with the reason, as the server's own errors
    carry), in place of the status Envoy derives from the HTTP one."""
    status = status_pb2.Status(code=code, message=message)
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN))
    return [
        {"header": {"key": "grpc-status", "value": str(code)}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
        {"header": {"key": "grpc-status-details-bin",
                    "value": base64.b64encode(status.SerializeToString()).decode().rstrip("=")},
         "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
    ]


def _quoted_text(text: str) -> str:
    """The path `text` escaped for the inside of a YAML double-quoted string (JSON's escapes are
    YAML's); Envoy reads the file as UTF-8, so the path's bytes on disk must be UTF-8 too."""
    try:
        valid = os.fsencode(text).decode("utf-8") == text
    except UnicodeDecodeError:
        valid = False
    if not valid:
        raise ValueError(
            f"{text!r} is not valid UTF-8, which Envoy's configuration must be: move the data "
            "directory or set GALLERY_ENVOY_SENDS_FILES=false"
        ) from None
    # Not ASCII-only: JSON would write a character outside the BMP as a surrogate pair of \u
    # escapes, which YAML refuses.
    return json.dumps(text, ensure_ascii=False)[1:-1]
