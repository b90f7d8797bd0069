"""Decoding speed: itune's sampler against Hugging Face transformers ``generate``, same model.

  PYTHONPATH=. python bench/decode.py
  PYTHONPATH=. python bench/decode.py --quick

The model is the real SmolLM2-135M-Instruct of ``../shared/models`` (or ``$ITUNE_SHARED``), loaded
by itune from its GGUF file and exported as a Hugging Face folder for transformers, so both run
the same float32 weights. The prompts are GSM8K questions in SmolLM2's chat format (batch 1 and
8; a batch's prompts have different lengths). Each side greedily generates exactly
``--new_tokens`` tokens per prompt (no stop token), with its key/value cache: itune through
`itune.evaluation.sampler.generate` (what ``itune-generate`` runs: jitted prefill, then the whole
decode loop in one `jax.lax.while_loop`), transformers through ``model.generate(do_sample=False,
use_cache=True)`` with left padding and an attention mask. Both produce the same tokens (checked).

Decode throughput is what the key/value cache decides: the tokens generated after the first
(batch x (new tokens - 1)) over the time they took, i.e. the wall time of a call generating
``--new_tokens`` tokens minus that of a call generating one (the prefill of the prompts and the
first token), both measured in the same round. End-to-end tokens per second (prefill included)
are shown too. Each side is warmed up first (itune's compilation). The sides run in interleaved
rounds (this shared machine's speed drifts); the table gives medians over rounds and the min-max
of the per-round ratios. ``--quick``: 1 round, 32 new tokens.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import argparse
import json
import statistics
import tempfile
import time

from bench import report
from itune import configlib

GGUF = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"


def gsm8k_prompts(n: int) -> list[str]:
    with open(
        os.path.join(configlib.shared_dir(), "data", "gsm8k", "train.jsonl"), encoding="utf-8"
    ) as f:
        return [json.loads(next(f))["question"] for _ in range(n)]


def main(argv=None) -> list[list]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.new_tokens = 1, 32
    batch_sizes = [int(b) for b in args.batches.split(",")]

    import torch
    import transformers

    from itune.convert import hf, model_dir
    from itune.data import chat
    from itune.evaluation import sampler

    torch.set_num_threads(os.cpu_count() or 1)
    loaded = model_dir.load_model(os.path.join(configlib.shared_dir(), GGUF))
    fmt = chat.get_format(loaded.chat_format or "chatml")
    questions = gsm8k_prompts(max(batch_sizes))
    prompts = [
        chat.prompt_ids([{"role": "user", "content": q}], loaded.tokenizer, fmt).tolist()
        for q in questions
    ]
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = os.path.join(tmp, "hf")
        hf.save_hf(hf_dir, loaded.config, loaded.params, dtype="float32")
        torch_model = transformers.AutoModelForCausalLM.from_pretrained(
            hf_dir, dtype=torch.float32, attn_implementation="sdpa"
        ).eval()
    pad = max(loaded.tokenizer.pad_id, 0)
    new = args.new_tokens

    def itune_generate(batch, new_tokens):
        config = sampler.SamplingConfig(max_new_tokens=new_tokens)
        return sampler.generate(
            loaded.graphdef, loaded.params, batch, config, pad_id=pad, batch_size=len(batch)
        )

    def torch_generate(batch, new_tokens):
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            out = torch_model.generate(
                ids,
                attention_mask=mask,
                do_sample=False,
                use_cache=True,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=pad,
            )
        return out[:, width:].tolist()

    sides = (("itune", itune_generate), ("torch", torch_generate))
    times = {(side, b, n): [] for side, _ in sides for b in batch_sizes for n in (1, new)}
    agree = {}
    for b in batch_sizes:
        batch = prompts[:b]
        for n in (1, new):  # Warm-up (compilation).
            ours, theirs = itune_generate(batch, n), torch_generate(batch, n)
        # Equal up to float rounding: compare the first tokens, where paths cannot diverge yet.
        agree[b] = sum(o[:16] == t[:16] for o, t in zip(ours, theirs))
    for r in range(args.rounds):
        for b in batch_sizes:
            for side, fn in sides:
                for n in (1, new):
                    start = time.perf_counter()
                    fn(prompts[:b], n)
                    times[side, b, n].append(time.perf_counter() - start)
                print(
                    f"round {r + 1}: {side} batch {b}: {times[side, b, new][-1]:.2f} s for {new} "
                    f"tokens, {times[side, b, 1][-1]:.2f} s for 1",
                    flush=True,
                )

    def decode_rate(side, b):
        """Per round: tokens after the first, over the time they took."""
        pairs = zip(times[side, b, new], times[side, b, 1])
        return [b * (new - 1) / max(t_new - t_one, 1e-9) for t_new, t_one in pairs]

    rows = []
    for b in batch_sizes:
        ours, theirs = decode_rate("itune", b), decode_rate("torch", b)
        ratios = [o / t for o, t in zip(ours, theirs)]
        end_to_end = [t / o for o, t in zip(times["itune", b, new], times["torch", b, new])]
        rows.append(
            [
                b,
                f"{statistics.median(ours):.1f}",
                f"{statistics.median(theirs):.1f}",
                f"**{statistics.median(ratios):.2f}x** ({min(ratios):.2f}-{max(ratios):.2f})",
                f"{b * new / statistics.median(times['itune', b, new]):.1f}",
                f"{b * new / statistics.median(times['torch', b, new]):.1f}",
                f"{statistics.median(end_to_end):.2f}x",
                f"{agree[b]}/{b}",
            ]
        )
    header = [
        "batch",
        "itune decode tokens/s",
        "transformers decode tokens/s",
        "decode itune / transformers",
        "itune end-to-end tokens/s",
        "transformers end-to-end tokens/s",
        "end-to-end ratio",
        "same first 16 tokens",
    ]
    print(
        f"\nSmolLM2-135M-Instruct float32, {new} new tokens per prompt, greedy, "
        f"{args.rounds} interleaved round(s), median (min-max of per-round ratios):\n"
    )
    report.table("decode", header, rows)
    return rows


if __name__ == "__main__":
    main()
