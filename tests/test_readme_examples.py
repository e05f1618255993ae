"""The README's shell examples are contracts: each test reads a ```bash block out of README.md
(found by its section heading, never a copy) and runs it as written, in real processes, in a
temp dir: `peft-server`, `peft-client` and `.venv/bin/...` resolve to this venv's entry points.

Only these substitutions are made, and each one is asserted to apply, so a README edit that
moves them fails here instead of silently testing something else:

- the model: the built-in SmolLM2 is too slow for CI, so the tiny random Llama
  (`tiny_model_dir`) is named instead (`model = ...` in the run config's [federation]
  table, `--model DIR` on the commands that load a model);
- ports: every port number the example uses (9092, 9101..., 9300) is replaced, consistently,
  by a free one, so parallel CI jobs do not collide (`--port` is passed where the example
  relies on the default);
- the serving example only: peft-sim runs 1 round of 2 steps on 2 clients, the token
  printed by `peft-server token` replaces the `TOKEN` placeholder, the optional
  `[--keys server-id/]` is dropped, and `peft-server serve` (which runs until stopped) is
  started in the background, waited for on its port, asked by `peft-client generate`,
  then stopped with SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from fedpeft.simulations.harness.loopback import free_port
from fedpeft.simulations.ray_runtime import reap

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parents[1] / "README.md"
DEPLOY_HEADING = "### One machine:"
SERVING_HEADING = "## Serving: one base model, many federated adapters"


def readme_bash_block(heading: str) -> str:
    """The first ```bash block of the README section whose heading line starts with `heading`."""
    lines = README.read_text(encoding="utf-8").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(heading)]
    assert len(starts) == 1, f"README.md: {len(starts)} headings start with {heading!r}"
    level = lines[starts[0]].split(" ", 1)[0]
    block: list[str] | None = None
    for line in lines[starts[0] + 1:]:
        if block is None:
            assert not (line.startswith("#") and line.split(" ", 1)[0] in {level, level[:-1]}), \
                f"README.md: no ```bash block under {heading!r}"
            if line.strip() == "```bash":
                block = []
        elif line.strip() == "```":
            return "\n".join(block) + "\n"
        else:
            block.append(line)
    raise AssertionError(f"README.md: unterminated ```bash block under {heading!r}")


def substitute(text: str, pattern: str, repl, *, count: int | None = None, flags: int = 0) -> str:
    """re.sub that insists the README still contains what it replaces (`count` times, if given)."""
    new, n = re.subn(pattern, repl, text, flags=flags)
    assert n and (count is None or n == count), f"README example changed: {pattern!r} matched {n} times"
    return new


def distinct_free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def example_env(tmp_path: Path) -> dict[str, str]:
    """This venv's entry points first on PATH; a `.venv` link so `.venv/bin/...` resolves too."""
    (tmp_path / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]), "PYTHONUNBUFFERED": "1"}


