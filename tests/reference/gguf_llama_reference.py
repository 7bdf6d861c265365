#!/usr/bin/env python3
"""An independent reference forward of a llama-architecture GGUF model, in NumPy.

Reads the file with the `gguf` package (its own reader and dequantizers, not kiln's), keeps the
tensors in llama.cpp's layout (attn_q / attn_k rows permuted for interleaved rotary pairs, so
the rotation here is llama.cpp's "normal" pair rotation, not Hugging Face's rotate-half), and
runs the model in float64 with a KV cache: RMSNorm, grouped-query attention, SwiGLU MLP, tied
or separate output head.

Given prompt token ids it writes JSON: the logits of the prompt's last position, the greedy
continuation (`--tokens` ids, 0 for none), and the log-probability of each prompt token after
the first given the ones before it (teacher forcing; for perplexity). kiln's test `tests/real_model.rs` compares its own run of the
same file against this output.

Usage: gguf_llama_reference.py MODEL.gguf --prompt 504,3575,282 --tokens 32 --out ref.json
"""

import argparse
import json

import gguf
import numpy as np


def field(reader, key):
    f = reader.fields.get(key)
    if f is None:
        raise SystemExit(f"{key}: missing from the GGUF metadata")
    return f.contents()


def load(path):
    reader = gguf.GGUFReader(path)
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise SystemExit(f"general.architecture = {arch}: this reference runs llama only")
    config = {
        "layers": int(field(reader, "llama.block_count")),
        "hidden": int(field(reader, "llama.embedding_length")),
        "heads": int(field(reader, "llama.attention.head_count")),
        "kv_heads": int(field(reader, "llama.attention.head_count_kv")),
        "theta": float(field(reader, "llama.rope.freq_base")),
        "eps": float(field(reader, "llama.attention.layer_norm_rms_epsilon")),
    }
    tensors = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = np.asarray(values, dtype=np.float64)
    return config, tensors


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rotate_pairs(x, position, theta):
    """llama.cpp's normal rotary embedding: pairs (x[2i], x[2i+1]) of each head."""
    head_dim = x.shape[-1]
    i = np.arange(head_dim // 2)
    angle = position * theta ** (-2.0 * i / head_dim)
    cos, sin = np.cos(angle), np.sin(angle)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


class Model:
    def __init__(self, config, tensors):
        self.c = config
        self.t = tensors
        self.head_dim = config["hidden"] // config["heads"]
        self.cache = [([], []) for _ in range(config["layers"])]
        self.position = 0

    def step(self, token):
        c, t = self.c, self.t
        x = t["token_embd.weight"][token]
        group = c["heads"] // c["kv_heads"]
        for layer in range(c["layers"]):
            p = f"blk.{layer}."
            h = rms_norm(x, t[p + "attn_norm.weight"], c["eps"])
            q = (t[p + "attn_q.weight"] @ h).reshape(c["heads"], self.head_dim)
            k = (t[p + "attn_k.weight"] @ h).reshape(c["kv_heads"], self.head_dim)
            v = (t[p + "attn_v.weight"] @ h).reshape(c["kv_heads"], self.head_dim)
            q = rotate_pairs(q, self.position, c["theta"])
            k = rotate_pairs(k, self.position, c["theta"])
            keys, values = self.cache[layer]
            keys.append(k)
            values.append(v)
            K, V = np.stack(keys), np.stack(values)  # [positions, kv_heads, head_dim]
            attended = np.empty_like(q)
            for head in range(c["heads"]):
                kv = head // group
                scores = K[:, kv, :] @ q[head] / np.sqrt(self.head_dim)
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                attended[head] = weights @ V[:, kv, :]
            x = x + t[p + "attn_output.weight"] @ attended.reshape(-1)
            h = rms_norm(x, t[p + "ffn_norm.weight"], c["eps"])
            gate = t[p + "ffn_gate.weight"] @ h
            up = t[p + "ffn_up.weight"] @ h
            x = x + t[p + "ffn_down.weight"] @ (gate / (1.0 + np.exp(-gate)) * up)
        self.position += 1
        head = t.get("output.weight", t["token_embd.weight"])
        return head @ rms_norm(x, t["output_norm.weight"], c["eps"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--prompt", required=True, help="comma-separated token ids")
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens to generate")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    prompt = [int(s) for s in args.prompt.split(",")]
    config, tensors = load(args.model)
    model = Model(config, tensors)
    prompt_logprobs = []
    for index, token in enumerate(prompt):
        if index > 0:
            shifted = logits - logits.max()
            prompt_logprobs.append(float(shifted[token] - np.log(np.exp(shifted).sum())))
        logits = model.step(token)
    prompt_logits = logits.copy()
    generated = []
    for _ in range(args.tokens):
        token = int(np.argmax(logits))
        generated.append(token)
        logits = model.step(token)
    with open(args.out, "w") as f:
        json.dump(
            {
                "prompt": prompt,
                "prompt_last_logits": [float(v) for v in prompt_logits],
                "generated": generated,
                "prompt_logprobs": prompt_logprobs,
            },
            f,
        )


if __name__ == "__main__":
    main()
