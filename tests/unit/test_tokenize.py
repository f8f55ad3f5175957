"""LocalTokenizer (router/tokenize.py) on the tiny vLLM model's tokenizer, and the token views.

The tokenizer is workers/vllm/tiny_model.py's (`train_tokenizer`, trained smaller here, and
`save_tokenizer`: tokenizer.json + tokenizer_config.json with CHAT_TEMPLATE, no transformers), the one
the real-vLLM tier serves. The expectations are independent of the code under test: the chat rendering
is written out by hand from the template's text, and ids come from `tokenizers.Tokenizer.encode` of
that rendering.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from router.config import ConfigError, RouterConfig
from router.index.chunking import hash_text, hash_tokens
from router.openai_request import parse_body
from router.policies.base import estimate_tokens
from router.server import RouterServer
from router.tokenize import LocalTokenizer, TokenizeError, vllm_conversation
from workers.vllm import tiny_model

BOS, EOS, END = "<s>", "</s>", "<|end|>"


def by_hand(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """tiny_model.CHAT_TEMPLATE rendered by hand."""
    out = BOS
    for m in messages:
        out += f"<|start|>{m['role']}<|sep|>{m['content']}{END}"
    if add_generation_prompt:
        out += "<|start|>assistant<|sep|>"
    return out


# Llama-3-like, written over several lines with indented tags: the rendering below holds only with
# trim_blocks (the newline after a tag goes) and lstrip_blocks (the spaces before a tag go).
MULTILINE_TEMPLATE = """{{ bos_token }}{% for message in messages %}
  {% if message['role'] not in ['system', 'user', 'assistant'] %}
    {{ raise_exception('roles must be system, user or assistant') }}
  {% endif %}
<|start_header_id|>{{ message['role'] }}<|end_header_id|>

{{ message['content'] | trim }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}
<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""


def multiline_by_hand(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """MULTILINE_TEMPLATE rendered by hand (bos_token BOS, eos_token EOS)."""
    out = BOS
    for m in messages:
        out += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}{EOS}\n"
    if add_generation_prompt:
        out += "<|start_header_id|>assistant<|end_header_id|>\n\n"
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Tokenizer]:
    """The tiny model's tokenizer with fewer merges and a shorter corpus (same specials, `<s>`
    post-processor and chat template), saved as a folder."""
    tok = tiny_model.train_tokenizer(6, vocab_size=512, lines=300)
    return tiny_model.save_tokenizer(tok, tmp_path_factory.mktemp("tok")), tok


CHAT = [
    {"role": "system", "content": "You are the kato rimen assistant. "},
    {"role": "user", "content": "  loka sa verest the ing?"},
]


async def test_completions_are_encoded_with_the_bos_of_the_post_processor(
    trained: tuple[Path, Tokenizer],
) -> None:
    folder, tok = trained
    local = LocalTokenizer(folder)
    text = "kato rimen salo of the verest"
    ids = await local.completion_ids("m", text, {})
    bos = tok.token_to_id(BOS)
    assert ids == tok.encode(text).ids and ids[0] == bos and ids.count(bos) == 1
    assert await local.completion_ids("m", text, {"add_special_tokens": False}) == ids[1:]
    # The same from a tokenizer.json path (no chat template there).
    assert await LocalTokenizer(folder / "tokenizer.json").completion_ids("m", text, {}) == ids
    await local.close()


async def test_chat_renders_the_template_as_transformers_does_and_encodes_without_specials(
    trained: tuple[Path, Tokenizer],
) -> None:
    folder, tok = trained
    local = LocalTokenizer(folder)
    assert local.render_chat(CHAT) == by_hand(CHAT)
    ids = await local.chat_ids("m", CHAT, {})
    assert ids == tok.encode(by_hand(CHAT), add_special_tokens=False).ids
    assert ids[0] == tok.token_to_id(BOS) and ids.count(tok.token_to_id(BOS)) == 1  # the template's only
    assert ids.count(tok.token_to_id(END)) == 2  # special tokens are single ids
    no_prompt = await local.chat_ids("m", CHAT, {"add_generation_prompt": False})
    assert no_prompt == tok.encode(by_hand(CHAT, False), add_special_tokens=False).ids
    assert ids[: len(no_prompt)] == no_prompt  # the generation prompt only appends
    assert await local.chat_ids("m", CHAT, {"add_special_tokens": True}) == tok.encode(by_hand(CHAT)).ids
    await local.close()


