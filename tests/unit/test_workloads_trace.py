"""Mooncake trace replay (load/trace.py): block text, prefix sharing, parsing errors, the sample trace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from load.trace import (
    BLOCK_CHARS,
    SAMPLE_TRACE,
    MooncakeRecord,
    TraceFormatError,
    load_mooncake,
    mooncake_block,
    mooncake_requests,
    parse_mooncake,
    sample_mooncake_records,
)
from load.workloads.text import WORDS
from router.index.chunking import hash_text


def line(ts: float, inp: int, out: int, ids: list[int]) -> str:
    return json.dumps({"timestamp": ts, "input_length": inp, "output_length": out, "hash_ids": ids})


def prompts(*lines: str) -> list[str]:
    reqs = mooncake_requests(parse_mooncake(lines))
    return [r.prompt or "" for r in reqs]


def common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def test_blocks_are_fixed_per_id_and_differ_in_their_first_chunk() -> None:
    assert mooncake_block(12345) == mooncake_block(12345)
    assert all(len(mooncake_block(i)) == BLOCK_CHARS == 2048 for i in (0, 1, 255, 256, 10**9))
    heads = {mooncake_block(i)[:64] for i in range(2000)}
    assert len(heads) == 2000
    for hash_id in (0, 7, 256, 65_537, 123_456_789):  # the first four words spell the id, base 256
        digits = [WORDS.index(w) for w in mooncake_block(hash_id).split()[:4]]
        assert sum(d * 256**i for i, d in enumerate(digits)) == hash_id


@settings(max_examples=25, deadline=None)
@given(
    shared=st.lists(st.integers(0, 10**6), min_size=0, max_size=4, unique=True),
    tails=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    partial=st.tuples(st.integers(1, 512), st.integers(1, 512)),
)
def test_requests_sharing_k_ids_share_exactly_k_blocks(
    shared: list[int], tails: tuple[int, int], partial: tuple[int, int]
) -> None:
    k = len(shared)
    own_a = [2 * 10**6 + i for i in range(tails[0])]  # ids no other request holds
    own_b = [3 * 10**6 + i for i in range(tails[1])]
    ids_a, ids_b = shared + own_a, shared + own_b
    len_a = (len(ids_a) - 1) * 512 + partial[0]
    len_b = (len(ids_b) - 1) * 512 + partial[1]
    a, b = prompts(line(0, len_a, 10, ids_a), line(5, len_b, 10, ids_b))
    assert (len(a), len(b)) == (len_a * 4, len_b * 4)
    assert a[: k * BLOCK_CHARS] == b[: k * BLOCK_CHARS]
    assert k * BLOCK_CHARS <= common_prefix(a, b) < k * BLOCK_CHARS + 64
    ha, hb = hash_text(a, "m"), hash_text(b, "m")
    matched = next((i for i, (x, y) in enumerate(zip(ha.chained, hb.chained, strict=False)) if x != y), None)
    # every 64-character chunk of the shared blocks matches, and the first chunk after them does not
    assert matched == k * BLOCK_CHARS // 64 or (matched is None and min(len(ha), len(hb)) == k * 32)


def test_prompt_length_follows_input_length_whatever_the_ids() -> None:
    few, many, exact = prompts(line(0, 2000, 1, [1]), line(1, 600, 1, [1, 2, 3, 4]), line(2, 1024, 1, [1, 2]))
    assert (len(few), len(many), len(exact)) == (8000, 2400, 4096)
    assert few[:BLOCK_CHARS] == many[:BLOCK_CHARS] == mooncake_block(1)
    assert many[BLOCK_CHARS:] == mooncake_block(2)[:352]  # the last block is partial
    assert exact == mooncake_block(1) + mooncake_block(2)
    # filler for missing ids is unique to its line: two such lines share no chunk past block 1
    a, b = prompts(line(0, 2000, 1, [1]), line(1, 2000, 1, [1]))
    assert common_prefix(a, b) < BLOCK_CHARS + 64


def test_requests_replay_in_timestamp_order_relative_to_the_first() -> None:
    text = "\n".join([line(5000, 10, 7, [1]), "", "   ", line(3000, 10, 0, [2]), line(3500, 10, 9, [3])])
    reqs = mooncake_requests(parse_mooncake(text.splitlines()), "m", speedup=2.0)
    assert [(r.request_id, r.arrival_s) for r in reqs] == [
        ("mooncake-4", 0.0),
        ("mooncake-5", 0.25),
        ("mooncake-1", 1.0),
    ]
    assert [r.max_tokens for r in reqs] == [1, 9, 7]  # output_length 0 still asks for one token
    assert all(r.model == "m" and r.kind == "completion" for r in reqs)
    assert [r.group for r in reqs] == ["b2", "b3", "b1"]


BAD_LINES = [
    ("{not json", "not JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"timestamp": 0, "input_length": 5}', "missing output_length, hash_ids"),
    (line(0, 0, 1, [1]), "input_length must be an integer >= 1"),
    ('{"timestamp": 0, "input_length": 5.5, "output_length": 1, "hash_ids": [1]}', "input_length"),
    (line(0, 5, -1, [1]), "output_length must be an integer >= 0"),
    ('{"timestamp": "now", "input_length": 5, "output_length": 1, "hash_ids": [1]}', "timestamp"),
    ('{"timestamp": true, "input_length": 5, "output_length": 1, "hash_ids": [1]}', "timestamp"),
    ('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1, -2]}', "hash_ids"),
    ('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": "1"}', "hash_ids"),
]


@pytest.mark.parametrize(("bad", "problem"), BAD_LINES)
def test_malformed_lines_are_rejected_naming_their_line(tmp_path: Path, bad: str, problem: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(line(0, 10, 1, [1]) + "\n\n" + bad + "\n" + line(1, 10, 1, [1]) + "\n")
    with pytest.raises(TraceFormatError, match=f"t.jsonl:3: .*{problem}") as err:
        load_mooncake(path)
    assert err.value.line == 3


def test_limit_reads_only_the_first_records(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join([line(0, 10, 1, [1]), line(1, 10, 1, [2]), "{broken"]))
    assert [r.request_id for r in load_mooncake(path, limit=2)] == ["mooncake-1", "mooncake-2"]
    with pytest.raises(TraceFormatError):
        load_mooncake(path)


def test_sample_trace_is_the_generator_output_with_mooncake_like_sharing() -> None:
    records = sample_mooncake_records()
    assert SAMPLE_TRACE.read_text() == "".join(r.to_json() + "\n" for r in records)
    parsed = list(parse_mooncake(SAMPLE_TRACE.read_text().splitlines()))
    assert parsed == records and len(records) == 200
    seen: set[int] = set()
    hits = total = 0
    for rec in records:
        hits += sum(i in seen for i in rec.hash_ids)
        total += len(rec.hash_ids)
        seen.update(rec.hash_ids)
        assert len(rec.hash_ids) == -(-rec.input_length // 512)
    assert 0.40 <= hits / total <= 0.66  # anchors.md: Mooncake traces' cache ratios are 40-66%
    reqs = load_mooncake(SAMPLE_TRACE, "m")
    assert [r.prompt_chars for r in reqs] == [4 * r.input_length for r in records]


def test_records_round_trip_through_json() -> None:
    rec = MooncakeRecord(1, 1500.0, 700, 20, (4, 5))
    assert next(parse_mooncake([rec.to_json()])) == rec
    assert json.loads(MooncakeRecord(1, 2.5, 1, 1, ()).to_json())["timestamp"] == 2.5
