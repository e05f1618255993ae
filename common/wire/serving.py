"""`fedpeft.common.protocol.serving_api` types <-> `fedpeft.v1` serving messages (serde boundary).

Torch-free, so a client process (or the benchmark's load generator) can talk to
`peft-server serve` without loading a model.
"""

from __future__ import annotations

from typing import Any

from fedpeft.common.protocol.serving_api import AdapterStatus, GenerateParams, Sampling, ScoreResult, TokenEvent
from fedpeft.common.wire.grpc_service import GrpcService
from fedpeft.v1 import serving_pb2

SERVICE_NAME = "fedpeft.v1.AdapterServing"
"""Full gRPC service name (also the grpc.health.v1 service name it reports under)."""


def generate_request(params: GenerateParams) -> serving_pb2.GenerateRequest:
    s = params.sampling
    return serving_pb2.GenerateRequest(
        adapter=serving_pb2.AdapterRef(adapter_id=params.adapter_id, version=params.version), prompt=params.prompt,
        max_new_tokens=params.max_new_tokens, ignore_eos=params.ignore_eos,
        sampling=serving_pb2.SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed))


def generate_params(message: serving_pb2.GenerateRequest) -> GenerateParams:
    s = message.sampling
    return GenerateParams(adapter_id=message.adapter.adapter_id, version=message.adapter.version,
                          prompt=message.prompt, max_new_tokens=message.max_new_tokens, ignore_eos=message.ignore_eos,
                          sampling=Sampling(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed))


def generate_response(token_ids: list[int], text: str, finish_reason: str, version: int,
                      prompt_tokens: int) -> serving_pb2.GenerateResponse:
    return serving_pb2.GenerateResponse(text=text, token_ids=token_ids, adapter_version=version,
                                        finish_reason=finish_reason, prompt_tokens=prompt_tokens)


def generate_chunk(event: TokenEvent, version: int) -> serving_pb2.GenerateChunk:
    return serving_pb2.GenerateChunk(text=event.text, token_ids=event.token_ids, done=event.done,
                                     finish_reason=event.finish_reason, adapter_version=version)


def score_request(adapter_id: str, version: int, prompt: str, continuations: list[str]) -> serving_pb2.ScoreRequest:
    return serving_pb2.ScoreRequest(adapter=serving_pb2.AdapterRef(adapter_id=adapter_id, version=version),
                                    prompt=prompt, continuations=continuations)


def score_response(result: ScoreResult) -> serving_pb2.ScoreResponse:
    return serving_pb2.ScoreResponse(log_likelihood=result.log_likelihood, num_tokens=result.num_tokens,
                                     adapter_version=result.adapter_version)


def adapter_info(status: AdapterStatus) -> serving_pb2.AdapterInfo:
    return serving_pb2.AdapterInfo(adapter_id=status.adapter_id, versions=status.versions,
                                   current_version=status.current_version, loaded_versions=status.loaded_versions,
                                   method=status.method, rank=status.rank, encrypted=status.encrypted)


def list_response(statuses: list[AdapterStatus], base_model: str, memory: int, cap: int
                  ) -> serving_pb2.ListAdaptersResponse:
    return serving_pb2.ListAdaptersResponse(adapters=[adapter_info(s) for s in statuses], base_model=base_model,
                                            adapter_memory_bytes=memory, adapter_memory_cap_bytes=cap)


def adapter_ref_request(kind: str, adapter_id: str, version: int = 0) -> Any:
    """A LoadAdapterRequest / UnloadAdapterRequest / RollbackRequest."""
    ref = serving_pb2.AdapterRef(adapter_id=adapter_id, version=version)
    if kind == "load":
        return serving_pb2.LoadAdapterRequest(adapter=ref)
    if kind == "unload":
        return serving_pb2.UnloadAdapterRequest(adapter=ref)
    return serving_pb2.RollbackRequest(adapter_id=adapter_id, version=version)


def unload_response(unloaded: bool) -> serving_pb2.UnloadAdapterResponse:
    return serving_pb2.UnloadAdapterResponse(unloaded=unloaded)


def list_request() -> serving_pb2.ListAdaptersRequest:
    return serving_pb2.ListAdaptersRequest()


_SERVICE = GrpcService("fedpeft.v1.serving_pb2_grpc", "AdapterServing")
serving_stub = _SERVICE.stub
add_serving_servicer = _SERVICE.add_servicer
servicer_base = _SERVICE.servicer_base
