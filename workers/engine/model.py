"""The engine model of one vLLM replica: continuous batching over a paged prefix cache. Sans-I/O.

One class, two drivers: the live emulator and the discrete-event simulator. Time is always an argument
(`now`, seconds); nothing here reads a clock, awaits, or starts a thread.

Driving it:
    engine.submit(request_id, prompt_token_ids, max_tokens, now)   # any time
    result = engine.step(now)              # when the previous step has ended and engine.has_work()
    ... deliver result's outputs at result.end = now + result.duration, then drain_events() ...
A step's state changes are applied when `step()` is called; its outputs (tokens, first tokens, finished
requests, the KV events drained after it) must become visible at the END of the step. A step may not
start before the previous one ended. Requests submitted during a step wait for the next one, as in vLLM.
`abort()` applies at once; outputs already returned for an aborted request must be dropped by the driver.

Scheduling, as vLLM V1's Scheduler.schedule() (vllm/v1/core/sched/scheduler.py), FCFS, chunked prefill:
1. RUNNING requests first, in order, each getting min(its uncomputed tokens, remaining token budget):
   1 for a decode, a chunk for a prefill. If its KV blocks cannot be allocated, the LAST running request
   is preempted (recompute: its blocks freed, tail first; it goes back to the HEAD of the waiting
   queue with nothing computed), repeatedly, until the allocation fits or the request preempted itself.
2. Only if nothing was preempted: WAITING requests, FCFS, while budget remains and fewer than
   max_num_seqs run. The prefix cache is looked up (counted in prefix_cache_queries/hits, in tokens,
   every time the head is looked up — vLLM re-counts a head it fails to admit); the hit is the longest
   cached block run but at most (num_tokens - 1) // block_size blocks, because vLLM always recomputes
   at least the last token to get logits, and hits are block-aligned, so a fully cached prompt of
   32 tokens (block 16) hits 16 ("When all tokens hit the cache, we must recompute the last token",
   vllm/v1/core/kv_cache_manager.py). If the blocks for the hit and the chunk do not fit, admission
   stops: the head blocks the queue (FCFS).
3. Blocks become cached as soon as they are full of scheduled tokens (vLLM caches at schedule time), so
   later requests — even in the same step — hit them. Generated tokens fill and cache blocks too.
4. After the step, a request whose scheduled tokens reach its length samples one token: its first token
   at the end of its prefill, then one per step, until max_tokens (EOS is ignored). Finishing frees its
   blocks to the LRU tail, tail block first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from router.index.kv_events import KVEvent
from workers.engine.hashing import DEFAULT_NONE_HASH_SEED, MASK64, BlockHasher, ChainState, HashAlgo
from workers.engine.kv_cache import BlockPool
from workers.engine.outputs import EngineMetrics, FinishedRequest, FirstToken, StepResult
from workers.engine.presets import Preset
from workers.engine.tokenizer import MIX_MUL as _MIX_MUL
from workers.engine.tokenizer import SEED_MUL as _SEED_MUL
from workers.engine.tokenizer import WORD_TOKEN_IDS

_EPS = 1e-9  # float slack when checking that a step does not start before the previous one ended


def output_seed(prompt_token_ids: Sequence[int], prompt_block_hashes: Sequence[int], block_size: int) -> int:
    """The seed of a request's generated tokens: equal prompts generate equal text, as greedy decoding
    would. From the last full block's hash and the tokens after it (hash() of ints is not randomized)."""
    last = prompt_block_hashes[-1] if prompt_block_hashes else 0
    tail = prompt_token_ids[len(prompt_block_hashes) * block_size :]
    return hash((last, tuple(tail))) & MASK64


