"""Named engine presets: what one emulated vLLM replica holds and how long its steps take.

Rules:
- A preset is a frozen, named, documented assumption: model, GPU, KV capacity (`num_gpu_blocks` x
  `block_size` tokens), KV bytes per token, vLLM scheduler limits, and the step-time model
      duration = base_s + prefill_tokens * s_per_prefill_token
                        + decode_seqs * s_per_decode_seq + context_tokens * s_per_context_token
  where prefill_tokens are the prompt tokens computed in the step (chunks, recomputation after
  preemption), decode_seqs the sequences generating their next token, context_tokens the KV those
  decoding sequences attend to. Linear in each input, so monotone; a step that schedules nothing takes 0.
- Every number says where it comes from. Where no direct measurement was found, it is derived from
  published hardware peaks with an efficiency taken from a published measurement, and says so.
- Override one field with `dataclasses.replace(get_preset("tiny"), num_gpu_blocks=64)`.

Scheduler limits are vLLM's defaults for the OpenAI server (vllm/engine/arg_utils.py,
EngineArgs.get_batch_defaults): GPUs with >= 70 GiB that are not A100 (H100, H200) get
max_num_batched_tokens 8192 and max_num_seqs 1024; other GPUs 2048 and 256. Chunked prefill is on (V1).

Derivation constants (H100 SXM 80GB datasheet: 3.35 TB/s HBM3, 989 TFLOPS dense BF16):
- Decode is memory-bound: a step re-reads the weights, at 77% of HBM bandwidth — the efficiency measured
  for Llama-3.1-8B BF16 on vLLM 0.23 at one request (75 tok/s on an A100 40GB, "about 77% of the GPU's
  memory-bandwidth ceiling", johnmusgrave.com/p/vllm-throughput-latency-sweep-on).
- Each decoding sequence adds 2 x params FLOPs at 50% of peak (the compute a batch grows by), and reads its
  context's KV at the same 77% of bandwidth.
- Prefill is compute-bound: 2 x params FLOPs a token at 40% of peak, which lands between the llm-d
  recompute measurements (gpt-oss-120b on one H200: 2K tokens 78 ms, 16K 510 ms, 48K 1988 ms, i.e.
  24-32K tok/s with 5.1B active parameters; shared/design/anchors.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

H100_HBM_BYTES_PER_S = 3.35e12
H100_BF16_FLOPS = 989e12
DECODE_BW_EFFICIENCY = 0.77
DECODE_FLOP_EFFICIENCY = 0.50
PREFILL_FLOP_EFFICIENCY = 0.40


@dataclass(frozen=True, slots=True)
class Preset:
    """One replica's shape and speed. See the module docstring for the time model."""

    name: str
    model: str
    gpu: str
    block_size: int
    num_gpu_blocks: int
    kv_bytes_per_token: int
    max_model_len: int
    max_num_batched_tokens: int
    max_num_seqs: int
    base_s: float
    s_per_prefill_token: float
    s_per_decode_seq: float
    s_per_context_token: float
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        ints = (self.block_size, self.num_gpu_blocks, self.max_model_len)
        if min(*ints, self.max_num_batched_tokens, self.max_num_seqs) <= 0:
            raise ValueError(f"preset {self.name!r}: sizes and limits must be positive")
        times = (self.base_s, self.s_per_prefill_token, self.s_per_decode_seq, self.s_per_context_token)
        if min(times) < 0:
            raise ValueError(f"preset {self.name!r}: step-time coefficients must be >= 0")

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_gpu_blocks * self.block_size

    @property
    def kv_capacity_bytes(self) -> int:
        return self.kv_capacity_tokens * self.kv_bytes_per_token

    @property
    def prefill_tokens_per_s(self) -> float:
        """Marginal prefill throughput (tokens a second once a step is running)."""
        return float("inf") if self.s_per_prefill_token == 0 else 1.0 / self.s_per_prefill_token

    def step_duration(self, prefill_tokens: int, decode_seqs: int, context_tokens: int) -> float:
        """Seconds one engine step takes; 0 when it computes nothing."""
        if prefill_tokens == 0 and decode_seqs == 0:
            return 0.0
        return (
            self.base_s
            + prefill_tokens * self.s_per_prefill_token
            + decode_seqs * self.s_per_decode_seq
            + context_tokens * self.s_per_context_token
        )

    def decode_step_s(self, batch: int, mean_context_tokens: int) -> float:
        """Duration of a pure decode step of `batch` sequences (the inter-token latency)."""
        return self.step_duration(0, batch, batch * mean_context_tokens)

    def service_s(self, prefill_tokens: float, prompt_tokens: float, output_tokens: float) -> float:
        """Marginal engine seconds one request costs when batched with many others: its uncached
        prefill, plus one decode slot per output token reading a context that grows from the prompt.
        `base_s` is left out: a saturated engine shares it over a large batch. Used to set benchmark
        rates from total work, not from prefill alone (decode is most of the work for long outputs)."""
        mean_context = prompt_tokens + output_tokens / 2.0
        decode = output_tokens * (self.s_per_decode_seq + mean_context * self.s_per_context_token)
        return prefill_tokens * self.s_per_prefill_token + decode

    def prefill_s(self, tokens: int) -> float:
        """Time to prefill `tokens` alone, chunked by max_num_batched_tokens (no queueing, no decode)."""
        full, rest = divmod(tokens, self.max_num_batched_tokens)
        steps = full + (1 if rest else 0)
        return steps * self.base_s + tokens * self.s_per_prefill_token


def _decode_base_s(weight_bytes_per_gpu: float) -> float:
    return weight_bytes_per_gpu / (H100_HBM_BYTES_PER_S * DECODE_BW_EFFICIENCY)


