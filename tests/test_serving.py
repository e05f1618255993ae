"""`peft-server serve` end to end: a real gRPC server on loopback, adapters from a short federation.

Two adapters are trained by peft-sim (tiny Llama, 2 rounds each, publishing every
round to a registry). Every served output is compared with what `peft.PeftModel`
with that adapter alone produces (greedy), including requests that join a running
mixed batch; hot-load, rollback, bad input, auth and TLS go through the real server.
"""

from __future__ import annotations

import copy
import json
import shutil
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from peft import LoraConfig, PeftModel, get_peft_model

from fedpeft.common.model.base_model import load_base_model, load_tokenizer
from fedpeft.common.protocol.serving_api import EngineLimits, GenerateParams, Sampling
from fedpeft.common.wire import serving as wire
from fedpeft.server.federation.flags import spec_from_flags
from fedpeft.server.serving.engine import ServingEngine
from fedpeft.server.serving.registry import ADAPTER_WEIGHTS, AdapterRegistry
from fedpeft.server.serving.service import TenantTokens, channel_to, start_grpc_server
from fedpeft.simulations.runner import run_simulation

pytestmark = pytest.mark.slow
PROMPTS = ["Support ticket: Department: billing Text:", "Text: my printer", "Label:", "Department: network Text: the vpn"]
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def registry_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """Two adapters, each trained by a 2-round federation that publishes every round."""
    root = tmp_path_factory.mktemp("serving")
    registry = root / "registry"
    for adapter_id, seed in (("alice", 1), ("bob", 2)):
        run_simulation(spec_from_flags(
            model=str(tiny_model_dir), method="lora", method_options={"r": "4" if seed == 1 else "8"}, clients=2,
            rounds=2, local_steps=8, learning_rate=3e-2, quantize="none",
            builtin_train_rows=120, eval_limit=16, seed=seed, publish_to=str(registry), adapter_id=adapter_id),
            str(root / adapter_id))
    return registry


@pytest.fixture(scope="module")
def served(tiny_model_dir, registry_dir):
    registry = AdapterRegistry(registry_dir)
    engine = ServingEngine(load_base_model(tiny_model_dir, "none"), load_tokenizer(tiny_model_dir), registry,
                           EngineLimits(max_batch=8, max_prompt_tokens=48, max_new_tokens=64), poll_seconds=0.2).start()
    handle = start_grpc_server(engine, max_request_bytes=64 * 1024)
    stub = wire.serving_stub(channel_to(f"127.0.0.1:{handle.port}"))
    yield engine, stub, handle
    handle.stop()
    engine.stop()


_reference_cache: dict[tuple, list[int]] = {}


def reference(model_dir: Path, adapter_dir: Path | None, prompt: str, new_tokens: int = NEW_TOKENS) -> list[int]:
    """Greedy tokens of peft.PeftModel with that adapter alone (the base model when None)."""
    key = (str(adapter_dir), prompt, new_tokens)
    if key not in _reference_cache:
        tokenizer = load_tokenizer(model_dir)
        base = load_base_model(model_dir, "none")
        model = PeftModel.from_pretrained(base, str(adapter_dir)) if adapter_dir else base
        _reference_cache[key] = greedy(model, tokenizer, prompt, new_tokens)
    return _reference_cache[key]


def greedy(model, tokenizer, prompt: str, new_tokens: int) -> list[int]:
    """transformers' greedy `generate`, past EOS (the served requests set ignore_eos)."""
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id, config.max_new_tokens, config.do_sample = None, new_tokens, False
    ids = tokenizer(prompt, return_tensors="pt")
    return model.generate(**ids, generation_config=config)[0, ids["input_ids"].shape[1]:].tolist()


def version_dir(registry_dir: Path, adapter_id: str, version: int) -> Path:
    return registry_dir / adapter_id / f"v{version:06d}"


def stream_tokens(stub, params: GenerateParams, first_token: threading.Event | None = None) -> tuple[list[int], int]:
    ids, version = [], 0
    for chunk in stub.GenerateStream(wire.generate_request(params)):
        ids += list(chunk.token_ids)
        version = chunk.adapter_version
        if first_token is not None:
            first_token.set()
    return ids, version


