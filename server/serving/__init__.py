"""Serving one frozen base model with many federated LoRA adapters (`peft-server serve`).

- `registry`: versioned adapters on disk (stock PEFT dirs, or sealed envelopes at rest);
- `batched_lora`: LoRA layers that apply a different adapter to each row of a batch;
- `kv_batch`: the KV-cache bookkeeping of continuous batching;
- `engine`: the scheduler thread (continuous batching, LRU of loaded adapters);
- `service`: the gRPC `AdapterServing` service, auth and status codes.
"""
