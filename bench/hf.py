"""Memory of Hugging Face import and export, against the model's size.

A Llama made by transformers (random weights, saved as sharded safetensors) is loaded by
`python -m trainer model.init_from=...` on a 4-rank FSDP x TP mesh for one step (the trainer logs
what the rank holding most read, held and added to its peak memory while loading), then the
step's checkpoint is exported with `python -m trainer.checkpoint export`, whose peak RSS is
measured against a process that only imports the same modules. Ratios are against the whole
model's and the largest tensor's bytes, measured in the same run.

    python bench/hf.py [--dim 1024] [--layers 8] [--ffn 2816] [--vocab 8192]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
LOADED = re.compile(r"loaded (\d+) tensors .* read ([0-9.]+) MiB for ([0-9.]+) MiB of shards, "
                    r"peak memory \+([0-9.]+) MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=8192)
    args = parser.parse_args()
    import torch
    import transformers

    shape = {"dim": args.dim, "n_layers": args.layers, "n_heads": args.dim // 64,
             "n_kv_heads": args.dim // 256, "ffn_dim": args.ffn, "vocab_size": args.vocab,
             "max_seq_len": 64}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = transformers.LlamaConfig(
            vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=args.ffn,
            num_hidden_layers=args.layers, num_attention_heads=shape["n_heads"],
            num_key_value_heads=shape["n_kv_heads"], max_position_embeddings=64,
            rms_norm_eps=1e-5)
        model = transformers.LlamaForCausalLM(config)
        whole = sum(p.numel() * 4 for p in model.parameters())
        largest = max(p.numel() * 4 for p in model.parameters())
        model.save_pretrained(work / "hf", max_shard_size="100MB")
        del model
        keys = [f"model.{k}={v}" for k, v in shape.items()]
        train = subprocess.run(
            [sys.executable, "-m", "trainer", *keys, f"model.init_from={work / 'hf'}",
             "trainer.devices=4", "parallelism=fsdp_tp", "trainer.max_steps=1",
             "data.seq_len=32", "data.micro_batch_size=1", "tracking=none",
             "checkpoint.async_save=false", f"hydra.run.dir={work / 'run'}"],
            cwd=work, env=env, capture_output=True, text=True)
        if train.returncode:
            raise SystemExit(train.stderr[-3000:])
        tensors, read, shard, beyond = LOADED.search(train.stdout + train.stderr).groups()
        baseline = peak_rss([sys.executable, "-c", "import trainer.checkpoint.__main__, "
                             "trainer.checkpoint.export"], env)
        exporting = peak_rss([sys.executable, "-m", "trainer.checkpoint", "export",
                              str(work / "run/checkpoints"), "--to", str(work / "out"),
                              "--max-shard-size", "100MB"], env)
    print(f"model: {whole / MIB:.0f} MiB in fp32 ({int(tensors)} tensors), largest tensor "
          f"{largest / MIB:.1f} MiB; torch {torch.__version__}")
    print(f"import, 4 ranks (dp_shard=2 x tp=2), the rank holding most: shards {shard} MiB, "
          f"read {read} MiB, peak +{beyond} MiB while loading = "
          f"{float(beyond) * MIB / largest:.2f} x the largest tensor, "
          f"{(float(shard) + float(beyond)) * MIB / whole:.2f} x the model")
    above = exporting - baseline
    print(f"export: peak RSS {exporting / MIB:.0f} MiB, {above / MIB:.0f} MiB above importing "
          f"the same modules ({baseline / MIB:.0f} MiB) = {above / largest:.2f} x the largest "
          f"tensor, {above / whole:.2f} x the model")


def peak_rss(cmd: list[str], env: dict[str, str]) -> int:
    """Peak RSS of `cmd`, run in a fresh child of a small probe so the figure is its own."""
    probe = ("import resource, subprocess, sys\n"
             "proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
             "assert proc.returncode == 0, proc.stderr[-3000:]\n"
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], env=env, capture_output=True,
                         text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return int(out.stdout)


if __name__ == "__main__":
    main()
