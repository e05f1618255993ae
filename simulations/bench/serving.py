"""`peft-bench-serve`: serving K LoRA adapters over one base model, three ways, one run.

For each K, N requests (prompts from --prompts or the built-in task, each asking for
--new-tokens tokens past EOS, so every way does the same work) name one of K adapters
drawn at random (seeded). All requests arrive at once; throughput = generated tokens /
wall time, latency = completion - arrival per request.

Ways (same model code, KV-cache bookkeeping and greedy decoding; only scheduling and
adapter handling differ):
- `mixed` (ours): `ServingEngine`, continuous batching of up to --max-batch requests
  whatever their adapters, per-row batched LoRA;
- `swap`: one request at a time in arrival order, the adapter's weights swapped into the
  single LoRA slot when it differs from the previous request's (what a one-adapter
  server does; the issue's "swap per request" baseline);
- `grouped`: a stronger single-adapter baseline: take the oldest request's adapter, batch
  every queued request for that adapter (up to --max-batch, static batch), swap, run, repeat;
- `merged`: one adapter merged into the base weights, served by the same engine with no
  LoRA at all: the upper bound (K = 1), measured once.

The engine is driven in-process (no gRPC): the RPC layer costs the same for all three.
Adapters are random LoRA r=8 on every linear layer (peft's defaults in fedpeft); their
values do not change the cost. Results: a Markdown table on stdout, results.csv,
results.md and throughput.png in --out.

    peft-bench-serve --adapters 1,4,16,64 --requests 64 --out runs/bench-serve
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

WAYS = ("mixed", "swap", "grouped", "merged")


@dataclass
class ServeRow:
    adapters: int
    way: str
    requests: int
    tokens: int
    seconds: float
    tokens_per_second: float
    p50_latency_s: float
    p95_latency_s: float
    x_merged: float = float("nan")
    x_swap: float = float("nan")
    x_grouped: float = float("nan")


def load_prompts(path: Path | None, count: int, seed: int) -> list[str]:
    """Prompts from an Alpaca-style JSON/JSONL file (instruction + input), else built-in tickets."""
    if path is None:
        from fedpeft.common.data.builtin_task import generate_tickets

        texts = [r["text"] for r in generate_tickets(count, seed)]
    else:
        raw = Path(path).read_text()
        rows = json.loads(raw) if raw.lstrip().startswith("[") else [json.loads(line) for line in raw.splitlines() if line]
        texts = [" ".join(str(r.get(k, "")) for k in ("instruction", "input", "context") if r.get(k)) for r in rows]
    rng = random.Random(seed)
    return [rng.choice(texts) for _ in range(count)]


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def make_adapters(model_dir: Path, count: int, out: Path, seed: int) -> list[Path]:
    """`count` random LoRA adapters (fedpeft's default LoRA config) as stock PEFT dirs."""
    import torch
    from peft import LoraConfig, get_peft_model

    from fedpeft.common.methods import make_config
    from fedpeft.common.model.base_model import load_base_model

    defaults = make_config("lora", {})
    model = get_peft_model(load_base_model(model_dir, "none"),
                           LoraConfig(r=defaults.r, lora_alpha=defaults.alpha, target_modules="all-linear"))
    dirs = []
    for i in range(count):
        torch.manual_seed(seed + i)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data.normal_(0, 0.02)
        dirs.append(out / f"adapter-{i:03d}")
        model.save_pretrained(dirs[-1])
    return dirs


def _row(adapters: int, way: str, latencies: list[float], tokens: int, seconds: float) -> ServeRow:
    return ServeRow(adapters, way, len(latencies), tokens, seconds, tokens / seconds,
                    statistics.median(latencies), percentile(latencies, 0.95))


def _median_row(repeats: int, measure) -> ServeRow:
    """The run with the median throughput out of `repeats` (one run when repeats is 1)."""
    runs = sorted((measure() for _ in range(max(1, repeats))), key=lambda r: r.tokens_per_second)
    return runs[len(runs) // 2]


def run_engine(model_dir: Path, registry, prompts: list[str], adapter_ids: list[str], new_tokens: int, max_batch: int,
               merge_from: Path | None = None) -> tuple[list[float], int, float]:
    """Continuous batching over `registry` (or over a merged model when `merge_from` is set)."""
    from safetensors.torch import load_file

    from fedpeft.common.model.base_model import load_base_model, load_tokenizer
    from fedpeft.common.protocol.serving_api import EngineLimits, GenerateParams
    from fedpeft.server.serving.batched_lora import merge_lora_into
    from fedpeft.server.serving.engine import ServingEngine

    model = load_base_model(model_dir, "none")
    if merge_from is not None:
        merge_lora_into(model, json.loads((merge_from / "adapter_config.json").read_text()),
                        load_file(str(merge_from / "adapter_model.safetensors")))
        adapter_ids = [""] * len(adapter_ids)
    limits = EngineLimits(max_batch=max_batch, max_queue=len(prompts) + 1, max_new_tokens=new_tokens,
                          max_prompt_tokens=4096, adapter_memory_bytes=1 << 40)
    with ServingEngine(model, load_tokenizer(model_dir), registry, limits, poll_seconds=3600) as engine:
        for adapter_id in sorted(set(adapter_ids) - {""}):
            engine.load(adapter_id, 0)  # adapters in memory before the clock starts, as in the swap baseline
        engine.generate(GenerateParams(adapter_ids[0], 0, prompts[0], 2, ignore_eos=True), timeout=600)  # warm-up
        start = time.perf_counter()
        jobs = [engine.submit(GenerateParams(a, 0, p, new_tokens, ignore_eos=True)) for a, p in zip(adapter_ids, prompts,
                                                                                                    strict=True)]
        tokens = sum(len(e.token_ids) for job in jobs for e in job.stream(timeout=3600))
        seconds = time.perf_counter() - start
        latencies = [job.finished_at - start for job in jobs]  # type: ignore[operator]
    return latencies, tokens, seconds


def run_swap(model_dir: Path, registry, prompts: list[str], adapter_ids: list[str], new_tokens: int,
             max_batch: int = 1) -> tuple[list[float], int, float]:
    """Single-slot serving: the oldest request's adapter is swapped in and its request runs
    alone (max_batch 1: `swap`) or with every queued request for the same adapter (`grouped`)."""
    import torch

    from fedpeft.common.model.base_model import load_base_model, load_tokenizer
    from fedpeft.server.serving.batched_lora import BatchedLoraModel
    from fedpeft.server.serving.kv_batch import decode_step, prefill

    model = load_base_model(model_dir, "none").eval()
    tokenizer = load_tokenizer(model_dir)
    lora = BatchedLoraModel(model)
    stored = {a: registry.read(a) for a in set(adapter_ids)}  # host memory, as the engine's loaded adapters
    pad = int(tokenizer.pad_token_id)
    encoded = [tokenizer(p)["input_ids"] for p in prompts]

    def run(group: list[int]) -> None:
        with lora.rows((0,) * len(group)):
            state, logits = prefill(model, [encoded[i] for i in group], pad)
            token = torch.argmax(logits, -1)
            for _ in range(new_tokens - 1):
                token = torch.argmax(decode_step(model, state, token), -1)

    lora.add(0, stored[adapter_ids[0]].config, stored[adapter_ids[0]].tensors)
    run([0])  # warm-up, as the engine ways get
    active = adapter_ids[0]
    queue = list(range(len(prompts)))
    latencies: list[float] = [0.0] * len(prompts)
    start = time.perf_counter()
    while queue:
        adapter_id = adapter_ids[queue[0]]
        group = [i for i in queue if adapter_ids[i] == adapter_id][:max_batch]
        queue = [i for i in queue if i not in group]
        if adapter_id != active:
            lora.remove(0)
            lora.add(0, stored[adapter_id].config, stored[adapter_id].tensors)
            active = adapter_id
        run(group)
        if next(model.parameters()).is_cuda:
            torch.cuda.synchronize()
        for i in group:
            latencies[i] = time.perf_counter() - start
    return latencies, new_tokens * len(prompts), time.perf_counter() - start


def write_results(rows: Sequence[ServeRow], out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    merged = next((r for r in rows if r.way == "merged"), None)
    for r in rows:
        swap = next((s for s in rows if s.way == "swap" and s.adapters == r.adapters), None)
        r.x_merged = r.tokens_per_second / merged.tokens_per_second if merged else float("nan")
        r.x_swap = r.tokens_per_second / swap.tokens_per_second if swap else float("nan")
    with open(out_dir / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[f.name for f in fields(ServeRow)])
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    for r in rows:
        grouped = next((g for g in rows if g.way == "grouped" and g.adapters == r.adapters), None)
        r.x_grouped = r.tokens_per_second / grouped.tokens_per_second if grouped else float("nan")
    lines = ["| K adapters | way | requests | tokens/s | p50 latency s | p95 latency s | x merged | x swap | x grouped |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.adapters} | {r.way} | {r.requests} | {r.tokens_per_second:.1f} | {r.p50_latency_s:.2f} | "
                     f"{r.p95_latency_s:.2f} | {r.x_merged:.2f} | {r.x_swap:.2f} | {r.x_grouped:.2f} |")
    table = "\n".join(lines)
    (out_dir / "results.md").write_text(table + "\n")
    _plot(rows, out_dir / "throughput.png")
    return table


def _plot(rows: Sequence[ServeRow], path: Path) -> None:
    from fedpeft.simulations.report import line_plot

    merged = next((r for r in rows if r.way == "merged"), None)
    line_plot({way: [(r.adapters, r.tokens_per_second) for r in rows if r.way == way]
               for way in ("mixed", "grouped", "swap")}, path, "distinct adapters K", "generated tokens / s",
              "multi-adapter serving throughput",
              reference=("merged (1 adapter)", merged.tokens_per_second) if merged else None, log2_x=True)


def main(argv: Sequence[str] | None = None) -> int:
    from fedpeft.common.errors import FedPeftError
    from fedpeft.common.logs import apply_offline_env, setup_logging

    apply_offline_env()
    setup_logging()
    p = argparse.ArgumentParser(prog="peft-bench-serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="built-in name, .gguf or HF dir (default: the built-in SmolLM2-135M)")
    p.add_argument("--adapters", default="1,4,16,64", help="comma-separated K values")
    p.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated, from {WAYS}")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--prompts", type=Path, help="Alpaca-style JSON/JSONL (instruction/input); default: built-in task")
    p.add_argument("--repeats", type=int, default=1,
                   help="run each way this many times and report the run with the median throughput (noisy hosts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/bench-serve"))
    args = p.parse_args(argv)
    ways = [w for w in args.ways.split(",") if w]
    if set(ways) - set(WAYS):
        p.error(f"unknown way(s) {sorted(set(ways) - set(WAYS))}; choose from {WAYS}")
    ks = [int(k) for k in args.adapters.split(",")]
    if min(ks) < 1 or args.requests < 1 or args.new_tokens < 1 or args.max_batch < 1:
        p.error("--adapters, --requests, --new-tokens and --max-batch must be >= 1")
    try:
        from fedpeft.common.model.base_model import resolve_model_dir
        from fedpeft.server.serving.registry import AdapterRegistry

        model_dir = resolve_model_dir(args.model)
        prompts = load_prompts(args.prompts, args.requests, args.seed)
        rows: list[ServeRow] = []
        with tempfile.TemporaryDirectory(prefix="fedpeft-bench-serve-") as tmp:
            registry = AdapterRegistry(Path(tmp) / "registry")
            print(f"[bench] making {max(ks)} random LoRA adapters ...", flush=True)
            dirs = make_adapters(model_dir, max(ks), Path(tmp), args.seed)
            for i, d in enumerate(dirs):
                registry.publish(f"tenant-{i:03d}", d)
            if "merged" in ways:
                rows.append(_median_row(args.repeats, lambda: _row(1, "merged", *run_engine(
                    model_dir, registry, prompts, ["tenant-000"] * len(prompts), args.new_tokens, args.max_batch,
                    merge_from=dirs[0]))))
                print(f"[bench] merged: {rows[-1].tokens_per_second:.1f} tokens/s", flush=True)
            for k in ks:
                rng = random.Random(args.seed + k)
                ids = [f"tenant-{rng.randrange(k):03d}" for _ in prompts]
                for way in [w for w in ways if w != "merged"]:
                    if way == "mixed":
                        def measure(k=k, ids=ids):
                            return _row(k, "mixed", *run_engine(model_dir, registry, prompts, ids, args.new_tokens,
                                                                args.max_batch))
                    else:
                        def measure(k=k, ids=ids, way=way):
                            return _row(k, way, *run_swap(model_dir, registry, prompts, ids, args.new_tokens,
                                                          args.max_batch if way == "grouped" else 1))
                    rows.append(_median_row(args.repeats, measure))
                    print(f"[bench] K={k} {way}: {rows[-1].tokens_per_second:.1f} tokens/s, "
                          f"p95 {rows[-1].p95_latency_s:.1f} s", flush=True)
                    write_results(rows, args.out)
        print(write_results(rows, args.out))
    except FedPeftError as exc:
        print(f"peft-bench-serve: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