def test_every_round_was_published_as_a_version(registry_dir):
    registry = AdapterRegistry(registry_dir)
    assert {"alice", "bob"} <= set(registry.adapter_ids())
    for adapter_id in ("alice", "bob"):
        assert registry.versions(adapter_id)[:2] == [1, 2]  # later tests publish more
        assert [registry.meta(adapter_id, v)["round"] for v in (1, 2)] == [1, 2]
        assert (version_dir(registry_dir, adapter_id, 2) / "adapter_config.json").is_file()  # stock PEFT dir


def test_mixed_batches_equal_peft_model_alone(served, tiny_model_dir, registry_dir):
    engine, stub, _ = served
    targets = [("alice", version_dir(registry_dir, "alice", 2)), ("bob", version_dir(registry_dir, "bob", 2)),
               ("", None)]
    jobs = [(targets[i % 3], PROMPTS[i % len(PROMPTS)]) for i in range(9)]
    results: dict[int, tuple[list[int], int]] = {}
    started = threading.Event()

    def run(i: int) -> None:
        (adapter_id, _), prompt = jobs[i]
        results[i] = stream_tokens(stub, GenerateParams(adapter_id, 0, prompt, NEW_TOKENS, ignore_eos=True),
                                   started if i == 0 else None)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    threads[0].start()
    started.wait(30)  # the rest join a batch that is already decoding (continuous batching)
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(60)
    assert engine.max_adapters_in_batch >= 2, "requests for different adapters were never batched together"
    assert engine.joins_while_running >= 1, "no request joined a running batch"
    outputs = {}
    for i, ((adapter_id, adapter_dir), prompt) in enumerate(jobs):
        tokens, version = results[i]
        assert tokens == reference(tiny_model_dir, adapter_dir, prompt), f"request {i} ({adapter_id or 'base'})"
        assert version == (2 if adapter_id else 0)
        outputs.setdefault(prompt, set()).add(tuple(tokens))
    assert any(len(v) > 1 for v in outputs.values()), "adapters do not change the output: the test could not fail"


def test_unary_generate_and_score_match_peft(served, tiny_model_dir, registry_dir):
    _, stub, _ = served
    reply = stub.Generate(wire.generate_request(GenerateParams("bob", 1, PROMPTS[0], NEW_TOKENS, ignore_eos=True)))
    assert list(reply.token_ids) == reference(tiny_model_dir, version_dir(registry_dir, "bob", 1), PROMPTS[0])
    assert reply.adapter_version == 1 and reply.finish_reason == "length"
    scored = stub.Score(wire.score_request("alice", 0, PROMPTS[2], [" positive", " negative"]))
    tokenizer = load_tokenizer(tiny_model_dir)
    model = PeftModel.from_pretrained(load_base_model(tiny_model_dir, "none"), str(version_dir(registry_dir, "alice", 2)))
    for cont, got in zip([" positive", " negative"], scored.log_likelihood, strict=True):
        p = tokenizer(PROMPTS[2])["input_ids"]
        c = tokenizer(cont, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0].float(), -1)
        expected = sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(c))
        assert got == pytest.approx(expected, abs=1e-4)


def test_sampling_is_reproducible_with_a_seed(served):
    _, stub, _ = served
    params = GenerateParams("alice", 0, PROMPTS[1], 8, Sampling(temperature=1.5, top_k=50, top_p=0.9, seed=11), True)
    first = stub.Generate(wire.generate_request(params)).token_ids
    assert stub.Generate(wire.generate_request(params)).token_ids == first


