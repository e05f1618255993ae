"""`peft-server`: the cloud coordinator's command line.

    peft-server certs --out tls/ [--host coordinator.example.org]   # dev CA + server certificate
    peft-server keys --out server-id/                               # identity for sealed envelopes
    peft-server run --config run.toml --run-dir runs/r1 --tls tls/ --clients keys/
    peft-server run --config run.toml --run-dir runs/r1 --tls tls/ --clients keys/ --resume
    peft-server serve --registry registry/ --tls tls/ [--keys server-id/] [--tokens tokens.json]
    peft-server publish --registry registry/ --adapter-id support --from runs/r1/final
    peft-server rollback --registry registry/ --adapter-id support --version 2
    peft-server token --file tokens.json --tenant acme --adapters support,triage
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
    off.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                     help="how the emulator's weights are stored (%(default)s; bfloat16 halves the download but "
                          "clients then hold a converted copy of the embedding; blocks are 4-bit on clients either way)")
    off.add_argument("--overwrite", action="store_true")
    run = sub.add_parser("run", help="start a SuperLink (or attach to one) and run a federation from a TOML config")
    run.add_argument("--config", type=Path, required=True, help="TOML run config (see fedpeft.server.federation.spec)")
    run.add_argument("--run-dir", type=Path, required=True, help="where checkpoints, metrics and final/ go")
    security = run.add_mutually_exclusive_group(required=True)
    security.add_argument("--tls", type=Path, help="dir with ca.crt, server.pem, server.key (peft-server certs)")
    security.add_argument("--insecure", action="store_true", help="no TLS (loopback/lab only; logs a warning)")
    run.add_argument("--clients", type=Path, help="dir of client node public keys (*.pub) to register; enables node auth")
    run.add_argument("--host", default="127.0.0.1", help="SuperLink bind address (default loopback only)")
    run.add_argument("--port", type=int, default=9092, help="SuperLink port (Fleet, Control and ServerAppIo APIs)")
    run.add_argument("--attach", help="use the SuperLink at this address instead of starting one")
    run.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last completed round")
    run.add_argument("--client-app", help="override the ClientApp component (peft-bench-deploy: "
                     "fedpeft.simulations.harness.inprocess_client_app:app, which loads the model per message)")
    serve = sub.add_parser("serve", help="serve the registry's adapters over one base model (gRPC AdapterServing)")
    serve.add_argument("--registry", type=Path, required=True, help="adapter registry dir (training publishes into it)")
    serve.add_argument("--model", help="base model: built-in name, .gguf file or HF dir (default: the built-in SmolLM2)")
    serve.add_argument("--quantize", default="none", help="none | 4bit | auto (NF4 base via bitsandbytes)")
    serve.add_argument("--keys", type=Path, help="registry identity dir (peft-server keys): versions sealed at rest")
    serve_security = serve.add_mutually_exclusive_group(required=True)
    serve_security.add_argument("--tls", type=Path, help="dir with ca.crt, server.pem, server.key (peft-server certs)")
    serve_security.add_argument("--insecure", action="store_true", help="no TLS (loopback/lab only; logs a warning)")
    serve.add_argument("--tokens", type=Path, help="tenant tokens file (peft-server token); enables per-tenant auth")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=9300)
    serve.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    serve.add_argument("--max-queue", type=int, default=256, help="queued requests before RESOURCE_EXHAUSTED")
    serve.add_argument("--max-prompt-tokens", type=int, default=1024)
    serve.add_argument("--max-new-tokens", type=int, default=512, help="largest max_new_tokens a request may ask")
    serve.add_argument("--adapter-memory-mb", type=float, default=1024.0, help="cap on loaded adapters (LRU eviction)")
    serve.add_argument("--max-request-kb", type=int, default=1024, help="larger requests get RESOURCE_EXHAUSTED")
    serve.add_argument("--poll-seconds", type=float, default=1.0, help="how often new registry versions are noticed")
    publish = sub.add_parser("publish", help="add a PEFT adapter dir to the registry as the next (current) version")
    publish.add_argument("--registry", type=Path, required=True)
    publish.add_argument("--adapter-id", required=True)
    publish.add_argument("--from", dest="source", type=Path, required=True, help="PEFT adapter dir, e.g. RUN/final")
    publish.add_argument("--keys", type=Path, help="registry identity dir: seal the version at rest")
    rollback = sub.add_parser("rollback", help="point an adapter's 'latest' at an earlier version")
    rollback.add_argument("--registry", type=Path, required=True)
    rollback.add_argument("--adapter-id", required=True)
    rollback.add_argument("--version", type=int, required=True)
    token = sub.add_parser("token", help="create a tenant token (printed once; the file keeps its SHA-256)")
    token.add_argument("--file", type=Path, required=True)
    token.add_argument("--tenant", required=True)
    token.add_argument("--adapters", required=True, help="comma-separated adapter ids the tenant may use, or '*'")
    token.add_argument("--admin", action="store_true", help="operator token: may also LoadAdapter/UnloadAdapter/Rollback")
    return p


def _serve(args: argparse.Namespace) -> None:
    from fedpeft.common.protocol.serving_api import EngineLimits
    from fedpeft.server.serving.launch import ServeOptions, serve

    limits = EngineLimits(max_batch=args.max_batch, max_queue=args.max_queue, max_prompt_tokens=args.max_prompt_tokens,
                          max_new_tokens=args.max_new_tokens,
                          adapter_memory_bytes=int(args.adapter_memory_mb * 1024 * 1024))
    if limits.max_batch < 1 or limits.max_queue < 1 or limits.max_prompt_tokens < 1 or limits.max_new_tokens < 1:
        raise ConfigError("--max-batch, --max-queue, --max-prompt-tokens and --max-new-tokens must be >= 1")
    serve(ServeOptions(model=args.model, registry_dir=args.registry, quantize=args.quantize, keys_dir=args.keys,
                       host=args.host, port=args.port, tls_dir=args.tls, tokens_file=args.tokens, limits=limits,
                       max_request_bytes=args.max_request_kb * 1024, poll_seconds=args.poll_seconds))


def _registry_command(args: argparse.Namespace) -> None:
    from fedpeft.server.serving.launch import open_registry

    if args.command == "publish":
        version = open_registry(args.registry, args.keys).publish(args.adapter_id, args.source,
                                                                   {"source": str(args.source)})
        print(f"published {args.adapter_id} version {version} (now current)")
    else:
        version = open_registry(args.registry, None).rollback(args.adapter_id, args.version)
        print(f"{args.adapter_id}: latest is now version {version}")


def main(argv: Sequence[str] | None = None) -> int:
    apply_offline_env()
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        if args.command == "certs":
            from fedpeft.common.security.pki import make_dev_certificates

            files = make_dev_certificates(args.out, args.host, args.days, args.overwrite)
            print(f"CA: {files.ca_cert} (give this to clients)\nserver: {files.server_cert}, {files.server_key}")
        elif args.command == "keys":
            from fedpeft.common.security.envelope import PeerIdentity

            identity = PeerIdentity.generate()
            identity.save(args.out, overwrite=args.overwrite)
            print(f"server identity {identity.public_keys.key_id} in {args.out}: give "
                  f"{args.out / PeerIdentity.PUBLIC_FILE} to clients (peft-client start --server-key) so they seal "
                  "deltas to this key only")
        elif args.command == "serve":
            _serve(args)
        elif args.command in ("publish", "rollback"):
            _registry_command(args)
        elif args.command == "token":
            from fedpeft.server.serving.service import TenantTokens

            adapters = [a.strip() for a in args.adapters.split(",") if a.strip()]
            token = TenantTokens.add(args.file, args.tenant, adapters, admin=args.admin)
            print(f"token for tenant {args.tenant} (shown once; send as 'authorization: Bearer <token>'):\n{token}")
        elif args.command == "offsite-build":
            from fedpeft.common.offsite.run import OffsiteSettings, build_for_clients

            settings = OffsiteSettings(bottom=args.bottom, top=args.top, keep_every=args.keep_every,
                                       distill_steps=args.distill_steps, distill_data=args.distill_data,
                                       distill_lr=args.distill_lr, dtype=args.dtype)
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
