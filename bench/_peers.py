"""The benchmark's peers: what plain, idiomatic Python web code does with the same bytes.

Run by uvicorn (httptools) in its own process, so that its CPU time and RSS are measured like the
gRPC server's:

    python -m uvicorn --app-dir bench _peers:app --http httptools --port 8100

Routes (files go to $PEER_DIR; every response reports what was stored):

- `PUT /raw/{name}`: a Starlette handler streaming the raw request body to disk as it arrives.
- `PUT /raw-durable/{name}`: the same, plus the work the gallery does for every upload: sha256 of
  every byte, fsync of the file, an atomic rename into place and an fsync of the directory.
- `POST /form/{name}` and `POST /form-durable/{name}`: FastAPI's idiomatic `UploadFile` endpoint
  (python-multipart spools the part to a temporary file, the handler copies it to its destination);
  the durable variant hashes while copying and fsyncs as above.
- `GET /ping`: a trivial JSON answer, the peer of the small-request scenario.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil

from fastapi import FastAPI, UploadFile
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

PEER_DIR = pathlib.Path(os.environ.get("PEER_DIR", "."))
COPY_BYTES = 1 << 20


def _target(name: str) -> pathlib.Path:
    if "/" in name or name.startswith("."):
        raise ValueError(f"bad name {name!r}")
    return PEER_DIR / name


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _DurableFile:
    """Write to `<name>.part`, hashing; commit() fsyncs, renames into place and fsyncs the folder."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.partial = path.with_name(path.name + ".part")
        self.file = open(self.partial, "wb")  # noqa: SIM115 - closed in commit()
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.digest.update(data)
        self.file.write(data)
        self.size += len(data)

    def commit(self) -> dict[str, object]:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.partial, self.path)
        _fsync_dir(self.path.parent)
        return {"size": self.size, "sha256": self.digest.hexdigest()}


async def raw_put(request: Request) -> JSONResponse:
    size = 0
    with open(_target(request.path_params["name"]), "wb") as out:
        async for chunk in request.stream():
            out.write(chunk)
            size += len(chunk)
    return JSONResponse({"size": size})


async def raw_put_durable(request: Request) -> JSONResponse:
    out = _DurableFile(_target(request.path_params["name"]))
    async for chunk in request.stream():
        out.write(chunk)
    return JSONResponse(out.commit())


async def ping(request: Request) -> JSONResponse:
    return JSONResponse({"success": True})


form_app = FastAPI()


@form_app.post("/{name}")
async def form_upload(name: str, event: UploadFile) -> dict[str, object]:
    with open(_target(name), "wb") as out:
        shutil.copyfileobj(event.file, out, COPY_BYTES)
        return {"size": out.tell()}


@form_app.post("/durable/{name}")
async def form_upload_durable(name: str, event: UploadFile) -> dict[str, object]:
    out = _DurableFile(_target(name))
    while data := event.file.read(COPY_BYTES):
        out.write(data)
    return out.commit()


app = Starlette(routes=[
    Route("/raw/{name}", raw_put, methods=["PUT"]),
    Route("/raw-durable/{name}", raw_put_durable, methods=["PUT"]),
    Route("/ping", ping),
    Mount("/form", app=form_app),
])
