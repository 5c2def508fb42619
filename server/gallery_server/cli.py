"""The `gallery` command: run the stack, serve gRPC alone, or mint a development token."""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

from . import auth, logs
from .settings import ConfigError, Settings, ensure_secret_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gallery", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="start the gRPC server and Envoy; Ctrl-C stops both")
    commands.add_parser("serve", help="start only the gRPC server (GALLERY_GRPC_ADDRESS)")
    token = commands.add_parser("token", help="mint a bearer token signed with the server's secret")
    token.add_argument("--sub", required=True, help="the token's subject (who it is for)")
    token.add_argument(
        "--device", action="append", required=True,
        help="a device id the token grants, or '*' for all; repeat for several",
    )
    token.add_argument("--scope", default=f"{auth.READ} {auth.WRITE}",
                       help="space-separated scopes (default: %(default)s)")
    token.add_argument("--ttl", type=int, default=86400, help="lifetime in seconds")
    args = parser.parse_args(argv)

    try:
        if args.command == "run" and not os.environ.get("GALLERY_JWT_SECRET"):
            data_dir = pathlib.Path(os.environ.get("GALLERY_DATA_DIR", "./data")).resolve()
            ensure_secret_file(data_dir)
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"gallery: {exc}", file=sys.stderr)
        return 2

    if args.command == "token":
        print(auth.mint(settings.jwt_secret, subject=args.sub, devices=args.device,
                        scope=args.scope, ttl_seconds=args.ttl))
        return 0
    logs.configure(settings.log_level)
    if args.command == "serve":
        from .rpc.server import serve

        serve(settings)
        return 0
    from .supervisor import run

    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
