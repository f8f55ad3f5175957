"""Token-precise mode through the proxy: requests hashed in the token blocks the replicas compute.

`tokenizer="replica"` in front of an emulated fleet (whose /tokenize is the tokenizer its engine uses),
and a local tokenizer folder: the tiny vLLM model's tokenizer (workers/vllm/tiny_model.py), trained
smaller here. What is checked is observable from outside: the router's prefix index
(`router.fleet.index`), its /metrics, and the bytes a replica received.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fake_upstream import FakeFactory, RouterFactory, metric, post, scrape
from tokenizers import Tokenizer

from router.config import ConfigError
from router.forward import REPLICA_HEADER
from router.index.chunking import hash_chat, hash_text, hash_tokens
from router.server import RouterServer
from router.tokenize import ReplicaTokenizer, TokenizeError
from workers.emulator import EmulatedFleet, Faults
from workers.vllm import tiny_model

BLOCK = 16  # the "tiny" preset's block size
SYSTEM = "You are the support assistant of a bicycle shop. Answer politely and briefly. " * 12


@pytest.fixture
async def emulated() -> AsyncIterator[EmulatedFleet]:
    async with EmulatedFleet(2, "tiny") as fleet:
        yield fleet


async def start(routers: RouterFactory, fleet: EmulatedFleet, **overrides: Any) -> RouterServer:
    return await routers(*((f"r{i}", url) for i, url in enumerate(fleet.urls)), block_size=BLOCK, **overrides)


def messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


async def replica_ids(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> list[int]:
    """The ids the replica itself computes (its /tokenize), for the expectations."""
    async with http.post(url + "/tokenize", json=body) as resp:
        assert resp.status == 200
        ids: list[int] = (await resp.json())["tokens"]
        return ids


def held(router: RouterServer, chained: tuple[int, ...]) -> dict[str, int]:
    return router.fleet.index.longest_match(chained)


def fully_held(router: RouterServer, chained: tuple[int, ...]) -> bool:
    return len(chained) > 0 and max(held(router, chained).values(), default=0) == len(chained)


async def test_chat_and_text_are_hashed_in_the_replicas_token_blocks(
    emulated: EmulatedFleet, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    router = await start(routers, emulated, tokenizer="replica")
    model, url = emulated.model, emulated.urls[0]
    chat = {"model": model, "messages": messages("Where is my order?"), "max_tokens": 4}
    status, headers, _ = await post(http, router.url + "/v1/chat/completions", chat)
    assert status == 200
    ids = await replica_ids(http, url, {"model": model, "messages": chat["messages"]})
    expected = hash_tokens(ids, model, block_size=BLOCK)
    assert len(expected) >= 10
    assert held(router, expected.chained) == {headers[REPLICA_HEADER]: len(expected)}
    assert held(router, hash_chat(chat["messages"], model).chained) == {}  # not the text hashes

    prompt = "Once upon a time, in a shop full of bicycles, " * 8
    status, headers, _ = await post(
        http, router.url + "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 4}
    )
    assert status == 200
    text_ids = await replica_ids(http, url, {"model": model, "prompt": prompt})
    expected_text = hash_tokens(text_ids, model, block_size=BLOCK)
    assert held(router, expected_text.chained) == {headers[REPLICA_HEADER]: len(expected_text)}

    text = await scrape(http, router.url)
    assert metric(text, "router_prompt_tokens_total") == len(ids) + len(text_ids)  # exact, not chars/4
    assert metric(text, "router_tokenize_seconds_count") == 2
    assert metric(text, "router_tokenize_failures_total") == 0

    # A token-id prompt is hashed as it always was, without a tokenizer round trip.
    status, _, _ = await post(
        http, router.url + "/v1/completions", {"model": model, "prompt": text_ids[:40], "max_tokens": 2}
    )
    assert status == 200
    assert metric(await scrape(http, router.url), "router_tokenize_seconds_count") == 2


async def test_a_shared_prefix_goes_back_and_the_expected_hit_is_the_physical_one(
    emulated: EmulatedFleet, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    router = await start(routers, emulated, tokenizer="replica")
    chosen = []
    for question in ("Do you sell helmets?", "When do you open on Sundays?"):
        body = {"model": emulated.model, "messages": messages(question), "max_tokens": 4}
        status, headers, _ = await post(http, router.url + "/v1/chat/completions", body)
        assert status == 200
        chosen.append(headers[REPLICA_HEADER])
    assert chosen[0] == chosen[1]
    text = await scrape(http, router.url)
    physical = metric(text, "router_physical_cached_tokens_total")
    # The index holds the replica's own blocks, so its prediction is what the replica reused, token
    # for token (with text chunks it is an estimate from characters / 4).
    assert physical >= len(SYSTEM) // 4 - BLOCK
    assert metric(text, "router_expected_cached_tokens_total") == physical


async def test_a_failed_tokenize_falls_back_to_text_hashing_and_the_request_succeeds(
    emulated: EmulatedFleet, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    # No probes after the first and no ejections: the stopped replica stays a candidate, so the
    # tokenizer's turn comes to it (the two replicas take turns) and it fails to connect.
    router = await start(routers, emulated, tokenizer="replica", breaker_failures=1000, health_interval_s=60)
    await emulated.replicas[0].stop()
    bodies = [
        {
            "model": emulated.model,
            "messages": messages(f"Question {i}: " + "what about your bikes and helmets? " * 4),
            "max_tokens": 4,
        }
        for i in range(2)
    ]
    for body in bodies:
        status, _, _ = await post(http, router.url + "/v1/chat/completions", body)
        assert status == 200  # retried on r1 if routed to r0
    text = await scrape(http, router.url)
    assert metric(text, "router_tokenize_failures_total", reason="connect_error") == 1
    assert metric(text, "router_tokenize_failures_total") == 1
    assert metric(text, "router_tokenize_seconds_count") == 2
    # Exactly one was hashed as text (all its chunks indexed), the one whose tokenization failed; the
    # other in the replica's token blocks. (They share the system prompt, hence whole-chain checks.)
    as_text = [fully_held(router, hash_chat(b["messages"], emulated.model).chained) for b in bodies]
    assert sorted(as_text) == [False, True]
    ok = bodies[as_text.index(False)]
    ids = await replica_ids(http, emulated.urls[1], {"model": emulated.model, "messages": ok["messages"]})
    assert fully_held(router, hash_tokens(ids, emulated.model, block_size=BLOCK).chained)


async def test_a_replica_without_tokenize_is_counted_and_served(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    fake = await fakes("a")  # answers generations, and 404 on /tokenize (it is not vLLM)
    router = await routers(fake, tokenizer="replica")
    status, _, _ = await post(http, router.url + "/v1/completions", {"model": "fake-model", "prompt": "hi"})
    assert status == 200
    text = await scrape(http, router.url)
    assert metric(text, "router_tokenize_failures_total", reason="http_status") == 1


async def test_a_reload_turns_token_precise_mode_on_and_refuses_a_tokenizer_that_does_not_load(
    emulated: EmulatedFleet, routers: RouterFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    router = await start(routers, emulated)
    body = {"model": emulated.model, "prompt": "A prompt of a few dozen characters, " * 4, "max_tokens": 2}
    assert (await post(http, router.url + "/v1/completions", body))[0] == 200
    assert metric(await scrape(http, router.url), "router_tokenize_seconds_count") == 0  # text mode
    await router.reload(replace(router.config, tokenizer="replica"))
    assert (await post(http, router.url + "/v1/completions", body))[0] == 200
    assert metric(await scrape(http, router.url), "router_tokenize_seconds_count") == 1
    (tmp_path / "tokenizer.json").write_text("[]")
    with pytest.raises(ConfigError, match="not a loadable"):
        await router.reload(replace(router.config, tokenizer=str(tmp_path)))
    assert router.config.tokenizer == "replica"  # the running configuration stays
    assert (await post(http, router.url + "/v1/completions", body))[0] == 200
    assert metric(await scrape(http, router.url), "router_tokenize_seconds_count") == 2


async def test_replica_tokenizer_timeout_and_no_replica(emulated: EmulatedFleet) -> None:
    await emulated.replicas[0].set_faults(Faults(latency_s=1.0))
    async with aiohttp.ClientSession() as session:
        slow = ReplicaTokenizer(lambda: session, lambda model: emulated.urls[:1], timeout_s=0.1)
        with pytest.raises(TokenizeError) as err:
            await slow.completion_ids(emulated.model, "hello", {})
        assert err.value.reason == "timeout"
        none = ReplicaTokenizer(lambda: session, lambda model: [])
        with pytest.raises(TokenizeError) as err:
            await none.chat_ids(emulated.model, messages("x"), {})
        assert err.value.reason == "no_replica"
        # The request's own fields reach /tokenize: without the generation prompt, fewer ids.
        fast = ReplicaTokenizer(lambda: session, lambda model: emulated.urls[1:])
        full = await fast.chat_ids(emulated.model, messages("x"), {})
        bare = await fast.chat_ids(emulated.model, messages("x"), {"add_generation_prompt": False})
        assert len(bare) < len(full) and full[: len(bare) - 1] == bare[:-1]  # 4-character groups


# -- a local tokenizer ----------------------------------------------------------------------------

BOS = "<s>"


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny vLLM model's tokenizer (workers/vllm/tiny_model.py), trained smaller: a byte-level BPE,
    a `<s>` post-processor and its chat template, saved without transformers."""
    tok = tiny_model.train_tokenizer(1, vocab_size=512, lines=300)
    return tiny_model.save_tokenizer(tok, tmp_path_factory.mktemp("tokenizer"))


