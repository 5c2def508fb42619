"""RS256 and ES256 bearer tokens through the real Envoy: a stack configured with a PEM public key
file (and, in the second test, a JWKS served by a real local HTTP server) and no JWT secret in the
environment, so that `gallery run` creates the data-dir secret that signs upload URLs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gallery.v1 import gallery_pb2 as pb
from gallery.v1 import gallery_pb2_grpc
from gallery_server import auth
from gallery_server.local_stack import stop_stack

from ..conftest import JWT_SECRET, rich_error
from .conftest import start_stack

DEVICE = "rs-cam"
ISSUER = "https://id.example.test"
AUDIENCE = "gallery"


def _claims(**overrides: object) -> dict:
    now = int(time.time())
    claims = {"sub": "idp-user", "devices": [DEVICE], "scope": f"{auth.READ} {auth.WRITE}",
              "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 600}
    claims.update(overrides)
    return claims


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _pem(private: rsa.RSAPrivateKey) -> str:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


@pytest.fixture(scope="module")
def rsa_private() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def test_rs256_public_key_stack(tmp_path, rsa_private) -> None:  # type: ignore[no-untyped-def]
    key_file = tmp_path / "idp.pem"
    key_file.write_text(_pem(rsa_private))
    data = tmp_path / "data"
    env = {"GALLERY_JWT_SECRET": "", "GALLERY_JWT_PUBLIC_KEY_FILE": str(key_file),
           "GALLERY_JWT_ISSUER": ISSUER, "GALLERY_JWT_AUDIENCE": AUDIENCE,
           "GALLERY_MAKE_THUMBNAILS": "false"}
    stack = start_stack(data, tmp_path / "gallery.log", extra_env=env)
    try:
        good = jwt.encode(_claims(), rsa_private, algorithm="RS256")
        with httpx.Client(base_url=stack.base_url, timeout=30) as http:
            def get(token: str) -> httpx.Response:
                return http.get(f"/api/gallery/{DEVICE}/stats", headers={"Authorization": f"Bearer {token}"})

            r = get(good)
            assert r.status_code == 200, r.text
            assert r.json() == {"total_events": 0, "total_size": 0, "by_type": {}}
            refused = {
                # HS256 with the server's own URL-signing secret: not a token key any more.
                "hs256-secret": auth.mint((data / "jwt-secret").read_text().strip(), subject="x",
                                          devices=["*"], scope=auth.READ),
                "hs256-with-the-public-key": _forged_hs256(_pem(rsa_private)),
                "other-rsa-key": jwt.encode(_claims(), rsa.generate_private_key(
                    public_exponent=65537, key_size=2048), algorithm="RS256"),
                "es256": jwt.encode(_claims(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256"),
                "wrong-issuer": jwt.encode(_claims(iss="https://evil.test"), rsa_private, algorithm="RS256"),
                "wrong-audience": jwt.encode(_claims(aud="other"), rsa_private, algorithm="RS256"),
                "no-audience": jwt.encode({k: v for k, v in _claims().items() if k != "aud"}, rsa_private,
                                          algorithm="RS256"),
                "alg-none": _b64(b'{"alg":"none"}') + "." + _b64(json.dumps(_claims()).encode()) + ".",
            }
            for name, token in refused.items():
                r = get(token)
                assert (r.status_code, r.json()["details"][0]["reason"]) == (401, "TOKEN_INVALID"), name
            # Device and scope rules are the same as with HS256.
            other = jwt.encode(_claims(devices=["someone-else"]), rsa_private, algorithm="RS256")
            assert get(other).status_code == 403
            # Upload URLs are still signed, by the data-dir secret that `gallery run` created.
            headers = {"Authorization": f"Bearer {good}"}
            r = http.get(f"/api/gallery/{DEVICE}/upload-url?filename=v.bin", headers=headers)
            assert r.status_code == 200, r.text
            put = http.put(r.json()["upload_url"], content=b"presigned")
            assert put.status_code == 200, put.text
            listed = http.get(f"/api/gallery/{DEVICE}/events", headers=headers).json()
            assert [(e["name"], e["size"]) for e in listed] == [("v.bin", 9)]
        assert (data / "jwt-secret").stat().st_mode & 0o777 == 0o600
        with grpc.insecure_channel(stack.envoy_grpc_address) as channel:
            stub = gallery_pb2_grpc.GalleryServiceStub(channel)
            stats = stub.GetStats(pb.GetStatsRequest(device=DEVICE),
                                  metadata=[("authorization", f"Bearer {good}")], timeout=30)
            assert stats.total_events == 1
            with pytest.raises(grpc.RpcError) as info:
                stub.GetStats(pb.GetStatsRequest(device=DEVICE),
                              metadata=[("authorization", f"Bearer {refused['hs256-with-the-public-key']}")],
                              timeout=30)
            assert (info.value.code(), rich_error(info.value)[0].reason) == (
                grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")
        # `gallery token` refuses to mint what this server would refuse.
        minted = subprocess.run(
            [sys.executable, "-m", "gallery_server", "token", "--sub", "x", "--device", DEVICE],
            env={**os.environ, "GALLERY_DATA_DIR": str(data), "GALLERY_JWT_SECRET": "", **env},
            capture_output=True, text=True,
        )
        assert minted.returncode == 2 and "RS256" in minted.stderr
    finally:
        stop_stack(stack)
    assert "export TOKEN=" not in stack.log()  # no HS256 development token in this mode


def _forged_hs256(pem: str) -> str:
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(_claims()).encode())
    signature = hmac.new(pem.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64(signature)}"


class _Jwks(http.server.BaseHTTPRequestHandler):
    keys: list[dict] = []
    hits = 0

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        type(self).hits += 1
        body = json.dumps({"keys": self.keys}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def jwks_url(rsa_private) -> Iterator[str]:  # type: ignore[no-untyped-def]
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(rsa_private.public_key(), as_dict=True)
    # Beside the key in use, one PyJWT cannot load: it made every request a 500 that fetched the
    # set again, before the server skipped such keys (auth._KeySetClient).
    _Jwks.keys, _Jwks.hits = [{**jwk, "kid": "k1", "use": "sig"}, {"kty": "oct", "kid": "none-1", "alg": "none"}], 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Jwks)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
    server.shutdown()
    server.server_close()


def test_jwks_stack_with_kid_flood(tmp_path, rsa_private, jwks_url) -> None:  # type: ignore[no-untyped-def]
    stack = start_stack(tmp_path / "data", tmp_path / "gallery.log", extra_env={
        "GALLERY_JWT_SECRET": JWT_SECRET, "GALLERY_JWT_JWKS_URL": jwks_url,
        "GALLERY_JWT_JWKS_COOLDOWN": "300", "GALLERY_MAKE_THUMBNAILS": "false",
    })
    try:
        claims = {k: v for k, v in _claims().items() if k not in ("iss", "aud")}
        good = jwt.encode(claims, rsa_private, algorithm="RS256", headers={"kid": "k1"})
        with httpx.Client(base_url=stack.base_url, timeout=30) as http:
            def get(token: str) -> httpx.Response:
                return http.get(f"/api/gallery/{DEVICE}/stats", headers={"Authorization": f"Bearer {token}"})

            assert get(good).status_code == 200
            for n in range(30):  # made-up kids: refused without asking the identity provider again
                flood = jwt.encode(claims, rsa_private, algorithm="RS256", headers={"kid": f"rnd-{n}"})
                r = get(flood)
                assert (r.status_code, r.json()["details"][0]["reason"]) == (401, "TOKEN_KEY_UNKNOWN")
            assert get(good).status_code == 200
        assert _Jwks.hits == 1
    finally:
        stop_stack(stack)
