"""Regenerate the Python stubs and Envoy's descriptor set from protos/.

    python tools/generate.py           # rewrite generated/
    python tools/generate.py --check   # exit 1 if generated/ is stale

The googleapis-common-protos wheel provides google/api and google/rpc, so nothing is vendored.
"""

import argparse
import filecmp
import pathlib
import sys
import tempfile

import google.api
import grpc_tools
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GENERATED = ROOT / "generated"
DESCRIPTOR = "gallery_descriptor.pb"
SOURCES = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
# Envoy renders rich error details only for message types found in its descriptor set.
EXTRA_DESCRIPTOR_INPUTS = ["google/rpc/error_details.proto"]


def _include_args() -> list[str]:
    googleapis = pathlib.Path(google.api.__path__[0]).parent.parent
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    return [f"-I{PROTOS}", f"-I{googleapis}", f"-I{well_known}"]


def _run(args: list[str]) -> None:
    if protoc.main(["protoc", *_include_args(), *args]) != 0:
        sys.exit(f"protoc failed: {args}")


def generate(out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _run([f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *SOURCES])
    _run([
        "--include_imports",
        "--include_source_info",
        f"--descriptor_set_out={out / DESCRIPTOR}",
        *SOURCES,
        *EXTRA_DESCRIPTOR_INPUTS,
    ])


def _files(tree: pathlib.Path) -> set[str]:
    return {
        str(p.relative_to(tree))
        for p in tree.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if generated/ is stale")
    if not parser.parse_args().check:
        generate(GENERATED)
        return
    with tempfile.TemporaryDirectory() as tmp:
        fresh = pathlib.Path(tmp)
        generate(fresh)
        names = _files(fresh) | _files(GENERATED)
        stale = sorted(
            n for n in names
            if not ((fresh / n).is_file() and (GENERATED / n).is_file()
                    and filecmp.cmp(fresh / n, GENERATED / n, shallow=False))
        )
    if stale:
        sys.exit("generated/ is stale; run `make generate`: " + ", ".join(stale))
    print("generated/ is up to date")


if __name__ == "__main__":
    main()
