"""Base models: loading, architectures, 4-bit quantization, PEFT adaptation, split parts."""