async def test_text_content_parts_join_with_newlines_as_vllm_does(trained: tuple[Path, Tokenizer]) -> None:
    folder, _ = trained
    local = LocalTokenizer(folder)
    parts = [{"role": "user", "content": [{"type": "text", "text": "kato"}, {"type": "text", "text": "ri"}]}]
    joined = [{"role": "user", "content": "kato\nri"}]
    assert await local.chat_ids("m", parts, {}) == await local.chat_ids("m", joined, {})
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(TokenizeError) as err:
        await local.chat_ids("m", image, {})
    assert err.value.reason == "unsupported"
    await local.close()


def test_vllm_conversation_normalises_without_touching_the_request() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    messages = [
        {"role": "assistant", "content": None, "tool_calls": [call], "extra": 1},
        {"role": "tool", "content": "42", "tool_call_id": "c1", "name": "f"},
    ]
    before = json.dumps(messages)
    conv = vllm_conversation(messages)
    assert conv[0] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{**call, "function": {"name": "f", "arguments": {"a": 1}}}],
    }
    assert conv[1] == {"role": "tool", "content": "42", "tool_call_id": "c1", "name": "f"}
    assert json.dumps(messages) == before


@pytest.mark.parametrize(
    ("messages", "options", "reason"),
    [
        (CHAT, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "unsupported"),
        (CHAT, {"continue_final_message": True}, "unsupported"),
        (CHAT, {"add_generation_prompt": "yes"}, "unsupported"),
        (CHAT, {"chat_template_kwargs": ["x"]}, "unsupported"),
    ],
)
async def test_what_cannot_be_reproduced_fails_with_a_reason(
    trained: tuple[Path, Tokenizer],
    messages: list[dict[str, object]],
    options: dict[str, object],
    reason: str,
) -> None:
    local = LocalTokenizer(trained[0])
    with pytest.raises(TokenizeError) as err:
        await local.chat_ids("m", messages, options)
    assert err.value.reason == reason
    await local.close()


async def test_no_chat_template_means_chat_is_unsupported(trained: tuple[Path, Tokenizer]) -> None:
    local = LocalTokenizer(trained[0] / "tokenizer.json")
    with pytest.raises(TokenizeError) as err:
        await local.chat_ids("m", CHAT, {})
    assert err.value.reason == "unsupported"
    with pytest.raises(TokenizeError) as err:
        await local.completion_ids("m", "x", {"truncate_prompt_tokens": 4})
    assert err.value.reason == "unsupported"
    await local.close()


async def test_long_inputs_encode_in_a_thread_to_the_same_ids(trained: tuple[Path, Tokenizer]) -> None:
    folder, tok = trained
    inline, threaded = LocalTokenizer(folder), LocalTokenizer(folder, thread_above_chars=8)
    text = "kato rimen salo of the verest " * 50
    assert await threaded.completion_ids("m", text, {}) == await inline.completion_ids("m", text, {})
    assert await threaded.chat_ids("m", CHAT, {}) == tok.encode(by_hand(CHAT), add_special_tokens=False).ids
    await inline.close()
    await threaded.close()


