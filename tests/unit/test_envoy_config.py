"""The rendered Envoy configuration, checked by the real Envoy binary (`--mode validate`)."""

from __future__ import annotations

import base64
import datetime
import json
import os
import pathlib
import re
import subprocess

import pytest
from google.rpc import error_details_pb2, status_pb2

from gallery_server import db, downloads, envoy_config, supervisor
from gallery_server.errors import Busy, Unauthenticated
from gallery_server.rpc import servicer, status
from gallery_server.signed_urls import SignedUploadState


@pytest.mark.parametrize("media_root", [
    None,
    pathlib.Path("/srv/gallery data/media"),
    # Quotes, backslashes and characters beyond the BMP must stay one YAML string.
    pathlib.Path('/srv/dåta "1" \\ 😀/media'),
], ids=["handoff off", "plain", "awkward"])
def test_envoy_accepts_the_rendered_configuration(tmp_path: pathlib.Path, media_root: pathlib.Path | None) -> None:
    config = tmp_path / "envoy.yaml"
    config.write_text(envoy_config.render(
        listen="127.0.0.1:0", admin_port=0, backends=["127.0.0.1:1"], media_root=media_root
    ), encoding="utf-8")
    result = subprocess.run([supervisor.envoy_binary(), "--mode", "validate", "-c", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    text = config.read_text(encoding="utf-8")
    if media_root is None:
        assert "disabled: false" not in text  # both filters stay off on the download route
    else:
        assert text.count("disabled: false") == 2  # ext_authz and file_server on that route
        # Envoy parsed it above; the escaping reads back as the folder (YAML's double-quoted
        # escapes are JSON's for these characters).
        quoted = text.split('file_path_prefix: "', 1)[1].split('/"}', 1)[0]
        assert json.loads(f'"{quoted}"') == str(media_root)


@pytest.mark.parametrize("origins", [("*",), ("https://app.example", "http://[::1]:3000")], ids=["any", "listed"])
def test_envoy_accepts_a_cors_policy(tmp_path: pathlib.Path, origins: tuple[str, ...]) -> None:
    config = tmp_path / "envoy.yaml"
    config.write_text(envoy_config.render(
        listen="127.0.0.1:0", admin_port=0, backends=["127.0.0.1:1"], cors_origins=origins,
    ), encoding="utf-8")
    result = subprocess.run([supervisor.envoy_binary(), "--mode", "validate", "-c", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CorsPolicy" in config.read_text(encoding="utf-8")


def test_a_page_may_read_every_header_the_rest_api_answers_with() -> None:
    """A header left out of CORS_EXPOSED_HEADERS is one a browser hides from an allowed page."""
    partial = downloads.reply(10, "0" * 64, range_header="bytes=0-1")  # the most headers: a 206
    answered = {name for name, _ in downloads.content_headers(partial, "video/mp4", "clip.mp4")}
    state = SignedUploadState("evt_x", committed_size=5, size=10, complete=False,
                              expires_at=datetime.datetime.now(datetime.UTC))
    answered |= {name for name, _ in servicer._upload_state_headers(state)}
    answered.add(servicer.NEXT_PAGE_TOKEN_HEADER)
    if envoy_config.method_not_allowed_routes():
        answered.add("allow")  # a 405's: the methods the path takes
    if "always_set_request_id_in_response: true" in envoy_config.TEMPLATE.read_text():
        answered.add("x-request-id")  # Envoy's, on every answer
    for error in (Unauthenticated("TOKEN_MISSING", "missing bearer token"), Busy("TOO_MANY_UPLOADS", "full")):
        # grpc-status-details-bin is the body's
        answered |= {name for name, _ in status.to_status(error).trailing_metadata} - {"grpc-status-details-bin"}
    safelisted = {"content-type", "content-length"}  # a page reads these without being told
    assert answered - safelisted == set(envoy_config.CORS_EXPOSED_HEADERS)


def test_a_data_directory_that_is_not_utf8_is_refused_with_a_way_out() -> None:
    undecodable = pathlib.Path(os.fsdecode(b"/srv/\xff/media"))
    with pytest.raises(ValueError, match="GALLERY_ENVOY_SENDS_FILES=false"):
        envoy_config.render(listen="127.0.0.1:0", admin_port=0, backends=["127.0.0.1:1"],
                            media_root=undecodable)


def test_the_lua_filter_strips_every_header_a_handoff_adds() -> None:
    """An error Envoy answers after a handoff must not keep any of the file's headers (rpc/file_handoff.py)."""
    lua_list = re.search(r"local handoff_headers = \{(.*?)\}", envoy_config.TEMPLATE.read_text(), re.DOTALL)
    assert lua_list is not None
    stripped = set(re.findall(r'"([a-z0-9-]+)"', lua_list.group(1)))
    partial = downloads.reply(10, "0" * 64, range_header="bytes=0-1")  # the most headers: a 206
    added = {name for name, _ in downloads.content_headers(partial, "video/mp4", "clip.mp4")}
    assert stripped == added


def test_the_reads_route_skips_its_filters_for_exactly_the_rest_reads() -> None:
    """The route that runs neither the Lua filter nor header_mutation (envoy.yaml) must take the
    REST GETs that answer a message and nothing else: a download or a thumbnail needs Lua to set
    its HTTP status (206, 304, 416), an upload its 308 or 507 and its Content-Length passed on,
    a HEAD its empty body. It must come before the catch-all route, or it never matches. Envoy's
    route regexes match the whole path (RE2; Python's `re` reads this one the same)."""
    routes = envoy_config.TEMPLATE.read_text().split("                        - match:")
    # The one route with Lua turned off (the route refusing encoded names runs a Lua of its own).
    (reads,) = [route for route in routes if "envoy.filters.http.lua:" in route and "LuaPerRoute" not in route]
    (catch_all,) = [route for route in routes if route.startswith(' {prefix: "/"}')]
    assert routes.index(reads) < routes.index(catch_all)
    assert reads.count("disabled: true") == 2
    regex = re.search(r'safe_regex: \{regex: "([^"]+)"\}', reads)
    assert regex is not None and '{name: ":method", string_match: {exact: GET}}' in reads
    # A listing's 304 and 412 (listing.py) are statuses only Lua sets: such requests go below.
    for conditional in ("if-none-match", "if-match"):
        assert f"{{name: {conditional}, present_match: false}}" in reads
    matched = {
        method for method, verb, template in envoy_config.http_bindings()
        if verb == "GET" and re.fullmatch(regex.group(1), re.sub(r"\{[^}]+\}", "x1", template))
    }
    assert matched == {
        "GetAdminStatus", "GetDevicePaths", "ListEventsJson", "GetEvent", "GetStats",
    }


def test_thumbnails_left_uncounted_fit_envoys_window_to_the_server() -> None:
    """servicer.SENT_WITHOUT_WAITING: a thumbnail up to it takes no download slot because Envoy
    takes it from the server whole (its stream window to the cluster, plus the gRPC and protobuf
    framing its buffer absorbs) whatever the client does. A smaller window would make it false."""
    from gallery_server.rpc.servicer import SENT_WITHOUT_WAITING

    cluster = envoy_config.TEMPLATE.read_text().split("  clusters:")[1]
    window = re.search(r"initial_stream_window_size: (\d+)", cluster)
    assert window is not None and SENT_WITHOUT_WAITING <= int(window.group(1))


def test_envoys_own_answers_carry_the_servers_codes_and_reasons() -> None:
    """README "Errors": what a client reads when Envoy answers a REST request itself."""
    assert {status: (code, reason) for status, (code, reason) in envoy_config.LOCAL_REPLIES.items()} == {
        400: (3, "MALFORMED_REQUEST"), 404: (5, "NOT_FOUND"), 405: (12, "METHOD_NOT_ALLOWED"),
        408: (4, "REQUEST_TIMEOUT"),
        413: (8, "BODY_TOO_LARGE"), 416: (11, "RANGE_NOT_SATISFIABLE"), 431: (8, "HEADERS_TOO_LARGE"),
        502: (14, "SERVER_UNAVAILABLE"), 503: (14, "SERVER_UNAVAILABLE"), 504: (4, "SERVER_TIMEOUT"),
    }
    assert envoy_config.OTHER_LOCAL_REPLY == (2, "REQUEST_FAILED")


@pytest.mark.parametrize("cors", [False, True])
def test_each_local_reply_mapper_answers_one_rest_status_in_the_servers_error_shape(cors: bool) -> None:
    mappers = envoy_config._local_reply_mappers(cors)
    safety = [{"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
              for k, v in downloads.SAFETY_HEADERS]
    vary = [{"header": {"key": "vary", "value": "origin"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]
    vary = vary if cors else []
    rest = {"or_filter": {"filters": [
        {"header_filter": {"header": {
            "name": "content-type", "string_match": {"safe_regex": {"regex": r"application/grpc(\+.*)?"}},
            "invert_match": True, "treat_missing_header_as_empty": True,
        }}},
        {"header_filter": {"header": {"name": "x-envoy-original-method", "present_match": True}}},
    ]}}

    def body(code: int, reason: str) -> dict:
        return {"json_format": {"code": code, "message": "%LOCAL_REPLY_BODY%", "details": [{
            "@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason, "domain": "gallery",
            "metadata": {},
        }]}}

    # First, a token refused before its body (rpc/token_check.py): the server's answer, as it is.
    refused, *mappers = mappers
    assert refused == {"filter": {"response_flag_filter": {"flags": ["UAEX"]}}, "headers_to_add": safety + vary}
    statuses = list(envoy_config.LOCAL_REPLIES)
    for mapper, http_status in zip(mappers, statuses, strict=False):
        code, reason = envoy_config.LOCAL_REPLIES[http_status]
        assert mapper == {
            "filter": {"and_filter": {"filters": [rest, {"status_code_filter": {"comparison": {
                "op": "EQ", "value": {"default_value": http_status,
                                      "runtime_key": f"gallery.local_reply.{http_status}"},
            }}}]}},
            "body_format_override": body(code, reason),
            # No server to answer, or Envoy overloaded: a second, and Envoy has checked again.
            "headers_to_add": safety + vary + ([{"header": {"key": "retry-after", "value": "1"},
                                                 "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]
                                               if http_status in (502, 503) else []),
        }
    assert mappers[len(statuses)] == {"filter": rest, "body_format_override": body(2, "REQUEST_FAILED"),
                                      "headers_to_add": safety + vary}
    (native,) = mappers[len(statuses) + 1:]
    assert native["body"] == {"inline_string": "the request is larger than Envoy takes for this call"}
    added = {h["header"]["key"]: h["header"]["value"] for h in native["headers_to_add"]}
    assert added["grpc-status"] == "8"
    details = status_pb2.Status.FromString(base64.b64decode(added["grpc-status-details-bin"] + "=="))
    info = error_details_pb2.ErrorInfo()
    assert details.code == 8 and details.message == native["body"]["inline_string"]
    assert details.details[0].Unpack(info) and (info.reason, info.domain) == ("BODY_TOO_LARGE", "gallery")
    assert not added["grpc-status-details-bin"].endswith("=")
    assert native["headers_to_add"][:len(safety + vary)] == safety + vary
    assert {h["append_action"] for h in native["headers_to_add"][len(safety + vary):]} == {"OVERWRITE_IF_EXISTS_OR_ADD"}


@pytest.mark.parametrize(("origins", "allowed"), [
    (("*",), [{"safe_regex": {"regex": ".+"}}]),
    (("https://app.example", "http://[::1]:3000"), [{"exact": "https://app.example"}, {"exact": "http://[::1]:3000"}]),
], ids=["any", "listed"])
def test_the_cors_policy(origins: tuple[str, ...], allowed: list[dict[str, object]]) -> None:
    assert envoy_config.cors_policy(origins) == {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
        "allow_origin_string_match": allowed,
        "allow_methods": "GET,HEAD,POST,PUT,DELETE",
        "allow_headers": "authorization,content-type,content-range,range,if-match,if-none-match,if-range,"
                         "if-modified-since,if-unmodified-since,x-request-id",
        "expose_headers": ",".join(envoy_config.CORS_EXPOSED_HEADERS),
        "max_age": "600",
        "allow_credentials": False,
    }
    assert "range" in envoy_config.CORS_EXPOSED_HEADERS  # a resumable PUT's 308


def test_the_rendered_values(tmp_path: pathlib.Path) -> None:
    def render(**kwargs: object) -> str:
        return envoy_config.render(listen="127.0.0.1:0", admin_port=0, backends=["127.0.0.1:1", "127.0.0.1:2"],
                                   **kwargs)  # type: ignore[arg-type]

    plain = render(keepalive_seconds=2.5)
    assert "connection_keepalive: {interval: 2.500s, timeout: 2.500s}" in plain
    assert "max_requests: 2048" in plain
    # Reads are hedged where there is another replica to send them to, and only there.
    assert plain.count(" per_try_timeout:") == 1 and " per_try_timeout: 3s" in plain
    alone = envoy_config.render(listen="127.0.0.1:0", admin_port=0, backends=["127.0.0.1:1"])
    assert alone.count(" per_try_timeout:") == 1 and " per_try_timeout: 0s" in alone
    assert "typed_per_filter_config: {}" in plain and '"vary"' not in plain
    listed = render(cors_origins=("https://app.example",))
    assert 'typed_per_filter_config: {"envoy.filters.http.cors": {' in listed and '"vary"' in listed
    assert render(media_root=tmp_path).count("disabled: false") == 2


def test_envoys_access_log_takes_its_own_answers_only_and_names_no_secret() -> None:
    """Envoy logs the answers it makes itself (README "Logs"): a server's answer (via_upstream)
    and a file Envoy sends after the Check have the server's lines already. A line must read no
    path or query (a pre-signed URL's path is its token) and no header but the request id and
    the method (Authorization carries bearer tokens)."""
    text = envoy_config.render(listen="127.0.0.1:0", admin_port=0, backends=["127.0.0.1:1"])
    assert text.count("access_log:") == 1  # the connection manager's; no other logger anywhere
    block = text.split("access_log:\n", 1)[1].split("request_headers_timeout:", 1)[0]
    assert "envoy.access_loggers.stderr" in block and "StderrAccessLog" in block
    assert re.findall(r'expression: "(.*)"', block) == [
        "response.code_details != 'via_upstream' && response.code_details != 'file_server'"
    ]
    fields = dict(re.findall(r"^ {26}(\w+): (.+)$", block.split("json_format:\n", 1)[1], re.MULTILINE))
    assert set(fields) == {"time", "level", "logger", "message", "request_id", "http_method", "http_status",
                           "details", "flags", "duration_ms", "client", "upstream_host"}
    assert (fields["message"], fields["request_id"]) == ("envoy reply", '"%REQ(X-REQUEST-ID)%"')
    operators = {name for value in fields.values() for name, _ in re.findall(r"%([A-Z_]+)(\([^)]*\))?%", value)}
    assert operators == {"EMIT_TIME", "REQ", "RESPONSE_CODE", "RESPONSE_CODE_DETAILS", "RESPONSE_FLAGS",
                         "DURATION", "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT", "UPSTREAM_HOST"}
    headers = {h for value in fields.values() for arg in re.findall(r"%REQ\(([^)]*)\)%", value) for h in arg.split("?")}
    assert headers == {"X-REQUEST-ID", "X-ENVOY-ORIGINAL-METHOD", ":METHOD"}


def test_a_read_behind_a_lock_is_the_servers_503_before_envoys_504() -> None:
    """PostgreSQL gives up on a lock (db.LOCK_TIMEOUT_MS: 503 DATABASE_UNAVAILABLE, retryable, with
    its reason) before Envoy gives up waiting for the REST read's answer (its route's
    idle_timeout: 504 with no reason): an SRE probe got 504s when the two were equal. The 503 is
    UNAVAILABLE, which Envoy retries (retry_reads), and the retry waits for the lock as long: with
    one replica the read's last answer comes after every attempt's wait, with several after the
    hedge's (the retry it takes). A review found the 30 s of before under two waits of 20 s."""
    text = envoy_config.TEMPLATE.read_text()
    [reads] = [line for line in text.splitlines() if "idle_timeout:" in line and "route:" in line]
    idle_seconds = int(re.search(r"idle_timeout: (\d+)s", reads).group(1))  # type: ignore[union-attr]
    policy = text.split("retry_policy: &retry_reads", 1)[1].split("retry_host_predicate:", 1)[0]
    retries = int(re.search(r"num_retries: (\d+)", policy).group(1))  # type: ignore[union-attr]
    assert "unavailable" in policy
    lock_seconds = db.LOCK_TIMEOUT_MS / 1000
    last_answer = max((1 + retries) * lock_seconds, envoy_config.READ_HEDGE_AFTER_SECONDS + lock_seconds)
    assert last_answer < idle_seconds - 5  # a margin for the answer's way back


def test_a_binding_path_becomes_the_regex_of_the_paths_it_takes() -> None:
    assert envoy_config._path_regex("/api/gallery/{device}/upload-url") == r"/api/gallery/[^/]+/upload\-url/?"
    regex = re.compile(envoy_config._path_regex("/api/gallery/{device}/events/{event_id}"))
    assert regex.fullmatch("/api/gallery/cam:1/events/evt_x")
    assert regex.fullmatch("/api/gallery/cam:1/events/evt_x/")  # as the transcoder takes it
    assert not regex.fullmatch("/api/gallery/cam/events/evt_x/content")
    # A template with more than this API uses must be told, not given a wrong route.
    with pytest.raises(ValueError, match="only literal and"):
        envoy_config._path_regex("/api/{name=files/**}")


def test_paths_two_templates_both_match_take_the_methods_of_both() -> None:
    assert envoy_config._may_match_one_path("/a/{d}/stats", "/a/{d}/{event}")
    assert not envoy_config._may_match_one_path("/a/{d}/stats", "/a/{d}/paths")
    assert not envoy_config._may_match_one_path("/a/{d}", "/a/{d}/{event}")
    routes = {route["match"]["safe_regex"]["regex"]: route for route in envoy_config.method_not_allowed_routes()}
    (method,) = routes[r"/api/gallery/[^/]+/events/[^/]+/?"]["match"]["headers"]
    assert method["string_match"] == {"safe_regex": {"regex": "DELETE|GET|HEAD"}} and method["invert_match"]
