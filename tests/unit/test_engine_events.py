"""Property: under random traffic, an index rebuilt from the KV events alone agrees with the cache."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from workers.engine import AllBlocksCleared, BlockRemoved, BlockStored, Engine, KVEvent, get_preset

Op = tuple[int | str, ...]

ops = st.lists(
    st.one_of(
        # submit: prefix group, shared prefix length, own suffix length, max_tokens
        st.tuples(
            st.just("submit"), st.integers(0, 3), st.integers(0, 60), st.integers(1, 40), st.integers(1, 20)
        ),
        st.tuples(st.just("step"), st.integers(1, 6)),
        st.tuples(st.just("abort"), st.integers(0, 40)),
        st.tuples(st.just("import"), st.integers(0, 3), st.integers(0, 90)),
        st.tuples(st.just("reset")),
    ),
    max_size=40,
)


class EventIndex:
    """What a router learns from events: hash -> number of blocks holding it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.counts: Counter[int] = Counter()

    def apply(self, events: list[KVEvent]) -> None:
        hasher = self.engine.hasher
        bs = self.engine.block_size
        for event in events:
            if isinstance(event, BlockStored):
                assert event.block_size == bs and event.medium == "GPU"
                assert len(event.token_ids) == bs * len(event.block_hashes)
                # The parent is cached right now (a request or the import holds it), and the chain
                # can be recomputed from the event alone, as llm-d's precise index does.
                assert event.parent_block_hash is None or self.counts[event.parent_block_hash] > 0
                parent = event.parent_block_hash
                for i, h in enumerate(event.block_hashes):
                    assert hasher.hash_block(parent, event.token_ids[i * bs : (i + 1) * bs]) == h
                    parent = h
                self.counts.update(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                for h in event.block_hashes:
                    assert self.counts[h] > 0, "removed a hash the index never saw stored"
                    self.counts[h] -= 1
            else:
                assert isinstance(event, AllBlocksCleared)
                self.counts.clear()

    def check(self) -> None:
        self.apply(self.engine.drain_events())
        assert +self.counts == self.engine.pool.cached_block_counts()


def tokens_for(group: int, shared: int, own: int, salt: int) -> list[int]:
    return [group * 1000 + i for i in range(shared)] + [100_000 + salt * 100 + i for i in range(own)]


@settings(max_examples=150, deadline=None)
@given(
    ops,
    st.integers(8, 24),
    st.sampled_from([16, 40, 512]),
    st.integers(1, 6),
)
def test_index_from_events_agrees_with_the_cache(ops: list[Op], blocks: int, budget: int, seqs: int) -> None:
    preset = replace(
        get_preset("tiny"), num_gpu_blocks=blocks, max_num_batched_tokens=budget, max_num_seqs=seqs
    )
    engine = Engine(preset, enable_kv_cache_events=True)
    index = EventIndex(engine)
    now = 0.0
    expected: dict[str, int] = {}
    done: dict[str, int] = {}

    def step() -> None:
        nonlocal now
        result = engine.step(now)
        now = result.end
        for f in result.finished:
            done[f.request_id] = f.completion_tokens

    for n, op in enumerate(ops):
        kind = op[0]
        if kind == "submit":
            _, group, shared, own, max_tokens = op
            assert isinstance(group, int) and isinstance(shared, int) and isinstance(own, int)
            assert isinstance(max_tokens, int)
            engine.submit(f"r{n}", tokens_for(group, shared, own, n), max_tokens, now)
            expected[f"r{n}"] = max_tokens
        elif kind == "step":
            assert isinstance(op[1], int)
            for _ in range(op[1]):
                step()
        elif kind == "abort":
            if engine.abort(f"r{op[1]}"):
                expected.pop(f"r{op[1]}")
        elif kind == "import":
            _, group, shared = op
            assert isinstance(group, int) and isinstance(shared, int)
            engine.import_prefix(tokens_for(group, shared, 0, 0), now)
        else:
            engine.reset_prefix_cache()
        engine.pool.check_invariants()
        assert 0.0 <= engine.metrics().kv_cache_usage_perc <= 1.0
        index.check()

    for _ in range(10_000):
        if not engine.has_work():
            break
        step()
        engine.pool.check_invariants()
        index.check()
    assert not engine.has_work()
    assert done == expected  # every request that was not aborted generated exactly max_tokens
    assert engine.metrics().kv_cache_usage_perc == 0.0
