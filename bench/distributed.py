"""Data-parallel training throughput: the same job as 1 process and as N processes
(`torchrun --standalone -m ml.training.launch`, the worker's path for `resources.devices > 1`).

Same data, seed and global batch for every world size. Reports the training loop's tokens/s (rank 0's
`tokens_per_second` metric: all ranks' tokens over its step time, the first step left out as warm-up),
wall time including start-up, the scaling efficiency (tokens/s of N over N x tokens/s of 1) and the
largest relative difference between the loss curves (they should agree: the same examples per step).
On CPU the processes use gloo and `--threads` torch threads each; on a CUDA machine one GPU each.
`--strategy both` (full fine-tunes) runs N processes under DDP and under FSDP and reports FSDP's tokens/s
as a ratio of DDP's, the strongest multi-process baseline.

    python bench/distributed.py [--model tiny-lm --kind lora --rows 96 --batch-size 16 --steps 8 --nproc 2
                                 --strategy ddp|fsdp|both]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TUNEHOUSE_DATA_DIR", tempfile.mkdtemp(prefix="tunehouse-bench-"))
for _key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

THINGS = ["sky", "grass", "snow", "sun", "coal", "rose", "sea", "lemon", "cloud", "leaf"]
COLORS = ["blue", "green", "white", "yellow", "black", "red", "grey", "orange", "purple", "brown"]


def chat_rows(n: int, seed: int = 3) -> list[dict[str, Any]]:
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        thing, color = r.choice(THINGS), r.choice(COLORS)
        filler = " ".join(r.choice(THINGS) for _ in range(r.randint(2, 20)))
        rows.append({"messages": [{"role": "user", "content": f"What color is the {thing}? ({filler})"},
                                  {"role": "assistant", "content": f"The {thing} is {color}."}]})
    return rows


def run(args: argparse.Namespace, nproc: int, workdir: Path, train: Path, strategy: str = "ddp") -> dict[str, Any]:
    from app.models_registry.catalog import local_base
    from ml.config import RecipeConfig
    from ml.training.launch import LaunchSpec

    cfg = RecipeConfig.model_validate({
        "base_model": args.model, "task": "causal_lm", "training_type": {"type": args.kind, "lora_dropout": 0.0},
        "seed": 1, "n_epochs": 1000, "max_steps": args.steps, "batch_size": args.batch_size,
        "learning_rate": 1e-3, "max_seq_length": args.max_len, "training_file_key": "train.jsonl",
        "checkpoint_every_steps": 10**6, "resources": {"devices": nproc, "strategy": strategy},
    })
    workdir.mkdir(parents=True)
    base = local_base(cfg.base_model)
    device = "auto" if args.cuda else "cpu"
    spec = LaunchSpec(config=cfg, base=base.spec, base_path=str(base.path), workdir=str(workdir),
                      train_path=str(train), device=device, threads=args.threads,
                      events=str(workdir / "events.jsonl"), control=str(workdir / "control"), report=False)
    (workdir / "spec.json").write_text(spec.model_dump_json())
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads)}
    if not args.cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "ml.training.launch", str(workdir / "spec.json")]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{nproc} processes failed:\n{done.stderr[-3000:]}")
    lines = [json.loads(x) for x in (workdir / "events.jsonl").read_text().splitlines()]
    metrics = [m for m in lines if m["kind"] == "metrics" and "train_loss" in m["values"]]
    rates = [m["values"]["tokens_per_second"] for m in metrics[1:]] or [0.0]
    return {"nproc": nproc, "strategy": strategy if nproc > 1 else "single",
            "tokens_per_second": sum(rates) / len(rates), "wall_seconds": wall,
            "losses": {m["step"]: m["values"]["train_loss"] for m in metrics}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-lm")
    ap.add_argument("--kind", default="lora", choices=["lora", "full"])
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16, help="the global batch")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    ap.add_argument("--cuda", action="store_true", help="one GPU per process (nccl)")
    ap.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp", "both"])
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tunehouse-dist-bench-"))
    train = tmp / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(args.rows)))
    one = run(args, 1, tmp / "one", train)
    strategies = ["ddp", "fsdp"] if args.strategy == "both" else [args.strategy]
    group = {name: run(args, args.nproc, tmp / name, train, name) for name in strategies}
    many = group[strategies[-1]]
    diff = max((abs(many["losses"][s] - v) / abs(v) for s, v in one["losses"].items() if s in many["losses"]),
               default=float("nan"))
    result = {
        "model": args.model, "kind": args.kind, "global_batch": args.batch_size, "steps": args.steps,
        "device": "cuda" if args.cuda else f"cpu ({args.threads} thread(s) per process)",
        "runs": [{k: v for k, v in r.items() if k != "losses"} for r in (one, *group.values())],
        "scaling_efficiency": many["tokens_per_second"] / max(1e-9, args.nproc * one["tokens_per_second"]),
        "max_relative_loss_difference": diff,
    }
    if len(group) == 2:
        result["fsdp_over_ddp_tokens_per_second"] = group["fsdp"]["tokens_per_second"] / max(
            1e-9, group["ddp"]["tokens_per_second"])
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
