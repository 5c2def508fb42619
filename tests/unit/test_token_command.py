"""`gallery token` (and `gallery run`'s banner) mint only tokens the server takes: anything else is
refused, exit status 2."""

from __future__ import annotations

import re
import time

import pytest

from gallery_server import auth, cli, supervisor
from gallery_server.settings import Settings

from ..conftest import JWT_SECRET

TEN_YEARS = 10 * 365 * 86400


@pytest.fixture(autouse=True)
def secret(tmp_path, monkeypatch):
    monkeypatch.setenv("GALLERY_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("GALLERY_JWT_SECRET", JWT_SECRET)


def mint(capsys, *args: str) -> auth.Principal:
    assert cli.main(["token", *args]) == 0
    return auth.Verifier(secret=JWT_SECRET).verify(capsys.readouterr().out.strip())


@pytest.mark.parametrize(("args", "says"), [
    (["--sub", ""], "--sub: must not be empty or blank"),  # the server refuses an empty sub
    (["--sub", "  "], "--sub: must not be empty or blank"),
    (["--ttl", "-100"], "--ttl: -100: must be a whole number of seconds"),  # already expired
    (["--ttl", "0"], "--ttl: 0: must be"),
    (["--ttl", "99999999999999"], f"from 1 to {TEN_YEARS} (10 years)"),
    (["--ttl", "1.5"], "--ttl: 1.5: must be"),
    (["--scope", "gallery:reed"], "unknown scope gallery:reed: the scopes are gallery:read, "),
    (["--scope", "gallery:read gallery:reed"], "unknown scope gallery:reed"),
    (["--scope", " "], "no scope"),
    (["--device", "dev/../x"], "'dev/../x' is not a device id"),
    (["--device", ""], "is not a device id"),
    (["--device", "*"], "'*' grants every device and must stand alone"),
])
def test_what_the_server_would_refuse_is_refused(capsys, args, says):
    with pytest.raises(SystemExit) as refused:
        cli.main(["token", "--sub", "ops", "--device", "cam-1", *args])
    assert refused.value.code == 2
    assert says in capsys.readouterr().err


def test_a_minted_token_is_one_the_server_takes(capsys):
    principal = mint(capsys, "--sub", "ops", "--device", "cam-1", "--device", "cam.2",
                     "--scope", "gallery:device gallery:admin", "--ttl", "60")
    assert principal.subject == "ops"
    assert principal.devices == {"cam-1", "cam.2"}
    assert principal.scopes == {auth.DEVICE, auth.ADMIN}
    assert principal.expires_at <= time.time() + 60 + auth.LEEWAY_SECONDS


def test_a_server_that_requires_an_issuer_and_audience_takes_the_minted_token(capsys, monkeypatch):
    monkeypatch.setenv("GALLERY_JWT_ISSUER", "https://gallery.example")
    monkeypatch.setenv("GALLERY_JWT_AUDIENCE", "gallery")
    assert cli.main(["token", "--sub", "ops", "--device", "cam-1"]) == 0
    token = capsys.readouterr().out.strip()
    verifier = auth.Verifier(secret=JWT_SECRET, issuer="https://gallery.example", audience="gallery")
    assert verifier.verify(token).subject == "ops"


def test_the_run_banners_token_is_taken_by_a_server_that_requires_an_issuer_and_audience(capsys, monkeypatch):
    monkeypatch.setenv("GALLERY_JWT_ISSUER", "https://gallery.example")
    monkeypatch.setenv("GALLERY_JWT_AUDIENCE", "gallery")
    supervisor._print_banner(Settings.from_env(), show_token=True)
    token = re.search(r"export TOKEN=(\S+)", capsys.readouterr().out).group(1)
    verifier = auth.Verifier(secret=JWT_SECRET, issuer="https://gallery.example", audience="gallery")
    principal = verifier.verify(token)
    assert (principal.devices, principal.scopes) == ({"*"}, {auth.READ, auth.WRITE})


def test_every_device_and_the_longest_ttl_are_allowed(capsys):
    principal = mint(capsys, "--sub", "ops", "--device", "*", "--ttl", str(TEN_YEARS))
    assert principal.devices == {"*"}
    assert principal.scopes == {auth.READ, auth.WRITE}  # the default


def test_a_token_envoy_would_refuse_for_its_size_is_not_minted(capsys):
    """300 long device ids made a 51 KB token: Envoy answers 431 to every request that carries it."""
    fleet = [arg for i in range(300) for arg in ("--device", f"{'d' * 120}{i:03d}")]
    assert cli.main(["token", "--sub", "ops", *fleet]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert re.search(r"the token would be \d+ bytes, over the 16384 a request may carry in its headers", err), err
    assert "grant fewer devices per token, or '*'" in err


def test_help_shows_the_defaults_and_the_cap(capsys):
    with pytest.raises(SystemExit):
        cli.main(["token", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "default: 86400" in shown
    assert f"at most {TEN_YEARS} (10 years" in shown
    assert "default: gallery:read gallery:write" in shown


def test_the_run_banner_prints_no_token_where_stdout_is_not_a_terminal(capsys):
    """A service manager's journal or a redirected log keeps stdout: a day-long token for every
    device does not belong there. The banner says how to mint one."""
    supervisor._print_banner(Settings.from_env(), show_token=False)
    out = capsys.readouterr().out
    assert "gallery is up" in out and "gallery token --sub dev" in out
    assert not re.search(r"eyJ[\w-]+\.[\w-]+\.[\w-]+", out)


def test_the_run_banner_names_the_listener_and_the_public_url(capsys, monkeypatch):
    """GALLERY_PUBLIC_URL may be a proxy's name this host does not resolve: the banner says where
    the stack listens, and its example uses that; the public URL is named beside it."""
    monkeypatch.setenv("GALLERY_HTTP_ADDRESS", "127.0.0.1:18002")
    monkeypatch.setenv("GALLERY_PUBLIC_URL", "https://gallery.example")
    supervisor._print_banner(Settings.from_env(), show_token=False)
    out = capsys.readouterr().out
    assert "gallery is up: REST and gRPC on http://127.0.0.1:18002 " in out
    assert "clients reach it as https://gallery.example" in out
    assert 'curl "http://127.0.0.1:18002/api/gallery/device123/paths"' in out
    monkeypatch.delenv("GALLERY_PUBLIC_URL")
    supervisor._print_banner(Settings.from_env(), show_token=False)
    assert "clients reach it as" not in capsys.readouterr().out
