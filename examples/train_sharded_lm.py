"""Trains a small language model on 2 processes with its token embedding sharded by rows
(lvopt.nn.ShardedEmbedding: each rank holds half of the table and of its Adam moments, stepped
with lvopt's exact sparse rows), the rest of the model data-parallel (DistributedDataParallel),
and saves (and resumes from) a torch.distributed.checkpoint that any number of ranks can load.

    python examples/train_sharded_lm.py                       # starts 2 gloo processes itself
    torchrun --nproc-per-node 2 examples/train_sharded_lm.py  # the same under torchrun
    python examples/train_sharded_lm.py --save /tmp/ckpt --steps 100
    python examples/train_sharded_lm.py --resume /tmp/ckpt --world 4 --steps 50

On GPUs pass ``--backend nccl`` (one process per GPU): the code is the same, the process group's
backend is the only difference. The data are synthetic: a Markov chain over the vocabulary in
which every token has 4 likely successors, so the loss falls from ln(V) towards ln(4) ~ 1.4.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import subprocess
import sys

import torch
import torch.distributed as dist
from torch import nn

import lvopt


class Body(nn.Module):
    """Everything after the embedding: one causal transformer layer and an output layer."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(256, dim) * 0.02)
        self.block = nn.TransformerEncoderLayer(
            dim, nhead=4, dim_feedforward=4 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, x):
        n = x.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(n, device=x.device)
        return self.out(self.norm(self.block(x + self.pos[:n], src_mask=mask, is_causal=True)))


def batch(step: int, rank: int, args) -> torch.Tensor:
    """Sequences of the Markov chain (each token's 4 successors are fixed by the vocabulary);
    every rank draws its own."""
    g = torch.Generator().manual_seed(1_000_003 * step + rank)
    succ = torch.randint(0, args.vocab, (args.vocab, 4), generator=torch.Generator().manual_seed(0))
    seq = torch.empty(args.batch, args.seq + 1, dtype=torch.int64)
    seq[:, 0] = torch.randint(0, args.vocab, (args.batch,), generator=g)
    for i in range(args.seq):
        seq[:, i + 1] = succ[seq[:, i], torch.randint(0, 4, (args.batch,), generator=g)]
    return seq


def checkpoint_state(emb, emb_opt, body, body_opt) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {
        "emb": emb.state_dict(),
        "emb_optim": emb.optim_state_dict(emb_opt),
        "body": get_model_state_dict(body),
        "body_optim": get_optimizer_state_dict(body, body_opt),
    }


def train(args) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.backend == "nccl" else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # the same Body on every rank
    emb = lvopt.nn.ShardedEmbedding(args.vocab, args.dim, seed=0, device=device)
    body = Body(args.vocab, args.dim).to(device)
    ddp_body = DDP(body)  # averages the body's gradients; the embedding's go to their owners (also averaged)
    emb_opt = lvopt.AdamW([emb.weight], lr=args.lr, weight_decay=0.01, sparse_mode="exact")
    body_opt = lvopt.AdamW(body.parameters(), lr=args.lr, weight_decay=0.01)
    start = 0
    if args.resume:
        state = checkpoint_state(emb, emb_opt, body, body_opt)
        state["step"] = torch.zeros((), dtype=torch.int64)
        dcp.load(state, checkpoint_id=args.resume)
        emb.load_state_dict(state["emb"])
        emb.load_optim_state_dict(emb_opt, state["emb_optim"])
        set_model_state_dict(body, state["body"])
        set_optimizer_state_dict(body, body_opt, state["body_optim"])
        start = int(state["step"])
    if rank == 0:
        print(
            f"{world} ranks; embedding rows per rank: {emb.weight.shape[0]} of {args.vocab}; "
            f"steps {start}..{start + args.steps}; ln(V) = {math.log(args.vocab):.2f}",
            flush=True,
        )
    for step in range(start, start + args.steps):
        ids = batch(step, rank, args).to(device)
        logits = ddp_body(emb(ids[:, :-1]))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        emb_opt.zero_grad()
        body_opt.zero_grad()
        loss.backward()
        emb_opt.step()
        body_opt.step()
        if step % args.log_every == 0 or step == start + args.steps - 1:
            avg = loss.detach().clone()
            dist.all_reduce(avg)
            if rank == 0:
                print(f"step {step:4d}  loss {float(avg) / world:.3f}", flush=True)
    if args.save:
        state = checkpoint_state(emb, emb_opt, body, body_opt)  # flushes the embedding's rows first
        state["step"] = torch.tensor(start + args.steps)
        dcp.save(state, checkpoint_id=args.save)
        if rank == 0:
            sent = sum(emb.bytes_sent.values()) / args.steps
            print(f"saved to {args.save}; the embedding sent {sent / 1e3:.1f} kB per step from rank 0", flush=True)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2, help="processes to start (without torchrun)")
    ap.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16, help="sequences per rank per step")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--save", default=None, help="a directory for a torch.distributed.checkpoint at the end")
    ap.add_argument("--resume", default=None, help="a checkpoint directory saved by --save (any number of ranks)")
    args = ap.parse_args()
    if "RANK" in os.environ:  # under torchrun, or started below
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
        return train(args)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, WORLD_SIZE=str(args.world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    procs = [
        subprocess.Popen([sys.executable, *sys.argv], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
        for r in range(args.world)
    ]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a rank failed (exit codes {codes})")


if __name__ == "__main__":
    main()
