"""Peak memory of one training forward + backward under `model.activation_checkpointing`
(none / selective / full) and `train.chunked_loss` (0 / N tokens), measured on the CPU.

A small Llama (default: hidden 512, 8 layers, vocab 32000, fp32, sdpa) runs one micro-batch
(default 2 x 1024 tokens) through the runtime's own `apply_activation_checkpointing` and
`enable_chunked_loss`, inside `torch.distributed._tools.mem_tracker.MemTracker`, which counts the
live bytes of every tensor by kind (parameters, gradients, activations, temporaries) and reports
the peak. Goals: selective below none, full below selective; the chunked loss removes the
b x s x vocab fp32 logits (and their gradient) from the peak.

    python benchmarks/bench_recompute_memory.py [--hidden 512 --layers 8 --seq 1024 --batch 2 --chunk 1024]
"""

from __future__ import annotations

import argparse
import time

import torch

MIB = 2**20


def run(args: argparse.Namespace, mode: str, chunk: int) -> dict[str, float]:
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher.runtime.chunked_loss import enable_chunked_loss
    from launcher.runtime.recompute import apply_activation_checkpointing

    config = AutoConfig.for_model(
        "llama", hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64, vocab_size=args.vocab,
        max_position_embeddings=args.seq)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    enable_chunked_loss(apply_activation_checkpointing(model, mode), chunk).train()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    tracker = MemTracker()
    tracker.track_external(model)
    start = time.perf_counter()
    with tracker:
        loss = model(input_ids=ids, labels=ids, num_items_in_batch=float(ids.numel())).loss
        loss.backward()
    seconds = time.perf_counter() - start
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    out = {str(k).split(".")[-1].lower(): v / MIB for k, v in peak.items()}
    out["seconds"] = seconds
    out["loss"] = float(loss.detach())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--chunk", type=int, default=1024)
    args = p.parse_args()
    logits_mib = args.batch * args.seq * args.vocab * 4 / MIB
    print(f"llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {args.batch} x {args.seq} "
          f"tokens, fp32; one b x s x vocab fp32 tensor = {logits_mib:.0f} MiB")
    print(f"{'checkpointing':<14}{'chunked_loss':>13}{'act MiB':>10}{'temp MiB':>10}{'peak MiB':>10}"
          f"{'s':>7}{'loss':>9}")
    for chunk in (0, args.chunk):
        for mode in ("none", "selective", "full"):
            r = run(args, mode, chunk)
            print(f"{mode:<14}{chunk:>13}{r['act']:>10.0f}{r['temp']:>10.0f}{r['total']:>10.0f}"
                  f"{r['seconds']:>7.1f}{r['loss']:>9.4f}", flush=True)


if __name__ == "__main__":
    main()