async def test_a_local_tokenizer_hashes_what_it_encodes_and_forwards_the_body_untouched(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession, tokenizer_folder: Path
) -> None:
    fake = await fakes("a")
    router = await routers(fake, tokenizer=str(tokenizer_folder), block_size=4)
    tok = Tokenizer.from_file(str(tokenizer_folder / "tokenizer.json"))
    prompt = "kato rimen salo the " * 10
    raw = json.dumps({"model": "fake-model", "prompt": prompt, "max_tokens": 2, "cache_salt": "s1"}).encode()
    status, _, _ = await post(http, router.url + "/v1/completions", raw)
    assert status == 200 and fake.generation_requests[-1].body == raw  # byte for byte
    ids = tok.encode(prompt).ids  # with the post-processor's BOS, as vLLM encodes a completion
    assert ids[0] == tok.token_to_id(BOS)
    expected = hash_tokens(ids, "fake-model", block_size=4, cache_salt="s1")
    assert held(router, expected.chained) == {"a": len(expected)}
    assert held(router, hash_text(prompt, "fake-model", cache_salt="s1").chained) == {}

    chat = [{"role": "user", "content": "rimen kato the salo " * 5}]
    status, _, _ = await post(
        http, router.url + "/v1/chat/completions", {"model": "fake-model", "messages": chat, "max_tokens": 2}
    )
    assert status == 200
    rendered = f"{BOS}<|start|>user<|sep|>{chat[0]['content']}<|end|><|start|>assistant<|sep|>"
    chat_ids = tok.encode(rendered, add_special_tokens=False).ids
    assert held(router, hash_tokens(chat_ids, "fake-model", block_size=4).chained) == {
        "a": len(chat_ids) // 4
    }
    text = await scrape(http, router.url)
    assert metric(text, "router_prompt_tokens_total") == len(ids) + len(chat_ids)
    assert metric(text, "router_tokenize_failures_total") == 0


def test_serve_refuses_a_tokenizer_that_does_not_load(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not a tokenizer")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "router.cli",
            "serve",
            "--backend",
            "http://127.0.0.1:9",
            "--tokenizer",
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "not a loadable tokenizer.json" in result.stderr and "Traceback" not in result.stderr