class _Request:
    __slots__ = (
        "arrival_time",
        "block_hashes",
        "block_ids",
        "chain_state",
        "first_scheduled_time",
        "first_token_time",
        "max_tokens",
        "num_cached_blocks",
        "num_cached_tokens",
        "num_computed",
        "num_output",
        "num_preemptions",
        "num_prompt_tokens",
        "num_scheduled",
        "output_seed",
        "request_id",
        "tokens",
    )

    def __init__(self, request_id: str, tokens: list[int], max_tokens: int, now: float) -> None:
        self.request_id = request_id
        self.tokens = tokens  # prompt, then generated tokens appended
        self.num_prompt_tokens = len(tokens)
        self.max_tokens = max_tokens
        self.arrival_time = now
        self.num_computed = 0
        self.num_scheduled = 0  # tokens scheduled in the current step
        self.num_output = 0
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []  # published hashes of every full block of `tokens`
        self.chain_state: ChainState = 0  # chain state after the last hashed block
        self.num_cached_blocks = 0  # leading blocks of block_ids already in the cache
        self.num_cached_tokens = -1  # hit at first admission; -1 until admitted
        self.num_preemptions = 0
        self.first_scheduled_time = -1.0
        self.first_token_time = -1.0
        self.output_seed = 0


class Engine:
    """One replica: waiting queue, running batch, block pool, time model. See the module docstring."""

    def __init__(
        self,
        preset: Preset,
        *,
        hash_algo: HashAlgo = "mmh3",
        none_hash_seed: str = DEFAULT_NONE_HASH_SEED,
        enable_prefix_caching: bool = True,
        enable_kv_cache_events: bool = False,
        emit_token_ids: bool = True,
    ) -> None:
        self.preset = preset
        self.block_size = preset.block_size
        # A request must fit the cache alone, else it could never be scheduled (vLLM refuses to start
        # when max_model_len exceeds the KV capacity).
        self.max_model_len = min(preset.max_model_len, preset.kv_capacity_tokens)
        self.enable_prefix_caching = enable_prefix_caching
        self.emit_token_ids = emit_token_ids
        self.hasher = BlockHasher(preset.block_size, hash_algo, none_hash_seed=none_hash_seed)
        self.pool = BlockPool(preset.num_gpu_blocks, preset.block_size, enable_events=enable_kv_cache_events)
        self._requests: dict[str, _Request] = {}
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._busy_until = float("-inf")
        self._queries = self._hits = 0
        self._prompt_tokens = self._generation_tokens = 0
        self._num_preemptions = self._num_success = 0

    # -- driver API ------------------------------------------------------------------------------------

    def submit(self, request_id: str, prompt_token_ids: Sequence[int], max_tokens: int, now: float) -> None:
        """Queue a request. ValueError for a duplicate id, an empty prompt, max_tokens < 1, or
        prompt + max_tokens beyond max_model_len (vLLM's 400 for a too-long request)."""
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already in the engine")
        n = len(prompt_token_ids)
        if n == 0 or max_tokens < 1:
            raise ValueError(f"request {request_id!r}: empty prompt or max_tokens < 1")
        if n + max_tokens > self.max_model_len:
            raise ValueError(
                f"request {request_id!r}: {n} prompt + {max_tokens} output tokens exceed "
                f"max_model_len {self.max_model_len}"
            )
        req = _Request(request_id, list(prompt_token_ids), max_tokens, now)
        bs = self.block_size
        req.block_hashes, req.chain_state = self.hasher.extend(self.hasher.root, req.tokens, 0, n // bs)
        req.output_seed = output_seed(req.tokens, req.block_hashes, bs)
        self._requests[request_id] = req
        self._waiting.append(req)

    def abort(self, request_id: str) -> bool:
        """Drop a request now and release its blocks (they stay cached). False if unknown or finished."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        if req.block_ids:
            self.pool.free(reversed(req.block_ids))
            req.block_ids = []
        if req in self._running:
            self._running.remove(req)
        else:
            self._waiting.remove(req)
        return True

    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    def step(self, now: float) -> StepResult:
        """Schedule one batch at `now`, apply it, and return what becomes visible at now + duration."""
        if now < self._busy_until - _EPS:
            raise ValueError(f"step at {now} starts before the previous step ends at {self._busy_until}")
        bs = self.block_size
        pool = self.pool
        budget = self.preset.max_num_batched_tokens
        prefill_tokens = decode_seqs = context_tokens = 0
        scheduled: list[_Request] = []
        preempted: list[str] = []

        running = self._running
        caching = self.enable_prefix_caching
        i = 0
        while i < len(running) and budget > 0:  # the hot loop: one pass over the batch per step
            req = running[i]
            computed = req.num_computed
            n_tokens = len(req.tokens)
            num_new = n_tokens - computed
            if num_new > budget:
                num_new = budget
            upto = computed + num_new  # tokens with KV once this step ran
            if upto > len(req.block_ids) * bs:
                need = -(-upto // bs) - len(req.block_ids)
                new = pool.allocate(need)
                while new is None:
                    victim = running.pop()
                    self._preempt(victim)
                    preempted.append(victim.request_id)
                    if victim is req:
                        break
                    new = pool.allocate(need)
                if new is None:
                    break  # the request preempted itself: nothing after it can be scheduled either
                req.block_ids.extend(new)
            if caching and upto // bs > req.num_cached_blocks:
                self._cache_full_blocks(req, upto)
            if num_new == 1 and upto == n_tokens and req.num_output:
                decode_seqs += 1
                context_tokens += computed
            else:
                prefill_tokens += num_new
            req.num_scheduled = num_new
            scheduled.append(req)
            budget -= num_new
            i += 1

        if not preempted:
            waiting = self._waiting
            max_seqs = self.preset.max_num_seqs
            while waiting and budget > 0 and len(running) < max_seqs:
                req = waiting[0]
                n_tokens = len(req.tokens)
                hit: list[int] = []
                if self.enable_prefix_caching:
                    hit = pool.longest_cached_run(req.block_hashes, (n_tokens - 1) // bs)
                    if req.num_preemptions == 0:  # vLLM counts resumed requests apart (preempted_*)
                        self._queries += n_tokens
                        self._hits += len(hit) * bs
                num_hit = len(hit) * bs
                num_new = min(n_tokens - num_hit, budget)
                need = -(-(num_hit + num_new) // bs) - len(hit)
                evictable = sum(1 for b in hit if pool.ref_count(b) == 0)
                if need + evictable > pool.num_free_blocks:
                    break
                pool.touch(hit)
                new = pool.allocate(need)
                assert new is not None
                waiting.popleft()
                req.block_ids = hit + new
                req.num_cached_blocks = len(hit)
                req.num_computed = num_hit
                if req.num_cached_tokens < 0:
                    req.num_cached_tokens = num_hit
                    req.first_scheduled_time = now
                running.append(req)
                self._cache_full_blocks(req, num_hit + num_new)
                prefill_tokens += num_new
                req.num_scheduled = num_new
                scheduled.append(req)
                budget -= num_new

        duration = self.preset.step_duration(prefill_tokens, decode_seqs, context_tokens)
        end = now + duration
        self._busy_until = end
        return self._finish_step(
            now, duration, scheduled, preempted, prefill_tokens, decode_seqs, context_tokens
        )

    def metrics(self) -> EngineMetrics:
        return EngineMetrics(
            num_requests_running=len(self._running),
            num_requests_waiting=len(self._waiting),
            kv_cache_usage_perc=self.pool.usage,
            prefix_cache_queries=self._queries,
            prefix_cache_hits=self._hits,
            prompt_tokens=self._prompt_tokens,
            generation_tokens=self._generation_tokens,
            num_preemptions=self._num_preemptions,
            request_success=self._num_success,
            block_size=self.block_size,
            num_gpu_blocks=self.pool.num_blocks,
        )

    def drain_events(self) -> list[KVEvent]:
        """KV events since the last drain, in the order they happened (empty unless events are enabled)."""
        return self.pool.drain_events()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (emits AllBlocksCleared). False, changing nothing, while requests
        hold blocks — as vLLM's /reset_prefix_cache refuses then."""
        return self.pool.reset()

    def import_prefix(self, token_ids: Sequence[int], now: float) -> int:
        """Hold the full blocks of `token_ids` as cached and free (P2P KV migration's receiving end),
        emitting BlockStored for the blocks that were missing. Returns the prefix tokens held after."""
        del now  # the import is instantaneous in this model; the driver accounts transfer time
        if not self.enable_prefix_caching:
            return 0
        hashes = self.hasher.hash_prefix(token_ids)
        return self.pool.import_chain(hashes, token_ids) * self.block_size

    def held_prefix_tokens(self, token_ids: Sequence[int]) -> int:
        """Leading tokens of `token_ids` whose blocks this replica caches (what it could export).
        No side effect: neither counted as a query nor refreshing the LRU."""
        hashes = self.hasher.hash_prefix(token_ids)
        return len(self.pool.longest_cached_run(hashes, len(hashes))) * self.block_size

    # -- internals -------------------------------------------------------------------------------------

    def _cache_full_blocks(self, req: _Request, num_tokens: int) -> None:
        """Cache the request's blocks that `num_tokens` scheduled tokens fill (vLLM: at schedule time)."""
        num_full = num_tokens // self.block_size
        if num_full > req.num_cached_blocks and self.enable_prefix_caching:
            self.pool.cache_blocks(
                req.block_ids, req.block_hashes, req.tokens, req.num_cached_blocks, num_full
            )
            req.num_cached_blocks = num_full

    def _preempt(self, req: _Request) -> None:
        self.pool.free(reversed(req.block_ids))
        req.block_ids = []
        req.num_computed = 0
        req.num_cached_blocks = 0
        req.num_preemptions += 1
        self._num_preemptions += 1
        self._waiting.appendleft(req)

    def _finish_step(
        self,
        now: float,
        duration: float,
        scheduled: list[_Request],
        preempted: list[str],
        prefill_tokens: int,
        decode_seqs: int,
        context_tokens: int,
    ) -> StepResult:
        end = now + duration
        bs = self.block_size
        emit = self.emit_token_ids
        new_tokens: list[tuple[str, int]] = []
        first: list[FirstToken] = []
        finished: list[FinishedRequest] = []
        sampled = 0
        seed_mul, mix_mul, words = _SEED_MUL, _MIX_MUL, WORD_TOKEN_IDS
        for req in scheduled:
            computed = req.num_computed + req.num_scheduled
            req.num_computed = computed
            tokens = req.tokens
            if computed < len(tokens):
                continue  # a prefill chunk that is not the last one samples nothing
            # output_token_id(req.output_seed, req.num_output), inlined: this runs once per token
            tok = words[(((req.output_seed ^ (req.num_output * seed_mul)) * mix_mul) & MASK64) >> 58]
            tokens.append(tok)
            req.num_output += 1
            sampled += 1
            n = computed + 1
            if n % bs == 0:  # the new token completed a block: hash it so it can be cached when computed
                hashes, req.chain_state = self.hasher.extend(req.chain_state, tokens, n // bs - 1, n // bs)
                req.block_hashes.extend(hashes)
            if emit:
                new_tokens.append((req.request_id, tok))
            if req.num_output == 1:
                req.first_token_time = end
                self._prompt_tokens += req.num_prompt_tokens
                first.append(
                    FirstToken(
                        req.request_id,
                        req.num_prompt_tokens,
                        req.num_cached_tokens,
                        req.arrival_time,
                        req.first_scheduled_time,
                        end,
                    )
                )
            if req.num_output >= req.max_tokens:
                finished.append(self._finish(req, end))
        self._generation_tokens += sampled
        if finished:
            self._running = [r for r in self._running if r.num_output < r.max_tokens]
        return StepResult(
            start=now,
            duration=duration,
            num_prefill_tokens=prefill_tokens,
            num_decode_seqs=decode_seqs,
            num_context_tokens=context_tokens,
            num_new_tokens=sampled,
            new_tokens=tuple(new_tokens),
            first_tokens=tuple(first),
            finished=tuple(finished),
            preempted=tuple(preempted),
        )

    def _finish(self, req: _Request, end: float) -> FinishedRequest:
        self.pool.free(reversed(req.block_ids))
        req.block_ids = []
        del self._requests[req.request_id]
        self._num_success += 1
        return FinishedRequest(
            request_id=req.request_id,
            prompt_tokens=req.num_prompt_tokens,
            cached_tokens=req.num_cached_tokens,
            completion_tokens=req.num_output,
            num_preemptions=req.num_preemptions,
            arrival_time=req.arrival_time,
            first_token_time=req.first_token_time,
            finish_time=end,
        )
