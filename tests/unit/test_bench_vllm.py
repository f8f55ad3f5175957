"""The logical limit of `kvrouter bench vllm` (load/bench_vllm.py), against counts done by hand."""

from __future__ import annotations

from load.bench_vllm import distinct_blocks, logical_hits


def test_logical_hits_reuse_full_blocks_of_earlier_prompts_and_never_the_last_token() -> None:
    a = list(range(10))  # blocks of 4: [0-3] [4-7], 2 tokens over
    b = [*range(8), 99, 98, 97]  # shares both full blocks of a
    c = list(range(8))  # all of a's blocks, but its last token must be computed: 1 block reusable
    d = [0, 1, 2, 5, 6, 7, 8, 9]  # differs inside the first block: nothing
    assert logical_hits([a], 4) == 0
    assert logical_hits([a, b], 4) == 8
    assert logical_hits([a, c], 4) == 4
    assert logical_hits([a, d], 4) == 0
    assert logical_hits([a, b, c, d], 4) == 8 + 4 + 0


def test_distinct_blocks_count_prefixes_not_contents() -> None:
    a = [1, 2, 3, 4, 5, 6, 7, 8]
    b = [9, 9, 9, 9, 5, 6, 7, 8]  # same second block content, other prefix: another block
    assert distinct_blocks([a], 4) == 2
    assert distinct_blocks([a, a], 4) == 2
    assert distinct_blocks([a, b], 4) == 4
    assert distinct_blocks([[1, 2, 3]], 4) == 0