async def test_chat_template_jinja_file_and_named_templates(
    tmp_path: Path, trained: tuple[Path, Tokenizer]
) -> None:
    folder, _ = trained
    named = tmp_path / "named"
    named.mkdir()
    (named / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    config = {
        "bos_token": BOS,
        "chat_template": [
            {"name": "tool_use", "template": "T"},
            {"name": "default", "template": "D{{ bos_token }}"},
        ],
    }
    (named / "tokenizer_config.json").write_text(json.dumps(config))
    assert LocalTokenizer(named).render_chat(CHAT) == "D" + BOS
    (named / "chat_template.jinja").write_text("J{% for m in messages %}{{ m['role'] }}{% endfor %}")
    assert LocalTokenizer(named).render_chat(CHAT) == "Jsystemuser"


def _folder(tmp: Path, tokenizer_json: bytes | None, config: str | None) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    if tokenizer_json is not None:
        (tmp / "tokenizer.json").write_bytes(tokenizer_json)
    if config is not None:
        (tmp / "tokenizer_config.json").write_text(config)
    return tmp


async def test_templates_compile_and_render_as_transformers_does(
    tmp_path: Path, trained: tuple[Path, Tokenizer]
) -> None:
    """trim_blocks and lstrip_blocks, the `trim` filter, raise_exception, and a special token stored in
    tokenizer_config.json as an AddedToken mapping (MULTILINE_TEMPLATE over the same tokenizer.json)."""
    folder, tok = trained
    eos = {"__type": "AddedToken", "content": EOS, "lstrip": False, "normalized": False, "rstrip": False}
    config = {"bos_token": BOS, "eos_token": eos, "chat_template": MULTILINE_TEMPLATE}
    multiline = _folder(tmp_path / "multiline", (folder / "tokenizer.json").read_bytes(), json.dumps(config))
    local = LocalTokenizer(multiline)
    assert local.render_chat(CHAT) == multiline_by_hand(CHAT)
    assert local.render_chat(CHAT, {"add_generation_prompt": False}) == multiline_by_hand(CHAT, False)
    ids = await local.chat_ids("m", CHAT, {})
    assert ids == tok.encode(multiline_by_hand(CHAT), add_special_tokens=False).ids
    assert ids.count(tok.token_to_id(EOS)) == 2  # the AddedToken's content reached the template
    with pytest.raises(TokenizeError) as err:
        await local.chat_ids("m", [{"role": "tool", "content": "x"}], {})
    assert err.value.reason == "template_error"  # the template's raise_exception
    await local.close()


def test_bad_paths_fail_at_startup_with_a_clear_error(
    tmp_path: Path, trained: tuple[Path, Tokenizer]
) -> None:
    good = (trained[0] / "tokenizer.json").read_bytes()
    cases: list[tuple[Path, str]] = [
        (_folder(tmp_path / "empty", None, None), "no tokenizer.json there"),
        (_folder(tmp_path / "garbage", b"{not json", None), "not a loadable tokenizer.json"),
        (_folder(tmp_path / "badconfig", good, "{"), "cannot read it"),
        (_folder(tmp_path / "notobject", good, "[1]"), "must be a JSON object"),
        (
            _folder(tmp_path / "badtemplate", good, json.dumps({"chat_template": "{% for %}"})),
            "does not compile",
        ),
        (
            _folder(tmp_path / "badlist", good, json.dumps({"chat_template": [{"name": "x"}]})),
            "chat_template must",
        ),
    ]
    for path, message in cases:
        with pytest.raises(ConfigError, match=message):
            LocalTokenizer(path)
    # Through the router: building it loads the tokenizer, so a bad one stops the start.
    with pytest.raises(ConfigError, match=r"not a loadable tokenizer\.json"):
        RouterServer(RouterConfig(tokenizer=str(tmp_path / "garbage")))
    with pytest.raises(ConfigError, match="no such file or folder"):
        RouterConfig(tokenizer=str(tmp_path / "missing"))


# -- the request's token view (router/openai_request.py) ------------------------------------------


@pytest.mark.parametrize("block_size", [4, 16])
def test_a_token_view_hashes_exactly_as_hash_tokens(block_size: int) -> None:
    ids = list(range(100, 150))
    parsed = parse_body(
        json.dumps({"model": "m", "prompt": "some text", "cache_salt": "s"}).encode(), "completions"
    )
    view = parsed.view("r1", chunk_chars=64, block_size=block_size, token_ids=ids)
    expected = hash_tokens(ids, "m", block_size=block_size, cache_salt="s")
    assert view.hashes.chained == expected.chained and view.hashes.unit == "token"
    assert view.prompt_tokens == 50 and view.token_ids == tuple(ids) and view.text == "some text"
    assert view.cached_tokens(2) == 2 * block_size  # the meters count tokens
    text_view = parsed.view("r1", chunk_chars=4, block_size=block_size)  # without ids: as before
    assert text_view.hashes.chained == hash_text("some text", "m", cache_salt="s", chunk_chars=4).chained


def test_a_token_view_of_chat_and_of_a_batch() -> None:
    messages = [{"role": "user", "content": "hello there"}]
    chat = parse_body(json.dumps({"model": "m", "messages": messages}).encode(), "chat")
    view = chat.view("r", chunk_chars=64, block_size=2, token_ids=[1, 2, 3])
    assert view.first_user_text == "hello there" and view.prompt_tokens == 3
    assert view.hashes.chained == hash_tokens([1, 2, 3], "m", block_size=2).chained
    batch = parse_body(json.dumps({"model": "m", "prompt": ["a" * 40, "b" * 40]}).encode(), "completions")
    view = batch.view("r", chunk_chars=64, block_size=2, token_ids=[7] * 5)
    assert view.prompt_tokens == 5 + estimate_tokens("b" * 40)  # the first exact, the others estimated


def test_only_the_fields_that_change_ids_are_kept_for_the_tokenizer() -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "x"}],
        "add_generation_prompt": False,
        "tools": None,  # null is vLLM's default: nothing to honour
        "temperature": 0.5,
    }
    assert parse_body(json.dumps(body).encode(), "chat").token_options == {"add_generation_prompt": False}
    plain = parse_body(
        json.dumps({"model": "m", "prompt": "x", "add_special_tokens": False}).encode(), "completions"
    )
    assert plain.token_options == {"add_special_tokens": False}
    assert (
        parse_body(json.dumps({"model": "m", "prompt": [1, 2]}).encode(), "completions").needs_tokens is False
    )
