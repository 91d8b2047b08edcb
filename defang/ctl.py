"""``defangctl``: ask a running multiplexor for its status, or reload the filter.

Exit codes (for monitoring checks): 0 OK; 1 the command failed (e.g. a reload whose
filter does not load); 2 usage or config error; 3 the multiplexor cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from typing import Any

from defang import config as configmod
from defang import protocol


def request(path: str, obj: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(protocol.encode(obj))
        decoder = protocol.FrameDecoder(16 << 20)
        while True:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("multiplexor closed the connection")
            bodies = decoder.feed(data)
            if bodies:
                return protocol.decode_body(bodies[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="defangctl", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config")
    ap.add_argument("--runtime-dir")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    ap.add_argument("command", choices=["status", "reload", "workers", "histo"])
    args = ap.parse_args(argv)
    try:
        cfg = configmod.load(args.config, runtime_dir=args.runtime_dir)
    except configmod.ConfigError as exc:
        print(f"defangctl: {exc}", file=sys.stderr)
        return 2
    op = "reload" if args.command == "reload" else "status"
    try:
        reply = request(str(cfg.control_socket), {"v": protocol.VERSION, "op": op})
    except (OSError, protocol.ProtocolError) as exc:
        print(f"defangctl: cannot reach the multiplexor at {cfg.control_socket}: {exc}",
              file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps(reply, indent=2))
    else:
        from defang import ctlview

        print(ctlview.render(args.command, reply))
    return 0 if reply.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
