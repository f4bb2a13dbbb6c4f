#!/usr/bin/env python3
"""Tiny random-weight Qwen2 / Mistral / Llama-3-scaled checkpoints with golden logits from the Hugging Face
implementation, for the forward-pass parity tests (tests/model/test_arch_parity.cpp).

Run where torch and transformers are installed (the GPU machine has both):
    python3 tools/make_model_fixtures.py --out tests/fixtures/models
Weights are random but larger than the default init (std 0.15) so that every term of the forward pass
moves the logits; norms and biases are randomised too. Weights are stored in bf16; the golden logits are
computed in fp32 from those bf16 weights with eager attention, as reference.json's protocol does.
"""
import argparse, json, os, shutil

import torch
import transformers
from safetensors.torch import save_file

SEQ = 40  # longer than the sliding windows below, so windows are exercised


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def build(name, cfg, seed, out, shard=None, edit=None):
    torch.manual_seed(seed)
    cls = {"qwen2": transformers.Qwen2ForCausalLM, "mistral": transformers.MistralForCausalLM,
           "llama": transformers.LlamaForCausalLM}[cfg.model_type]
    cfg._attn_implementation = "eager"
    model = cls(cfg).eval()
    randomize(model, seed)
    model = model.to(torch.bfloat16)
    d = os.path.join(out, name)
    shutil.rmtree(d, ignore_errors=True)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(d, safe_serialization=True, **kw)
    if edit:  # rewrite config.json in an older transformers spelling; the function is unchanged
        p = os.path.join(d, "config.json")
        c = json.load(open(p))
        edit(c)
        json.dump(c, open(p, "w"), indent=2)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(2, cfg.vocab_size, (1, SEQ), generator=g)
    ref = model.float().eval()
    with torch.no_grad():
        logits = ref(input_ids=ids).logits[0].float().contiguous()
    save_file({"logits": logits}, os.path.join(d, "golden_logits.safetensors"))
    json.dump({"ids": ids[0].tolist(), "argmax": logits.argmax(-1).tolist(),
               "transformers": transformers.__version__, "torch": torch.__version__},
              open(os.path.join(d, "golden.json"), "w"))
    print(name, "->", sorted(os.listdir(d)))


def make_config(cls, rope, **kw):
    """transformers >= 5 takes rope_parameters; older versions rope_theta and rope_scaling."""
    try:
        return cls(rope_parameters=dict(rope), **kw)
    except TypeError:
        rope = dict(rope)
        theta = rope.pop("rope_theta")
        scaling = rope if rope.get("rope_type", "default") != "default" else None
        return cls(rope_theta=theta, rope_scaling=scaling, **kw)


def old_spelling(c):
    rp = c.pop("rope_parameters", None) or {}
    c["rope_theta"] = rp.get("rope_theta", 10000.0)
    if rp.get("rope_type", "default") != "default":
        c["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    if "dtype" in c:
        c["torch_dtype"] = c.pop("dtype")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_attention_heads=4,
                  max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1)
    qwen = make_config(transformers.Qwen2Config, {"rope_type": "default", "rope_theta": 1e6},
                       num_hidden_layers=3, num_key_value_heads=2, use_sliding_window=True,
                       sliding_window=8, max_window_layers=1, tie_word_embeddings=True, **common)
    build("qwen2-tiny", qwen, 11, a.out)
    mistral = make_config(transformers.MistralConfig, {"rope_type": "default", "rope_theta": 1e4},
                          num_hidden_layers=2, num_key_value_heads=1, head_dim=32, sliding_window=8,
                          tie_word_embeddings=False, **common)
    build("mistral-tiny", mistral, 12, a.out, shard="40KB", edit=old_spelling)
    llama3 = make_config(transformers.LlamaConfig,
                         {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                         num_hidden_layers=2, num_key_value_heads=2, head_dim=32, attention_bias=True,
                         tie_word_embeddings=False, **common)
    build("llama3-scaled-tiny", llama3, 13, a.out)


if __name__ == "__main__":
    main()