class Processes:
    """Every process the example starts: each in its own process group, its descendants
    tracked while it runs (background jobs outlive their shell), all stopped at the end."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd, self.env = cwd, env
        self.started: list[subprocess.Popen[bytes]] = []
        self.seen: set[psutil.Process] = set()
        self.markers: list[str] = []  # command-line text of detached helpers (Flower's, by port)

    def start(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.started.append(proc)
        return proc

    def track(self) -> None:
        for proc in self.started:
            try:
                self.seen.update(psutil.Process(proc.pid).children(recursive=True))
            except psutil.Error:
                continue

    def wait(self, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> int:
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            self.track()
            if time.monotonic() > deadline:
                pytest.fail(f"{proc.args} still running after {timeout:.0f} s; output tail:\n{tail(log)}")
            time.sleep(0.5)
        return proc.returncode

    def stop_all(self) -> None:
        self.track()
        for proc in self.started:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=20)
                    break
                except subprocess.TimeoutExpired:
                    continue
        leftovers = {p for p in self.seen if p.is_running()}
        for p in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(p.info["cmdline"] or ())
            if p.pid != os.getpid() and any(m in cmdline for m in self.markers):
                leftovers.add(p)
        reap(leftovers)


def tail(log: Path, chars: int = 6000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else ""


@pytest.fixture()
def processes(tmp_path: Path):
    procs = Processes(tmp_path, example_env(tmp_path))
    yield procs
    procs.stop_all()


def wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{proc.args} exited ({proc.returncode}) before listening:\n{tail(log)}"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.25)
    pytest.fail(f"nothing listens on {port} after {timeout:.0f} s:\n{tail(log)}")


def test_one_machine_deployment_example_runs_as_written(processes, tiny_model_dir, tmp_path):
    """README "One machine": certs, keys, a SecAgg+ run config, `peft-server run` and its clients
    in the background, `wait %1`; the server prints the final adapter dir it wrote."""
    script = readme_bash_block(DEPLOY_HEADING)
    # The model: one line in the run config's [federation] table, and every client loads it too
    script = substitute(script, r"^\[federation\]\n", f'[federation]\nmodel = "{tiny_model_dir}"\n',
                        count=1, flags=re.M)
    script = substitute(script, r"\bpeft-client start ", f"peft-client start --model {tiny_model_dir} ")
    # Ports: the SuperLink's (the server's default 9092) and each client's own, all free ones
    client_ports = sorted(set(re.findall(r"--port (\d+)", script)))
    superlink, *ports = distinct_free_ports(1 + len(client_ports))
    for old, new in zip(client_ports, ports, strict=True):
        script = substitute(script, rf"--port {old}\b", f"--port {new}")
    script = substitute(script, r"127\.0\.0\.1:9092\b", f"127.0.0.1:{superlink}")
    script = substitute(script, r"\bpeft-server run ", f"peft-server run --port {superlink} ", count=1)
    processes.markers.append(f"127.0.0.1:{superlink}")
    (tmp_path / "readme-example.sh").write_text(script, encoding="utf-8")

    log = tmp_path / "readme-example.log"
    shell = processes.start(["bash", "-euo", "pipefail", "readme-example.sh"], log)
    assert processes.wait(shell, timeout=540, log=log) == 0, tail(log)

    promise = re.search(r'peft-server prints "(final adapter: [^"]+)"', script)
    assert promise, "README example no longer says what peft-server prints"
    assert promise.group(1) == "final adapter: $PWD/runs/r1/final"
    printed = promise.group(1).replace("$PWD", str(tmp_path.resolve()))
    assert printed in log.read_text(errors="replace").splitlines(), tail(log)
    assert (tmp_path / "runs" / "r1" / "final" / "adapter_model.safetensors").is_file()
    # What the example is there to show: every client's delta went through SecAgg+, every round
    rows = [json.loads(line) for line in (tmp_path / "runs" / "r1" / "metrics.jsonl").read_text().splitlines()]
    clients = len(re.findall(r"^peft-client start ", script, re.M))
    rounds = int(re.search(r"^rounds = (\d+)", script, re.M).group(1))
    assert [r["round"] for r in rows] == list(range(rounds + 1))
    assert all(r["clients_accepted"] == clients and 0 < r["secagg_error_bound"] < 1e-3 for r in rows[1:]), rows
    _secagg_equals_the_simulation_of_the_same_spec(tmp_path, rows, clients)


def _secagg_equals_the_simulation_of_the_same_spec(root: Path, rows: list[dict], clients: int) -> None:
    """The example's run.toml simulated (SecAgg+ is a deployment setting, so the simulation runs
    exact FedAvg): SecAgg+'s unmasked sum equals it within the quantization bound each round
    records. Round 2 is compared from SecAgg+'s own round-1 global (the simulation resumed
    from that checkpoint), so both sides train from the same start."""
    import shutil

    import torch

    from fedpeft.common.protocol.deltas import load_delta_file
    from fedpeft.server.federation.spec import RunSpec
    from fedpeft.simulations.runner import run_simulation

    def checkpoint(run_dir: Path, rnd: int) -> dict[str, torch.Tensor]:
        return load_delta_file(run_dir / "checkpoints" / f"global-round-{rnd:04d}.safetensors")

    def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        assert a.keys() == b.keys()
        return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)

    deployed, bounds = root / "runs" / "r1", [r["secagg_error_bound"] for r in rows[1:]]
    spec = RunSpec.from_toml(root / "run.toml").with_overrides({"secagg.enabled": False})
    simulated = run_simulation(spec, root / "sim").out_dir
    assert max_diff(checkpoint(deployed, 1), checkpoint(simulated, 1)) <= bounds[0]
    resumed = root / "sim-from-secagg"
    shutil.copytree(simulated, resumed, ignore=shutil.ignore_patterns("final", "global-round-0002.safetensors"))
    shutil.copy(deployed / "checkpoints" / "global-round-0001.safetensors", resumed / "checkpoints")
    lines = (simulated / "metrics.jsonl").read_text().splitlines()[:2]
    (resumed / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    run_simulation(None, resume=str(resumed))
    assert max_diff(checkpoint(deployed, 2), checkpoint(resumed, 2)) <= bounds[1]
    # Deltas are the only thing sent: bytes up per client per round is the adapter's size
    # (plus the .npy headers of its tensors).
    raw = sum(t.numel() * t.element_size() for t in checkpoint(deployed, 1).values())
    assert clients * raw <= rows[1]["bytes_up"] <= clients * (raw + 256 * len(checkpoint(deployed, 1)))


def commands(block: str) -> list[str]:
    """The block's commands, one per entry: comments dropped, `\\` continuations joined."""
    joined = re.sub(r"\\\n\s*", "", block)
    return [line.split(" #", 1)[0].strip() for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_serving_example_runs_as_written(processes, tiny_model_dir, tmp_path):
    """README "Serving": peft-sim publishes into a registry, `certs`, `token`, `serve` with TLS and
    tokens, then `peft-client generate` streams an answer from the published adapter."""
    sim, certs, token, serve, generate = commands(readme_bash_block(SERVING_HEADING))
    port = free_port()
    model = f" --model {tiny_model_dir}"
    assert sim.startswith(".venv/bin/peft-sim ") and "--publish-to registry/" in sim
    sim += model + " --rounds 1 --local-steps 2 --clients 2"
    assert certs.startswith(".venv/bin/peft-server certs ") and token.startswith(".venv/bin/peft-server token ")
    assert serve.startswith(".venv/bin/peft-server serve ")
    serve = substitute(serve, r" \[--keys [^\]]+\]", "", count=1) + model + f" --port {port}"
    generate = substitute(generate, r"localhost:9300\b", f"localhost:{port}", count=1)

    def run(command: str, name: str, timeout: float = 120) -> str:
        log = tmp_path / f"{name}.log"
        proc = processes.start(["bash", "-euo", "pipefail", "-c", command], log)
        assert processes.wait(proc, timeout=timeout, log=log) == 0, f"$ {command}\n{tail(log)}"
        return log.read_text(errors="replace")

    run(sim, "peft-sim", timeout=300)
    assert (tmp_path / "registry" / "support" / "CURRENT").is_file()
    run(certs, "certs")
    printed = re.findall(r"^(fpt_\S+)$", run(token, "token"), re.M)
    assert len(printed) == 1, "peft-server token printed no token"
    generate = substitute(generate, r"\bTOKEN\b", printed[0], count=1)

    serve_log = tmp_path / "serve.log"
    server = processes.start(["bash", "-euo", "pipefail", "-c", f"exec {serve}"], serve_log)
    wait_for_port(port, server, serve_log)
    answer = run(generate, "generate")
    assert answer.strip(), "peft-client generate printed nothing"
    os.killpg(server.pid, signal.SIGTERM)
    assert server.wait(timeout=60) == 0, tail(serve_log)
    assert "serving" in serve_log.read_text() and "loaded adapter support version 1" in serve_log.read_text()


def test_compression_example_runs_as_written(processes, tiny_model_dir, tmp_path):
    """README "Compressed deltas": a compressed peft-sim run (1 round of 2 steps on 2 clients of the tiny
    model) and `peft-bench-codecs --sizes` (the tiny model's delta)."""
    sim, sizes = commands(readme_bash_block("### Compressed deltas"))
    assert sim.startswith(".venv/bin/peft-sim ") and "--upload-codec topk:0.1+int8 --download-codec bf16" in sim
    sim += f" --model {tiny_model_dir} --rounds 1 --local-steps 2 --clients 2"
    sizes = substitute(sizes, r"--model smollm2-135m-instruct\b", f"--model {tiny_model_dir}", count=1)

    def run(command: str, name: str, timeout: float = 300) -> str:
        log = tmp_path / f"{name}.log"
        proc = processes.start(["bash", "-euo", "pipefail", "-c", command], log)
        assert processes.wait(proc, timeout=timeout, log=log) == 0, f"$ {command}\n{tail(log)}"
        return log.read_text(errors="replace")

    run(sim, "peft-sim")
    last = [json.loads(line) for line in (tmp_path / "runs" / "compressed" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["compression_up"] > 4 and last["compression_down"] > 1.5
    table = run(sizes, "sizes")
    assert "| topk:0.1+int8 |" in table and "| fp32 (none) |" in table


def test_scale_benchmark_example_runs_as_written(processes, tmp_path):
    """README "Aggregation at scale": all three `peft-bench-scale` commands, with 2 and 3
    replies instead of 10, 100 and 1,000 (3 instead of 10,000) and one repeat."""
    qv, all_linear, many = commands(readme_bash_block("### Aggregation at scale"))
    for i, command in enumerate((qv, all_linear, many)):
        assert command.startswith(".venv/bin/peft-bench-scale ")
        if i < 2:
            command = substitute(command, r"--clients 10,100,1000\b", "--clients 2,3", count=1)
        else:
            command = substitute(command, r"--clients 10000\b", "--clients 3", count=1)
        command += f" --repeats 1 --out out{i}"
        log = tmp_path / f"scale{i}.log"
        proc = processes.start(["bash", "-euo", "pipefail", "-c", command], log)
        assert processes.wait(proc, timeout=600, log=log) == 0, f"$ {command}\n{tail(log)}"
        assert "| 3 |" in (tmp_path / f"out{i}" / "results.md").read_text()


def test_server_adam_benchmark_example_runs_as_written(processes, tmp_path):
    """README "Label skew: the server-adam recipe": the `peft-bench` command on a tiny BERT and a
    tiny sentiment set, 2 clients x 2 rounds and one seed. The centralized baseline trains AdamW
    at the server's Adam rate; the federation records FedAdam over one-SGD-step clients, and its
    round 1 moves each coordinate by Flower's first bias-corrected Adam step, eta * sqrt(1 - b2^2)
    / (1 - b1^2), times |g| / (|g| + tau / 0.1) for the mean gradient g: at most that step, and
    that step where g is large (FedAvg would move each coordinate by g itself)."""
    from test_attack_bench import _write_sentiment
    from tiny_models import build_tiny_bert

    (command,) = commands(readme_bash_block("#### Label skew: the `server-adam` recipe"))
    assert command.startswith(".venv/bin/peft-bench ") and "--recipe server-adam" in command
    model = build_tiny_bert(tmp_path / "bert")
    _write_sentiment(tmp_path / "train.tsv", 64, seed=1)
    _write_sentiment(tmp_path / "dev.tsv", 24, seed=2)
    command = substitute(command, r"--data \S+ --eval-data \S+", "--data train.tsv --eval-data dev.tsv", count=1)
    command = substitute(command, r"--clients 10 --rounds 100\b", "--clients 2 --rounds 2", count=1)
    command = substitute(command, r"--seeds 0,1,2\b", "--seeds 0", count=1)
    command = substitute(command, r"--eval-limit 300\b", "--eval-limit 0", count=1)
    command += f" --model {model} --batch-size 4 --train-limit 0"
    log = tmp_path / "bench.log"
    proc = processes.start(["bash", "-euo", "pipefail", "-c", command], log)
    assert processes.wait(proc, timeout=600, log=log) == 0, f"$ {command}\n{tail(log)}"
    out = tmp_path / "runs" / "bench-server-adam"
    table = (out / "results.md").read_text()
    assert "dirichlet:0.1 / central" in table and "recipe server-adam" in table
    central = json.loads((out / "lora-centralized-seed0.json").read_text())
    (run_spec,) = out.glob("lora-dirichlet-0.1-seed0/run-spec.json")
    recorded = json.loads(run_spec.read_text())
    eta = float(recorded["federation"]["strategy_options"]["eta"])
    assert recorded["federation"]["strategy"] == "fedadam" and recorded["training"]["optimizer"] == "sgd"
    assert central["learning_rate"] == eta and central["steps"] == 2 * 2 * 1  # rounds x clients x one step
    from safetensors.numpy import load_file

    checkpoints = run_spec.parent / "checkpoints"
    start, after = (load_file(str(checkpoints / f"global-round-000{r}.safetensors")) for r in (0, 1))
    moves = np.concatenate([np.abs(after[k].astype(np.float64) - start[k]).ravel() for k in start])
    first_step = eta * np.sqrt(1 - 0.99 ** 2) / (1 - 0.9 ** 2)  # FedAdam's default betas, bias-corrected in round 1
    assert moves.max() <= first_step * (1 + 1e-5) and moves.max() >= first_step * (1 - 1e-3)
    assert np.count_nonzero(moves > first_step / 2) > 100
