"""Named presets: their documented numbers and the step-time model."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.engine import PRESETS, Preset, get_preset

counts = st.integers(min_value=0, max_value=100_000)


def test_the_required_presets_exist_with_sources() -> None:
    assert {"llama-8b-h100", "qwen3-32b-2xh100", "tiny", "instant"} <= set(PRESETS)
    for name, preset in PRESETS.items():
        assert preset.name == name and preset.source and preset.model and preset.gpu


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="known: instant, llama-8b-h100"):
        get_preset("llama-70b")


@pytest.mark.parametrize(
    ("name", "kv_tokens", "kv_bytes"),
    [
        ("llama-8b-h100", 432_000, 128 * 1024),  # 32 layers x 8 KV heads x 128 x K,V x BF16
        ("qwen3-32b-2xh100", 307_328, 256 * 1024),  # llm-d's pods; 64 layers x 8 x 128 x 2 x 2
    ],
)
def test_kv_capacity_and_bytes_match_their_sources(name: str, kv_tokens: int, kv_bytes: int) -> None:
    preset = get_preset(name)
    assert preset.kv_capacity_tokens == preset.num_gpu_blocks * preset.block_size == kv_tokens
    assert preset.kv_bytes_per_token == kv_bytes
    assert (preset.max_num_batched_tokens, preset.max_num_seqs) == (8192, 1024)  # vLLM's H100 defaults


@pytest.mark.parametrize(
    ("name", "prefill_band", "itl_band"),
    [
        ("llama-8b-h100", (15_000, 40_000), (0.004, 0.010)),
        ("qwen3-32b-2xh100", (6_000, 20_000), (0.008, 0.025)),
    ],
)
def test_realistic_presets_are_in_published_ranges(
    name: str, prefill_band: tuple[float, float], itl_band: tuple[float, float]
) -> None:
    preset = get_preset(name)
    assert prefill_band[0] < preset.prefill_tokens_per_s < prefill_band[1]
    assert itl_band[0] < preset.decode_step_s(1, 1000) < itl_band[1]
    # llm-d's recompute anchor: 16K tokens take a few hundred ms to a couple of seconds.
    assert 0.3 < preset.prefill_s(16_384) < 2.5


@pytest.mark.parametrize("name", sorted(PRESETS))
@given(counts, counts, counts, st.integers(min_value=1, max_value=1000))
def test_step_time_is_monotone_in_prefill_batch_and_context(
    name: str, p: int, d: int, c: int, k: int
) -> None:
    preset = get_preset(name)
    t = preset.step_duration(p, d, c)
    assert t >= 0.0
    assert preset.step_duration(p + k, d, c) >= t
    assert preset.step_duration(p, d + k, c) >= t
    assert preset.step_duration(p, d, c + k) >= t


@pytest.mark.parametrize("name", ["llama-8b-h100", "qwen3-32b-2xh100", "tiny"])
def test_real_presets_grow_strictly_with_work(name: str) -> None:
    preset = get_preset(name)
    assert preset.step_duration(0, 0, 0) == 0.0
    assert 0 < preset.step_duration(100, 0, 0) < preset.step_duration(200, 0, 0)
    assert preset.decode_step_s(1, 100) < preset.decode_step_s(64, 100)


def test_instant_takes_no_time() -> None:
    assert get_preset("instant").step_duration(8192, 1024, 10**6) == 0.0


def test_replace_overrides_one_field_and_validates() -> None:
    small = replace(get_preset("tiny"), num_gpu_blocks=8)
    assert small.kv_capacity_tokens == 128
    with pytest.raises(ValueError):
        replace(small, num_gpu_blocks=0)
    with pytest.raises(ValueError):
        replace(small, s_per_prefill_token=-1.0)


def test_prefill_time_counts_one_step_per_chunk() -> None:
    preset: Preset = get_preset("llama-8b-h100")
    one_chunk = preset.prefill_s(8192)
    assert preset.prefill_s(8193) == pytest.approx(one_chunk + preset.base_s + preset.s_per_prefill_token)
