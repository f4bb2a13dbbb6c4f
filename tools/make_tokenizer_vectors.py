#!/usr/bin/env python3
"""Builds the tokenizer test fixtures in tests/fixtures/tokenizers/ with the Hugging Face
`tokenizers` library (pip install tokenizers), so the C++ tokenizer is checked against the real
implementation rather than against itself.

Each fixture is a tiny byte-level BPE trained on the start of shared/data/calib.txt:
  gpt2         lone ByteLevel(use_regex=True) pre-tokenizer, merges in the legacy "a b" form
  qwen2        NFC + Split(Qwen2 regex) + ByteLevel, chat special tokens, BOS template,
               a normalized (non-special) added token, tokenizer/generation configs for BOS/EOS
  llama3-strip Split(Llama-3 regex) + ByteLevel(add_prefix_space), ignore_merges, added tokens
               with lstrip/rstrip/single_word, Sequence post-processor with prefix and suffix
and vectors.json holds texts with the library's ids (add_special_tokens True and False) and its
decode of those ids.

Usage: python3 tools/make_tokenizer_vectors.py [--calib ../shared/data/calib.txt]
"""
import argparse
import json
import os
import re

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors, trainers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizers")

LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
          r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
         r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

TEXTS = [
    "", " ", "Hello world", "Hello, World!", "I'M", "I'M HERE, YOU'RE NOT. WE'LL SEE, THEY'VE GONE",
    "it's we'll they've I'd you're", "DON'T 'S 'T", "a'S b'T c'Re", "1234567", "3.14159 and 2,000,000",
    "  123  456  ", "東京 is in 日本", "한국어 텍스트", "\u1100\u1161\u11a8 jamo",
    "😀👍🏽 emoji 👨‍👩‍👧 family 🇫🇷", "line1\r\nline2\r\n", "\r\n\r\n\n", "trailing spaces   ",
    "   leading", "\t\ttabs\t x", "mixed\n\n\nnewlines \n \n", "e\u0301", "cafe\u0301 café CAFÉ",
    "\u00c5 vs A\u030a vs \u212b", "ﬁ ligature", "\u00a0nbsp \u2028ls\u0085nel\u2029",
    "ǅ ß ſ ẞ Ǆ", "a\u180e\u180eb \u200b\ufeff x\u3000y\u2003z", "Ελληνικά Русский العربية עברית हिन्दी", "zero\u200dwidth\u200djoiner",
    "\ufffd replacement", "null\u0000byte", "x" * 300, "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "def f(x):\n    return x**2  # comment\n", "https://example.com/a?b=c&d=e", "$$$ ??? !!! ...",
    "<|endoftext|>", "hi<|endoftext|>there", "<|endoftext|><|endoftext|>",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "a <mask> b", "a   <mask>   b", "<mask>", "[W]", "x[W]y", "hello [W] world", "say [W]!",
    "end<eot>  next", "<eot>", "The café was nice", "a cafe\u0301!",
]


def read_calib(path, nbytes):
    with open(path, "rb") as f:
        data = f.read(nbytes)
    return data.decode("utf-8", errors="ignore")


def train(tok, text, vocab_size, specials):
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(text.splitlines(keepends=True), trainer)
    return json.loads(tok.to_str())


def write_fixture(name, spec, texts, extra_files=None):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "tokenizer.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False, separators=(",", ":"))
    for fname, content in (extra_files or {}).items():
        with open(os.path.join(d, fname), "w", encoding="utf-8") as f:
            json.dump(content, f, ensure_ascii=False, indent=1)
    tok = Tokenizer.from_file(path)  # vectors come from what was written, not what was trained
    added = {t["id"]: t["content"] for t in spec.get("added_tokens", [])}
    vectors = []
    for t in texts:
        ids = tok.encode(t, add_special_tokens=True).ids
        plain = tok.encode(t, add_special_tokens=False).ids
        v = {"text": t, "ids": ids, "ids_plain": plain,
             "decoded": tok.decode(ids, skip_special_tokens=False)}
        # HF runs added tokens through the ByteLevel decoder, which turns a non-ASCII added token
        # like "café" into Latin-1 bytes (then U+FFFD). SPEAR returns the token's content instead.
        if any(i in added and not added[i].isascii() for i in ids):
            out, run = "", []
            for i in ids + [None]:
                if i is None or i in added:
                    out += tok.decode(run) if run else ""
                    run = []
                    if i is not None:
                        out += added[i]
                else:
                    run.append(i)
            v["spear_decoded"] = out
        vectors.append(v)
    with open(os.path.join(d, "vectors.json"), "w", encoding="utf-8") as f:
        json.dump({"source": "tokenizers " + __import__("tokenizers").__version__,
                   "vectors": vectors}, f, ensure_ascii=False, indent=0)
    size = sum(os.path.getsize(os.path.join(d, x)) for x in os.listdir(d))
    print(f"{name}: {len(vectors)} vectors, {size} bytes")
    return tok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", default=os.path.join(ROOT, "..", "shared", "data", "calib.txt"))
    ap.add_argument("--bytes", type=int, default=200_000)
    args = ap.parse_args()
    text = read_calib(args.calib, args.bytes)
    sample_lines = [l for l in text.splitlines() if 20 < len(l) < 200][:8]

    # GPT-2: lone ByteLevel with its built-in regex; merges rewritten to the legacy "a b" strings.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    spec = train(tok, text, 700, ["<|endoftext|>"])
    spec["model"]["merges"] = [" ".join(m) for m in spec["model"]["merges"]]
    write_fixture("gpt2", spec, TEXTS + sample_lines)

    # Qwen2: NFC + regex Split + ByteLevel without regex.
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    spec = train(tok, text, 800, specials)
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_tokens([AddedToken("café", normalized=True, special=False)])
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tok.token_to_id("<|endoftext|>"))])
    spec = json.loads(tok.to_str())
    eot, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    write_fixture("qwen2", spec, TEXTS + sample_lines, {
        "tokenizer_config.json": {"bos_token": None, "eos_token": "<|im_end|>",
                                  "pad_token": "<|endoftext|>"},
        "generation_config.json": {"bos_token_id": eot, "eos_token_id": [im_end, eot]},
    })

    # Llama-3 regex with ignore_merges, prefix space on every piece, and added-token flags.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    spec = train(tok, text, 700, ["<|begin_of_text|>", "<|end_of_text|>"])
    spec["model"]["ignore_merges"] = True
    # Trained vocabularies reproduce their own merges, so ignore_merges only matters for vocab
    # entries the merges cannot reach (as in Llama-3). Add two (checked below). They must come
    # before the added tokens: HF numbers added tokens from the model's vocab size on load.
    next_id = len(spec["model"]["vocab"])
    for i, w in enumerate(["Ġzebra", "Ġquux"]):
        spec["model"]["vocab"][w] = next_id + i
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True),
                            AddedToken("<eot>", rstrip=True, special=True)])
    tok.add_tokens([AddedToken("[W]", single_word=True, normalized=False)])
    bos, eos = tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|end_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A <|end_of_text|>",
                                      special_tokens=[("<|begin_of_text|>", bos),
                                                      ("<|end_of_text|>", eos)])])
    spec = json.loads(tok.to_str())
    off = dict(spec, model=dict(spec["model"], ignore_merges=False))
    tok_off = Tokenizer.from_str(json.dumps(off))
    differing = ["zebra", "quux", "a zebra and quux", "zebras quuxes"]
    assert tok.encode(differing[2]).ids != tok_off.encode(differing[2]).ids
    write_fixture("llama3-strip", spec, TEXTS + sample_lines + differing)


if __name__ == "__main__":
    main()