def test_hot_load_keeps_in_flight_requests_and_rollback(served, tiny_model_dir, registry_dir, tmp_path):
    engine, stub, _ = served
    registry = AdapterRegistry(registry_dir)
    assert registry.current("alice") == 2
    job = engine.submit(GenerateParams("alice", 0, PROMPTS[0], 48, ignore_eos=True))
    events = job.stream(30)
    first = next(events)
    # Hold the engine between two decode steps (a control call that blocks), publish a new
    # round, and queue the hot-load behind it: it runs before the next decode step, so
    # the request is provably still in flight when the new version is loaded.
    gate, holding = threading.Event(), threading.Event()
    blocker = threading.Thread(target=lambda: engine._call(lambda: (holding.set(), gate.wait(30))))
    blocker.start()
    assert holding.wait(30)
    shutil.copytree(version_dir(registry_dir, "bob", 1), tmp_path / "new", ignore=shutil.ignore_patterns("registry.json"))
    assert registry.publish("alice", tmp_path / "new", {"round": 3}) == 3
    notice = threading.Thread(target=engine._notice_current, args=("alice",))
    notice.start()
    while not engine._control:
        time.sleep(0.01)
    gate.set()
    notice.join(30)
    blocker.join(30)
    assert ("alice", 3) in engine._loaded, "the new version was not hot-loaded"
    assert len(job.generated) < 48, "the in-flight request had already finished: nothing was tested"
    latest = stub.Generate(wire.generate_request(GenerateParams("alice", 0, PROMPTS[1], NEW_TOKENS, ignore_eos=True)))
    assert latest.adapter_version == 3
    assert list(latest.token_ids) == reference(tiny_model_dir, version_dir(registry_dir, "alice", 3), PROMPTS[1])
    tokens = first.token_ids + [t for e in events for t in e.token_ids]
    assert job.version == 2 and len(tokens) == 48
    assert tokens == reference(tiny_model_dir, version_dir(registry_dir, "alice", 2), PROMPTS[0], 48)
    info = stub.Rollback(wire.adapter_ref_request("rollback", "alice", 1))
    assert info.current_version == 1
    again = stub.Generate(wire.generate_request(GenerateParams("alice", 0, PROMPTS[1], NEW_TOKENS, ignore_eos=True)))
    assert again.adapter_version == 1
    assert list(again.token_ids) == reference(tiny_model_dir, version_dir(registry_dir, "alice", 1), PROMPTS[1])
    registry.rollback("alice", 2)
    assert all(e.refs == 0 for e in engine._loaded.values())


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_bad_input_gets_the_right_status_and_the_server_keeps_serving(served, tiny_model_dir, registry_dir, tmp_path):
    _, stub, _ = served
    gen = lambda **kw: lambda: stub.Generate(wire.generate_request(GenerateParams(**{"adapter_id": "alice",  # noqa: E731
                                                                                      "version": 0, "prompt": "Label:", **kw})))
    code, details = _code(gen(adapter_id="nobody"))
    assert code == grpc.StatusCode.NOT_FOUND and "nobody" in details
    code, details = _code(gen(version=9))
    assert code == grpc.StatusCode.NOT_FOUND and "no version 9" in details
    code, details = _code(gen(prompt="ticket " * 200))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "limit 48" in details
    code, details = _code(gen(prompt=""))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    for sampling, word in ((Sampling(temperature=-1), "temperature"), (Sampling(temperature=1, top_p=1.5), "top_p"),
                           (Sampling(temperature=float("nan")), "temperature"), (Sampling(top_k=10**6), "top_k")):
        code, details = _code(gen(sampling=sampling))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and word in details
    code, details = _code(gen(max_new_tokens=65))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_new_tokens" in details
    code, _ = _code(gen(prompt="x" * 100_000))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    code, _ = _code(lambda: stub.Score(wire.score_request("alice", 0, "Label:", [])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # A tampered registry entry: one flipped byte in the weights after publishing.
    registry = AdapterRegistry(registry_dir)
    source = tmp_path / "mallory"
    shutil.copytree(version_dir(registry_dir, "bob", 2), source, ignore=shutil.ignore_patterns("registry.json"))
    registry.publish("mallory", source)
    weights = version_dir(registry_dir, "mallory", 1) / ADAPTER_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01
    weights.write_bytes(bytes(data))
    code, details = _code(gen(adapter_id="mallory"))
    assert code == grpc.StatusCode.DATA_LOSS and "sha256" in details
    # An adapter for another architecture (wrong shapes) and an unsupported LoRA variant.
    other = tmp_path / "other"
    shutil.copytree(version_dir(registry_dir, "bob", 2), other, ignore=shutil.ignore_patterns("registry.json"))
    from safetensors.torch import load_file, save_file

    tensors = {k: torch.zeros(v.shape[0], v.shape[1] + 1) if "lora_A" in k else v
               for k, v in load_file(str(other / ADAPTER_WEIGHTS)).items()}
    save_file(tensors, str(other / ADAPTER_WEIGHTS))
    registry.publish("wrongshape", other)
    code, details = _code(gen(adapter_id="wrongshape"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "does not fit" in details
    dora = tmp_path / "dora"
    shutil.copytree(version_dir(registry_dir, "bob", 2), dora, ignore=shutil.ignore_patterns("registry.json"))
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    registry.publish("dora", dora)
    code, details = _code(gen(adapter_id="dora"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "use_dora" in details
    # ... and everyone else is still served correctly.
    ok = stub.Generate(wire.generate_request(GenerateParams("bob", 2, PROMPTS[0], NEW_TOKENS, ignore_eos=True)))
    assert list(ok.token_ids) == reference(tiny_model_dir, version_dir(registry_dir, "bob", 2), PROMPTS[0])


def test_load_unload_list_and_health(served):
    engine, stub, handle = served
    info = stub.LoadAdapter(wire.adapter_ref_request("load", "bob", 1))
    assert 1 in info.loaded_versions and info.current_version == 2
    assert engine._loaded[("bob", 1)].pinned
    listed = stub.ListAdapters(wire.list_request())
    assert {"alice", "bob"} <= {a.adapter_id for a in listed.adapters}
    assert listed.adapter_memory_bytes > 0 and listed.adapter_memory_cap_bytes == engine.limits.adapter_memory_bytes
    assert stub.UnloadAdapter(wire.adapter_ref_request("unload", "bob", 1)).unloaded
    assert ("bob", 1) not in engine._loaded
    health = health_pb2_grpc.HealthStub(channel_to(f"127.0.0.1:{handle.port}"))
    reply = health.Check(health_pb2.HealthCheckRequest(service=wire.SERVICE_NAME))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_tenant_tokens_over_tls(tiny_model_dir, registry_dir, tmp_path):
    from fedpeft.common.security.pki import make_dev_certificates

    tls = make_dev_certificates(tmp_path / "tls")
    tokens_file = tmp_path / "tokens.json"
    bob_token = TenantTokens.add(tokens_file, "acme", ["bob"])
    operator_token = TenantTokens.add(tokens_file, "ops", ["*"], admin=True)
    engine = ServingEngine(load_base_model(tiny_model_dir, "none"), load_tokenizer(tiny_model_dir),
                           AdapterRegistry(registry_dir)).start()
    handle = start_grpc_server(engine, tls_dir=tmp_path / "tls", tokens=TenantTokens.load(tokens_file))
    try:
        stub = wire.serving_stub(channel_to(f"localhost:{handle.port}", tls.ca_cert))
        request = wire.generate_request(GenerateParams("bob", 0, "Label:", 4))
        code, _ = _code(lambda: stub.Generate(request))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        code, _ = _code(lambda: stub.Generate(request, metadata=[("authorization", "Bearer wrong")]))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        auth = [("authorization", f"Bearer {bob_token}")]
        assert len(stub.Generate(request, metadata=auth).token_ids) == 4
        code, details = _code(lambda: stub.Generate(wire.generate_request(GenerateParams("alice", 0, "Label:", 4)),
                                                    metadata=auth))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "alice" in details
        assert [a.adapter_id for a in stub.ListAdapters(wire.list_request(), metadata=auth).adapters] == ["bob"]
        code, details = _code(lambda: stub.Rollback(wire.adapter_ref_request("rollback", "bob", 1), metadata=auth))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "operator" in details
        code, _ = _code(lambda: stub.LoadAdapter(wire.adapter_ref_request("load", "bob", 1), metadata=auth))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        operator = [("authorization", f"Bearer {operator_token}")]
        assert 1 in stub.LoadAdapter(wire.adapter_ref_request("load", "bob", 1), metadata=operator).loaded_versions
        assert "token_sha256" in tokens_file.read_text() and bob_token not in tokens_file.read_text()
    finally:
        handle.stop()
        engine.stop()


def _random_lora(model_dir: Path, out: Path, seed: int, r: int = 4) -> Path:
    torch.manual_seed(seed)
    model = get_peft_model(load_base_model(model_dir, "none"), LoraConfig(r=r, lora_alpha=16, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.2)
    model.save_pretrained(out)
    return out


def test_lru_evicts_the_least_recently_used_idle_version(tiny_model_dir, tmp_path):
    registry = AdapterRegistry(tmp_path / "reg")
    for i in range(4):
        registry.publish(f"t{i}", _random_lora(tiny_model_dir, tmp_path / f"a{i}", seed=i))
    model = load_base_model(tiny_model_dir, "none")
    engine = ServingEngine(model, load_tokenizer(tiny_model_dir), registry)
    one = engine.lora.bytes_needed(registry.read("t0").tensors)
    engine.limits.adapter_memory_bytes = int(3.5 * one)
    engine.start()
    try:
        engine.load("t0", 0)  # pinned: never evicted
        for adapter_id in ("t1", "t2", "t1"):  # t2 is now the least recently used idle version
            engine.generate(GenerateParams(adapter_id, 0, "Label:", 3), timeout=30)
        assert set(engine._loaded) == {("t0", 1), ("t1", 1), ("t2", 1)}
        engine.generate(GenerateParams("t3", 0, "Label:", 3), timeout=30)
        assert set(engine._loaded) == {("t0", 1), ("t1", 1), ("t3", 1)}, "t2 (LRU) should have been evicted"
        assert engine.adapter_memory <= 3.5 * one
        tokens, *_ = engine.generate(GenerateParams("t2", 0, "Label:", 6, ignore_eos=True), timeout=30)
        assert tokens == reference(tiny_model_dir, tmp_path / "a2", "Label:", 6)  # reloaded after eviction
        assert all(e.refs == 0 for e in engine._loaded.values())
    finally:
        engine.stop()


def test_engine_faults_stay_with_their_request(tiny_model_dir, tmp_path):
    from fedpeft.server.serving.errors import (
        AdapterCorruptError,
        AdapterIncompatibleError,
        InvalidRequestError,
        OverloadedError,
        ShuttingDownError,
    )

    registry = AdapterRegistry(tmp_path / "reg")
    for i in range(3):
        registry.publish(f"t{i}", _random_lora(tiny_model_dir, tmp_path / f"a{i}", seed=i))
    (tmp_path / "reg" / "t2" / "v000001" / "registry.json").write_text("[]")  # valid JSON, not an object
    engine = ServingEngine(load_base_model(tiny_model_dir, "none"), load_tokenizer(tiny_model_dir), registry,
                           base_fingerprint="llama-someotherbase").start()
    try:
        # a request running while a corrupt adapter is asked for finishes correctly
        good = engine.submit(GenerateParams("", 0, PROMPTS[0], 24, ignore_eos=True))
        bad = engine.submit(GenerateParams("t2", 0, PROMPTS[0], 4))
        with pytest.raises(AdapterCorruptError, match="JSON object"):
            list(bad.stream(30))
        assert [t for e in good.stream(30) for t in e.token_ids] == reference(tiny_model_dir, None, PROMPTS[0], 24)
        assert [a.adapter_id for a in engine.adapters()] == ["t0", "t1"]  # the broken one is left out, not fatal
        with pytest.raises(InvalidRequestError, match="temperature"):
            engine.submit(GenerateParams("t0", 0, "Label:", 4, Sampling(temperature=1e-30)))
        # an adapter published for another base model is refused
        meta_path = tmp_path / "reg" / "t1" / "v000001" / "registry.json"
        meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "base_model_fingerprint": "llama-x"}))
        with pytest.raises(AdapterIncompatibleError, match="trained on base model"):
            engine.generate(GenerateParams("t1", 0, "Label:", 3), timeout=30)
        # pinned adapters that leave no room: RESOURCE_EXHAUSTED at once, and the base is still served
        engine.load("t0", 0)
        engine.limits.adapter_memory_bytes = engine.adapter_memory + 10
        meta_path.write_text(json.dumps({k: v for k, v in json.loads(meta_path.read_text()).items()
                                         if k != "base_model_fingerprint"}))
        with pytest.raises(OverloadedError, match="pinned adapters"):
            engine.generate(GenerateParams("t1", 0, "Label:", 3), timeout=30)
        assert len(engine.generate(GenerateParams("", 0, "Label:", 3, ignore_eos=True), timeout=30)[0]) == 3
        assert all(e.refs == 0 for e in engine._loaded.values())
        # a request cancelled while queued still gets a final event
        blocker = threading.Event()
        holder = threading.Thread(target=lambda: engine._call(lambda: blocker.wait(30)))
        holder.start()
        while not engine._control and holder.is_alive():
            time.sleep(0.01)
        queued = engine.submit(GenerateParams("", 0, "Label:", 3))
        queued.cancelled.set()
        doomed = engine.submit(GenerateParams("", 0, "Label:", 3))
        blocker.set()
        holder.join(30)
        assert [e.finish_reason for e in queued.stream(30)][-1] == "cancelled"
        list(doomed.stream(30))
    finally:
        engine.stop()
    with pytest.raises(ShuttingDownError):
        engine.submit(GenerateParams("", 0, "Label:", 3))


def test_stop_fails_queued_requests(tiny_model_dir, tmp_path):
    from fedpeft.server.serving.errors import ShuttingDownError

    engine = ServingEngine(load_base_model(tiny_model_dir, "none"), load_tokenizer(tiny_model_dir),
                           AdapterRegistry(tmp_path / "reg"))  # never started: requests stay queued
    job = engine.submit(GenerateParams("", 0, "Label:", 3))
    engine.stop()
    with pytest.raises(ShuttingDownError):
        list(job.stream(5))


def test_rslora_and_rank_pattern_adapters_match_peft(tiny_model_dir, tmp_path):
    registry = AdapterRegistry(tmp_path / "reg")
    configs = {"rs": LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules="all-linear"),
               "pattern": LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", rank_pattern={"q_proj": 8})}
    for name, config in configs.items():
        torch.manual_seed(1)
        model = get_peft_model(load_base_model(tiny_model_dir, "none"), config)
        for pname, param in model.named_parameters():
            if "lora_B" in pname:
                param.data.normal_(0, 0.3)
        model.save_pretrained(tmp_path / name)
        registry.publish(name, tmp_path / name)
    engine = ServingEngine(load_base_model(tiny_model_dir, "none"), load_tokenizer(tiny_model_dir), registry).start()
    try:
        jobs = {n: engine.submit(GenerateParams(n, 0, PROMPTS[3], 8, ignore_eos=True)) for n in configs}
        for name, job in jobs.items():
            assert [t for e in job.stream(30) for t in e.token_ids] == reference(tiny_model_dir, tmp_path / name,
                                                                                PROMPTS[3], 8)
    finally:
        engine.stop()


def test_sealed_registry_round_trip_and_tampering(tiny_model_dir, tmp_path):
    from fedpeft.common.security.envelope import PeerIdentity

    identity = PeerIdentity.generate()
    registry = AdapterRegistry(tmp_path / "reg", identity=identity)
    source = _random_lora(tiny_model_dir, tmp_path / "a", seed=5)
    registry.publish("secret", source)
    vdir = version_dir(tmp_path / "reg", "secret", 1)
    assert not (vdir / ADAPTER_WEIGHTS).exists() and not (vdir / "adapter_config.json").exists()
    engine = ServingEngine(load_base_model(tiny_model_dir, "none"), load_tokenizer(tiny_model_dir), registry).start()
    try:
        tokens, *_ = engine.generate(GenerateParams("secret", 0, "Label:", 6, ignore_eos=True), timeout=30)
        assert tokens == reference(tiny_model_dir, source, "Label:", 6)
    finally:
        engine.stop()
    from fedpeft.server.serving.errors import AdapterCorruptError

    with pytest.raises(AdapterCorruptError, match="without its key"):
        AdapterRegistry(tmp_path / "reg").read("secret")
    with pytest.raises(AdapterCorruptError, match="untrusted sender|signature"):
        AdapterRegistry(tmp_path / "reg", identity=PeerIdentity.generate()).read("secret")
    sealed = vdir / "adapter_model.envelope"
    data = bytearray(sealed.read_bytes())
    data[len(data) // 2] ^= 0x01
    sealed.write_bytes(bytes(data))
    with pytest.raises(AdapterCorruptError, match="refused"):
        registry.read("secret")
    # a plaintext version forged into the keyed registry (valid sha256s, no key needed) is refused
    forged = AdapterRegistry(tmp_path / "reg")
    forged.publish("secret", source)
    with pytest.raises(AdapterCorruptError, match="not sealed"):
        registry.read("secret", 2)


@pytest.mark.skipif(not __import__("importlib").util.find_spec("bitsandbytes"), reason="bitsandbytes missing")
def test_four_bit_base_serves_the_same_as_peft_on_the_same_base(tiny_model_dir, tmp_path):
    registry = AdapterRegistry(tmp_path / "reg")
    source = _random_lora(tiny_model_dir, tmp_path / "a", seed=3)
    registry.publish("q", source)
    tokenizer = load_tokenizer(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(load_base_model(tiny_model_dir, "4bit"), str(source))
    expected = greedy(peft_model, tokenizer, PROMPTS[0], 8)
    engine = ServingEngine(load_base_model(tiny_model_dir, "4bit"), tokenizer, registry).start()
    try:
        tokens, *_ = engine.generate(GenerateParams("q", 0, PROMPTS[0], 8, ignore_eos=True), timeout=60)
    finally:
        engine.stop()
    assert tokens == expected


def test_cli_publish_rollback_token_and_a_real_serve_process(tiny_model_dir, registry_dir, tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys

    from fedpeft.server.cli import main as server_main

    registry = tmp_path / "reg"
    assert server_main(["publish", "--registry", str(registry), "--adapter-id", "cli",
                        "--from", str(version_dir(registry_dir, "alice", 1))]) == 0
    assert server_main(["publish", "--registry", str(registry), "--adapter-id", "cli",
                        "--from", str(version_dir(registry_dir, "alice", 2))]) == 0
    assert server_main(["rollback", "--registry", str(registry), "--adapter-id", "cli", "--version", "1"]) == 0
    assert AdapterRegistry(registry).current("cli") == 1
    assert server_main(["rollback", "--registry", str(registry), "--adapter-id", "cli", "--version", "7"]) != 0
    assert server_main(["publish", "--registry", str(registry), "--adapter-id", "../evil",
                        "--from", str(version_dir(registry_dir, "alice", 1))]) == 2
    assert server_main(["token", "--file", str(tmp_path / "t.json"), "--tenant", "acme", "--adapters", "cli"]) == 0
    token = TenantTokens.add(tmp_path / "t.json", "cli-user", ["cli"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen([sys.executable, "-m", "fedpeft.server.cli", "serve", "--insecure", "--registry", str(registry),
                             "--model", str(tiny_model_dir), "--port", str(port), "--tokens", str(tmp_path / "t.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        channel = channel_to(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=120)
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(service=wire.SERVICE_NAME)).status == \
            health_pb2.HealthCheckResponse.SERVING
        code, _ = _code(lambda: wire.serving_stub(channel).Generate(
            wire.generate_request(GenerateParams("cli", 0, "Label:", 3))))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        from fedpeft.client.cli import main as client_main

        assert token.startswith("fpt_")
        common = ["generate", "--server", f"127.0.0.1:{port}", "--insecure", "--token", token, "--max-new-tokens", "3"]
        assert client_main([*common, "--adapter", "cli", "Label:"]) == 0
        assert client_main([*common, "--adapter", "nobody", "Label:"]) == 7  # PERMISSION_DENIED, reported
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output
    assert "serving" in output and "WITHOUT TLS" in output


def test_serving_benchmark_runs_all_three_ways(tiny_model_dir, tmp_path):
    import csv

    from fedpeft.simulations.bench.serving import main as bench_main

    assert bench_main(["--model", str(tiny_model_dir), "--adapters", "1,3", "--requests", "6", "--new-tokens", "3",
                       "--max-batch", "4", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [(r["adapters"], r["way"]) for r in rows] == [("1", "merged"), ("1", "mixed"), ("1", "swap"), ("1", "grouped"),
                                                         ("3", "mixed"), ("3", "swap"), ("3", "grouped")]
    assert all(int(r["tokens"]) == 18 and float(r["tokens_per_second"]) > 0 for r in rows)
    assert (tmp_path / "throughput.png").is_file()
