"""The rendered Envoy configuration, checked by the real Envoy binary (`--mode validate`)."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import re
import subprocess

import pytest

from gallery_server import downloads, envoy_config, supervisor
from gallery_server.errors import Unauthenticated
from gallery_server.rpc import servicer, status
from gallery_server.signed_urls import SignedUploadState

from ..conftest import http_bindings


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
    refused = status.to_status(Unauthenticated("TOKEN_MISSING", "missing bearer token"))
    answered |= {name for name, _ in refused.trailing_metadata} - {"grpc-status-details-bin"}  # the body's
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
    matched = {
        method for method, verb, template in http_bindings()
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
