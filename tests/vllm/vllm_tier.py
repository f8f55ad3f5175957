"""Constants shared by the real-vLLM tier's fixtures and tests."""

MODEL_NAME = "tiny"
BLOCK_SIZE = 32  # the CPU build's smallest block (multiples of 32 only; vllm-interfaces.md)
