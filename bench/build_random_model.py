"""Build a random-weight model of a real architecture (default: Llama-3.2-1B shape) as a bf16 HF
directory, with a small byte-level tokenizer (trained here), for GPU stage-time and memory runs.
Speed and memory do not depend on the weights' values; quality numbers from it mean nothing.

    python bench/build_random_model.py OUT_DIR [--shape llama-3.2-1b|llama-3.1-8b] [--tokenizer HF_DIR]

--tokenizer copies a real BPE tokenizer (e.g. the converted SmolLM2 directory in the quantgate
cache) so that benchmark texts become as many tokens as with a real model; the small byte-level
default makes prompts about 4x longer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,  # CPU checks of scripts
                 num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    ap.add_argument("--tokenizer", type=Path, help="an HF directory whose tokenizer to copy")
    args = ap.parse_args()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import build_tokenizer

    out = Path(args.out)
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
        tok.save_pretrained(out)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
    else:
        tok = build_tokenizer(out)
    cfg = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=8192, architectures=["LlamaForCausalLM"],
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(out)
    print(f"{args.shape}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters -> {out}")


if __name__ == "__main__":
    main()