def _per_gpu_flop_s(flops: float, gpus: int, efficiency: float) -> float:
    return flops / (gpus * H100_BF16_FLOPS * efficiency)


# Llama-3.1-8B: 8.03B params, 32 layers, 8 KV heads x 128 dims -> 32*8*128*2 (K,V)*2 bytes = 128 KiB/token.
_LLAMA8B_PARAMS = 8.03e9
_LLAMA8B_KV = 32 * 8 * 128 * 2 * 2

LLAMA_8B_H100 = Preset(
    name="llama-8b-h100",
    model="meta-llama/Llama-3.1-8B-Instruct (BF16)",
    gpu="1x H100 80GB SXM",
    block_size=16,  # vLLM's default --block-size on GPU
    # 0.9 (default gpu_memory_utilization) x 79.2 GiB - 15.0 GiB weights ("Loading model weights took
    # 14.9888 GB", vllm-project/vllm#10517, Llama-3.1-8B-Instruct) - ~3 GiB activations and CUDA graphs
    # (assumed) = ~53 GiB / 128 KiB = ~434K tokens. llm-d's rougher sizing says ~500K (anchors.md).
    num_gpu_blocks=27_000,  # 432,000 tokens
    kv_bytes_per_token=_LLAMA8B_KV,
    max_model_len=131_072,  # Llama-3.1's context length
    max_num_batched_tokens=8192,
    max_num_seqs=1024,
    base_s=_decode_base_s(2 * _LLAMA8B_PARAMS),  # 16.1 GB of weights -> 6.2 ms a step
    # 41 µs a token: ~24.6K prefill tokens/s
    s_per_prefill_token=_per_gpu_flop_s(2 * _LLAMA8B_PARAMS, 1, PREFILL_FLOP_EFFICIENCY),
    s_per_decode_seq=_per_gpu_flop_s(2 * _LLAMA8B_PARAMS, 1, DECODE_FLOP_EFFICIENCY),  # 32 µs
    s_per_context_token=_LLAMA8B_KV / (H100_HBM_BYTES_PER_S * DECODE_BW_EFFICIENCY),  # 0.051 µs
    source="derived: H100 SXM peaks x efficiencies from a measured vLLM A100 run; see module docstring",
)

# Qwen3-32B: 32.8B params, 64 layers, 8 KV heads x 128 dims -> 256 KiB/token over both GPUs (TP=2).
_QWEN32B_PARAMS = 32.8e9
_QWEN32B_KV = 64 * 8 * 128 * 2 * 2

QWEN3_32B_2XH100 = Preset(
    name="qwen3-32b-2xh100",
    model="Qwen/Qwen3-32B (BF16, tensor parallel 2)",
    gpu="2x H100 80GB (one pod of llm-d's precise-routing benchmark)",
    block_size=16,
    # llm-d "KV-cache wins you can see": 8 pods x 2 H100, 307,328 KV tokens per pod (anchors.md).
    # Cross-check: 307,328 x 256 KiB = 75 GiB = 37.5 GiB a GPU next to 32.8 GB of weights a GPU.
    num_gpu_blocks=307_328 // 16,
    kv_bytes_per_token=_QWEN32B_KV,
    max_model_len=40_960,  # Qwen3-32B config.json max_position_embeddings
    max_num_batched_tokens=8192,
    max_num_seqs=1024,
    # Each GPU reads half the weights (32.8 GB) -> 12.7 ms, + ~1.3 ms for 128 all-reduces (assumed).
    base_s=_decode_base_s(_QWEN32B_PARAMS) + 1.3e-3,
    s_per_prefill_token=_per_gpu_flop_s(2 * _QWEN32B_PARAMS, 2, PREFILL_FLOP_EFFICIENCY),  # 83 µs: ~12K tok/s
    s_per_decode_seq=_per_gpu_flop_s(2 * _QWEN32B_PARAMS, 2, DECODE_FLOP_EFFICIENCY),  # 66 µs
    s_per_context_token=(_QWEN32B_KV / 2) / (H100_HBM_BYTES_PER_S * DECODE_BW_EFFICIENCY),  # 0.051 µs
    source="capacity: llm-d benchmark; speed derived as for llama-8b-h100 (module docstring)",
)

TINY = Preset(
    name="tiny",
    model="tiny test model",
    gpu="none (CPU tests)",
    block_size=16,
    num_gpu_blocks=256,  # 4,096 tokens: small enough that tests reach eviction and preemption quickly
    kv_bytes_per_token=1024,
    max_model_len=2048,
    max_num_batched_tokens=512,
    max_num_seqs=16,
    base_s=1e-3,  # chosen, not measured: milliseconds, so live tests finish fast but steps still take time
    s_per_prefill_token=2e-6,
    s_per_decode_seq=1e-4,
    s_per_context_token=0.0,
    source="chosen for fast tests; not a real model",
)

INSTANT = Preset(
    name="instant",
    model="instant (no model)",
    gpu="none",
    block_size=16,
    num_gpu_blocks=65_536,  # 1M tokens: large enough never to be the bottleneck
    kv_bytes_per_token=0,
    max_model_len=131_072,
    max_num_batched_tokens=8192,
    max_num_seqs=1024,
    base_s=0.0,  # every step takes no time: measures the proxy, not the engine
    s_per_prefill_token=0.0,
    s_per_decode_seq=0.0,
    s_per_context_token=0.0,
    source="chosen: zero step time for proxy-overhead benchmarks",
)

PRESETS: Mapping[str, Preset] = MappingProxyType(
    {p.name: p for p in (LLAMA_8B_H100, QWEN3_32B_2XH100, TINY, INSTANT)}
)


def get_preset(name: str) -> Preset:
    """The preset called `name`; ValueError listing the known ones otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown engine preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
