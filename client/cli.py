"""`peft-client`: an edge client's command line.

    peft-client keygen --out keys/                 # node auth key (give keys/node_key.pub to the
                                                   # operator) + identity for sealed envelopes
                                                   # (give keys/identity/public.json too)
    peft-client start --superlink coordinator:9092 --root-cert ca.crt --keys keys/ \\
                      --data my-data.jsonl [--model smollm2-135m-instruct] [--quantize auto]
    peft-client generate --server coordinator:9300 --root-cert ca.crt --adapter support \
                         [--version 3] [--token TOKEN] "My printer is offline"

Only PEFT deltas and training metrics leave the machine; `start` prints what it sends
each round. TLS is on by default: `start` needs `--root-cert` or an explicit
`--insecure` (which logs a warning).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fedpeft.common.errors import FedPeftError
from fedpeft.common.logs import apply_offline_env, setup_logging
from fedpeft.common.model.base_model import DEFAULT_MODEL


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peft-client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    keygen = sub.add_parser("keygen", help="make this node's keys: SuperNode auth (EC, OpenSSH) + envelope identity")
    keygen.add_argument("--out", type=Path, required=True)
    keygen.add_argument("--overwrite", action="store_true")
    start = sub.add_parser("start", help="start the local trainer and a Flower SuperNode")
    start.add_argument("--superlink", required=True, help="SuperLink address host:port")
    security = start.add_mutually_exclusive_group(required=True)
    security.add_argument("--root-cert", type=Path, help="CA certificate that signed the SuperLink's certificate")
    security.add_argument("--insecure", action="store_true", help="no TLS (loopback/lab only; logs a warning)")
    start.add_argument("--keys", type=Path, help="dir from `peft-client keygen` (node auth + envelope identity)")
    start.add_argument("--data", required=True, help="local data file (jsonl/json/csv/tsv) or builtin:K/N")
    start.add_argument("--model", default=DEFAULT_MODEL, help="built-in model name, .gguf file or HF dir")
    start.add_argument("--quantize", default="auto", help="4bit | none | auto (4bit where bitsandbytes works)")
    start.add_argument("--workdir", type=Path, default=Path("peft-client-work"), help="private working dir")
    start.add_argument("--port", type=int, default=9094, help="this node's local ClientAppIo port (one per node per host)")
    start.add_argument("--partition-id", type=int,
                       help="this client's partition K: its seed offset for local training and its turn in per-client "
                            "LoRA rank cycles (default: K of builtin:K/N; with a data file, seed offset 0 and no declared turn)")
    start.add_argument("--threads", type=int, default=0, help="torch threads (0 = half the cores)")
    start.add_argument("--seed", type=int, default=0, help="seed of the built-in task's split (builtin:K/N only)")
    start.add_argument("--server-key", type=Path,
                       help="the server's public.json (peft-server keys): seal every delta to this key only and "
                            "refuse to send plaintext deltas")
    start.add_argument("--split-server", metavar="HOST:PORT",
                       help="the coordinator's split server (runs with the split topology: this client then loads "
                            "and trains only the first blocks)")
    start.add_argument("--split-ca", type=Path, help="CA certificate of the split server (default: --root-cert)")
    start.add_argument("--once", action="store_true",
                       help="exit when the SuperNode exits (default: reconnect, e.g. across a server restart)")
    gen = sub.add_parser("generate", help="ask `peft-server serve` for text with one adapter (streams to stdout)")
    gen.add_argument("--server", required=True, help="serving address host:port")
    gen_security = gen.add_mutually_exclusive_group(required=True)
    gen_security.add_argument("--root-cert", type=Path, help="CA certificate of the serving endpoint")
    gen_security.add_argument("--insecure", action="store_true", help="no TLS (loopback/lab only)")
    gen.add_argument("--adapter", default="", help="adapter id (empty: the base model)")
    gen.add_argument("--version", type=int, default=0, help="adapter version (0 = latest)")
    gen.add_argument("--token", default=os.environ.get("FEDPEFT_SERVING_TOKEN"),
                     help="tenant token (peft-server token); default $FEDPEFT_SERVING_TOKEN, which keeps it off the "
                          "process list")
    gen.add_argument("--max-new-tokens", type=int, default=0)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("prompt")
    return p


def _generate(args: argparse.Namespace) -> int:
    from fedpeft.client.serving_client import open_stub, stream_text
    from fedpeft.common.protocol.serving_api import GenerateParams, Sampling

    params = GenerateParams(args.adapter, args.version, args.prompt, args.max_new_tokens,
                            Sampling(args.temperature, args.top_p, args.top_k, args.seed))
    for piece in stream_text(open_stub(args.server, None if args.insecure else args.root_cert), params, args.token):
        print(piece, end="", flush=True)
    print()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    apply_offline_env()
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        if args.command == "keygen":
            from fedpeft.common.security.envelope import PeerIdentity
            from fedpeft.common.security.pki import make_node_key

            _, public = make_node_key(args.out, overwrite=args.overwrite)
            identity = PeerIdentity.generate()
            identity.save(args.out / "identity", overwrite=args.overwrite)
            print(f"node key: {public} (register it: give it to the operator's --clients dir)\n"
                  f"identity {identity.public_keys.key_id}: {args.out / 'identity' / PeerIdentity.PUBLIC_FILE} "
                  "(the operator's envelopes.trusted_clients dir)")
            return 0
        if args.command == "generate":
            return _generate(args)
        from fedpeft.client.launcher import ClientOptions, run_client

        return run_client(ClientOptions(
            superlink=args.superlink, data=args.data, model=args.model, key_dir=args.keys,
            root_cert=None if args.insecure else args.root_cert, workdir=args.workdir, quantize=args.quantize,
            partition_id=args.partition_id, clientappio_port=args.port, torch_threads=args.threads, seed=args.seed,
            once=args.once, server_key=args.server_key, split_server=args.split_server, split_ca=args.split_ca))
    except FedPeftError as exc:
        print(f"peft-client: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
