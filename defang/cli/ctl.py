"""``defangctl``: ask a running multiplexor for its status, or reload the filter; ``top``
watches it live.

Exit codes (for monitoring checks): 0 OK; 1 the command failed (e.g. a reload whose
filter does not load); 2 usage or config error; 3 the multiplexor cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys

from defang.cli import ctlview
from defang.core import config as configmod
from defang.core import wire
from defang.core.framing import FrameDecoder


def request(path: str, command: str, timeout: float = 120.0) -> wire.Status | wire.ControlResult:
    """Send one control command, return the multiplexor's answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(wire.encode(wire.ControlRequest(command)))
        decoder = FrameDecoder(16 << 20)
        while True:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("multiplexor closed the connection")
            bodies = decoder.feed(data)
            if bodies:
                return wire.decode(bodies[0], wire.FROM_CONTROL)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="defangctl", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config")
    ap.add_argument("--runtime-dir")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    ap.add_argument("command", choices=["status", "reload", "workers", "histo", "top"],
                    help="top: a live view, refreshed each second (q quits)")
    args = ap.parse_args(argv)
    try:
        cfg = configmod.load(args.config, runtime_dir=args.runtime_dir, client=True)
    except configmod.ConfigError as exc:
        print(f"defangctl: {exc}", file=sys.stderr)
        return 2
    if args.command == "top" and not (sys.stdout.isatty() and sys.stdin.isatty()):
        print("defangctl: top: needs a terminal (defangctl status, or --json, for a script)", file=sys.stderr)
        return 2
    try:
        reply = request(str(cfg.control_socket), "reload" if args.command == "reload" else "status")
    except PermissionError:
        group = cfg.control_group or cfg.daemon_group
        print(f"defangctl: {cfg.control_socket}: Permission denied: the control socket is for root, "
              f"defang's user and group {group}", file=sys.stderr)  # fmt: skip
        return 3
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        print(f"defangctl: cannot reach the multiplexor at {cfg.control_socket}: {exc.strerror}: is defang "
              "running? Point defangctl at its runtime dir with --runtime-dir DIR, or at its config with "
              "--config FILE ([daemon] runtime_dir, [multiplexor] control_socket)",
              file=sys.stderr)  # fmt: skip
        return 3
    except (OSError, wire.ProtocolError) as exc:
        print(f"defangctl: cannot reach the multiplexor at {cfg.control_socket}: {exc}",
              file=sys.stderr)
        return 3
    if args.command == "top":  # the multiplexor answered: watch it
        from defang.cli import top

        return top.run(lambda: request(str(cfg.control_socket), "status", timeout=5.0))
    shown = wire.to_wire(reply)
    if args.json:
        print(json.dumps(shown, indent=2))
    else:
        print(ctlview.render(args.command, shown))
    return 0 if reply.ok else 1


if __name__ == "__main__":
    sys.exit(main())
