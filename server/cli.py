"""`peft-server`: the cloud coordinator's command line.

    peft-server certs --out tls/ [--host coordinator.example.org]   # dev CA + server certificate
    peft-server keys --out server-id/                               # identity for sealed envelopes
    peft-server run --config run.toml --run-dir runs/r1 --tls tls/ --clients keys/
    peft-server run --config run.toml --run-dir runs/r1 --tls tls/ --clients keys/ --resume
    peft-server offsite-build --out emulator/ --bottom 2 --top 2 --keep-every 4   # Offsite-Tuning emulator for clients

TLS is on by default: `run` needs `--tls DIR` or an explicit `--insecure` (which logs a
warning). With `--clients DIR` every `*.pub` node key in it is registered and SuperNode
authentication is enforced; unregistered nodes are refused by the SuperLink.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from fedpeft.common.errors import ConfigError, FedPeftError
from fedpeft.common.logs import apply_offline_env, setup_logging

log = logging.getLogger("fedpeft.server")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peft-server", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    certs = sub.add_parser("certs", help="make a dev CA and a server TLS certificate (SANs: loopback + --host)")
    certs.add_argument("--out", type=Path, required=True)
    certs.add_argument("--host", action="append", default=[], help="extra DNS name or IP clients use (repeatable)")
    certs.add_argument("--days", type=int, default=365)
    certs.add_argument("--overwrite", action="store_true")
    keys = sub.add_parser("keys", help="make the server's identity keys (Ed25519 + X25519) for sealed envelopes")
    keys.add_argument("--out", type=Path, required=True)
    keys.add_argument("--overwrite", action="store_true")
    off = sub.add_parser("offsite-build", help="build an Offsite-Tuning emulator (adapter blocks + thinned middle) "
                                                "to give clients as their --model")
    off.add_argument("--model", default=None, help="the full model: built-in name, .gguf file or HF dir (default SmolLM2)")
    off.add_argument("--out", type=Path, required=True, help="emulator dir to write (an ordinary HF model dir + offsite.json)")
    off.add_argument("--bottom", type=int, default=2, help="bottom adapter blocks (%(default)s)")
    off.add_argument("--top", type=int, default=2, help="top adapter blocks (%(default)s)")
    off.add_argument("--keep-every", type=int, default=4, help="keep every n-th middle block (%(default)s)")
    off.add_argument("--distill-data", default=None, help="server-owned text file to distill the emulator on")
    off.add_argument("--distill-steps", type=int, default=0, help="distillation steps (0 = off)")
    off.add_argument("--distill-lr", type=float, default=1e-4)
    off.add_argument("--overwrite", action="store_true")
    run = sub.add_parser("run", help="start a SuperLink (or attach to one) and run a federation from a TOML config")
    run.add_argument("--config", type=Path, required=True, help="TOML run config (see fedpeft.server.run_config)")
    run.add_argument("--run-dir", type=Path, required=True, help="where checkpoints, metrics and final/ go")
    security = run.add_mutually_exclusive_group(required=True)
    security.add_argument("--tls", type=Path, help="dir with ca.crt, server.pem, server.key (peft-server certs)")
    security.add_argument("--insecure", action="store_true", help="no TLS (loopback/lab only; logs a warning)")
    run.add_argument("--clients", type=Path, help="dir of client node public keys (*.pub) to register; enables node auth")
    run.add_argument("--host", default="127.0.0.1", help="SuperLink bind address (default loopback only)")
    run.add_argument("--port", type=int, default=9092, help="SuperLink port (Fleet, Control and ServerAppIo APIs)")
    run.add_argument("--attach", help="use the SuperLink at this address instead of starting one")
    run.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last completed round")
    run.add_argument("--client-app", help="override the ClientApp component, e.g. fedpeft.client.inprocess_app:app "
                                          "(loads the model per message; for benchmarks)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    apply_offline_env()
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        if args.command == "certs":
            from fedpeft.common.pki import make_dev_certificates

            files = make_dev_certificates(args.out, args.host, args.days, args.overwrite)
            print(f"CA: {files.ca_cert} (give this to clients)\nserver: {files.server_cert}, {files.server_key}")
        elif args.command == "keys":
            from fedpeft.common.envelope import PeerIdentity

            identity = PeerIdentity.generate()
            identity.save(args.out, overwrite=args.overwrite)
            print(f"server identity {identity.public_keys.key_id} in {args.out}: give "
                  f"{args.out / PeerIdentity.PUBLIC_FILE} to clients (peft-client start --server-key) so they seal "
                  "deltas to this key only")
        elif args.command == "offsite-build":
            from fedpeft.common.offsite.run import OffsiteSettings, build_for_clients

            settings = OffsiteSettings(bottom=args.bottom, top=args.top, keep_every=args.keep_every,
                                       distill_steps=args.distill_steps, distill_data=args.distill_data,
                                       distill_lr=args.distill_lr)
            layer_map = build_for_clients(args.model, args.out, settings, overwrite=args.overwrite)
            print(f"emulator: {args.out} ({layer_map.emulator_layers} of {layer_map.full_layers} blocks; adapter blocks "
                  f"{list(layer_map.adapter)} = full-model blocks {[layer_map.to_full(i) for i in layer_map.adapter]})\n"
                  f"give this dir to clients (peft-client start --model DIR) and set [offsite] emulator = \"{args.out}\" "
                  "with topology = \"offsite\" in the run config")
        else:
            from fedpeft.server.launcher import LaunchOptions, launch

            if args.clients is not None and args.insecure:
                raise ConfigError("--clients (SuperNode authentication) needs TLS: Flower refuses node auth with --insecure")
            final = launch(LaunchOptions(config_path=args.config, run_dir=args.run_dir, tls_dir=args.tls, host=args.host,
                                         port=args.port, clients_dir=args.clients, attach=args.attach, resume=args.resume,
                                         clientapp=args.client_app))
            print(f"final adapter: {final}")
    except FedPeftError as exc:
        print(f"peft-server: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
