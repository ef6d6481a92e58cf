#!/usr/bin/env python
"""nanoGPT-style char-level GPT training with commopt's optimizers, as a user would write it.

Examples (2 ranks, gloo on CPU)::

    torchrun --nproc_per_node 2 experiments/train_nanogpt.py --opt compressed --max-iters 200
    torchrun --nproc_per_node 2 experiments/train_nanogpt.py --opt co2 --tau 12
    torchrun --nproc_per_node 2 experiments/train_nanogpt.py --opt mkor --save-every 50
    torchrun --nproc_per_node 2 experiments/train_nanogpt.py --opt ddp --resume --out-dir out-nanogpt

``--opt``: ``ddp`` (plain DDP + AdamW), ``compressed`` (``commopt.CompressedOptimizer``
around AdamW: ``--compressor`` / ``--feedback``), ``co2`` (``commopt.CO2`` around AdamW,
``--tau`` local steps per round) or ``mkor`` (``commopt.MKOR(ddp, AdamW)``).

Everything follows nanoGPT's ``train.py``: a GPT with tied token embedding / lm_head,
AdamW with a decay and a no-decay group, a warmup + cosine learning rate written into
``param_groups`` every iteration, autocast + ``torch.amp.GradScaler``, gradient
accumulation through ``model.require_backward_grad_sync``, gradient clipping, a periodic
train/val loss estimate, and one checkpoint written by rank 0 only
(``{"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"}``) that
``--resume`` loads on *every* rank (``torch.load`` + ``model.load_state_dict`` +
``optimizer.load_state_dict``).

Data: the source of the Python standard library (the ``*.py`` files directly in
``os.path.dirname(os.__file__)``, sorted by name, every 10th file held out for
validation), read offline, as characters (printable ASCII, tab and newline; anything
else maps to one "unknown" id). Batches are a pure function of (seed, split, iteration,
micro-step, rank), so a resumed run sees exactly the batches of an uninterrupted one.

Rank 0 prints one line per evaluation (iter, train loss, val loss, ms/iter, whether the
replicas agree) and at the end the commopt optimizer's ``comm_stats()``; with
``--out-dir`` it also writes ``result.json`` there (used by
``experiments/run_nanogpt_check.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import commopt
from commopt.checkpoint import latest_checkpoint, steps_in
from commopt.consistency import refuse_together

OPTS = ("ddp", "compressed", "co2", "mkor")


# ----------------------------------------------------------------------------------------- model


@dataclass
class GPTConfig:
    block_size: int = 64
    vocab_size: int = 98
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.n_head, self.n_embd, self.dropout = cfg.n_head, cfg.n_embd, cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # weight tying (https://paperswithcode.com/method/weight-tying): one Parameter, two modules
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of the residual projections
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())  # the tied weight counts once
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        _, t = idx.shape
        assert t <= self.config.block_size, f"sequence of {t} > block size {self.config.block_size}"
        pos = torch.arange(t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas: tuple[float, float]):
        """AdamW with weight decay on every >= 2-D tensor (matmuls, embeddings), none on biases / norms."""
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        decay = [p for p in params.values() if p.dim() >= 2]
        no_decay = [p for p in params.values() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas), (len(decay), len(no_decay))


# ------------------------------------------------------------------------------------------ data

# id 0 = unknown; then tab, newline and printable ASCII
VOCAB = ["\x00", "\t", "\n"] + [chr(c) for c in range(32, 127)]


def _lookup_table() -> torch.Tensor:
    lut = torch.zeros(256, dtype=torch.uint8)
    for i, ch in enumerate(VOCAB[1:], start=1):
        lut[ord(ch)] = i
    return lut


def build_dataset(max_train_chars: int, max_val_chars: int, max_file_chars: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Char-level ids of the standard library's top-level ``*.py`` files, split by file (every 10th: val)."""
    root = os.path.dirname(os.__file__)
    names = sorted(f for f in os.listdir(root) if f.endswith(".py") and os.path.isfile(os.path.join(root, f)))
    lut = _lookup_table()
    parts: dict[str, list[torch.Tensor]] = {"train": [], "val": []}
    used: dict[str, list[str]] = {"train": [], "val": []}
    have = {"train": 0, "val": 0}
    cap = {"train": max_train_chars, "val": max_val_chars}
    for i, name in enumerate(names):
        split = "val" if i % 10 == 0 else "train"
        if have[split] >= cap[split]:
            continue
        with open(os.path.join(root, name), "rb") as f:
            raw = f.read()
        raw = raw[: min(max_file_chars, cap[split] - have[split])]
        parts[split].append(lut[torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()])
        used[split].append(name)
        have[split] += len(raw)
    train = torch.cat(parts["train"]).long()
    val = torch.cat(parts["val"]).long()
    digest = hashlib.blake2b(train.to(torch.uint8).numpy().tobytes() + val.to(torch.uint8).numpy().tobytes(),
                             digest_size=8).hexdigest()
    meta = {"root": root, "train_files": len(used["train"]), "val_files": len(used["val"]),
            "train_chars": train.numel(), "val_chars": val.numel(), "digest": digest}
    return train, val, meta


def _generator(*key: object) -> torch.Generator:
    seed = int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little") & (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def get_batch(data: torch.Tensor, batch_size: int, block_size: int, *key: object):
    """A batch that depends only on ``key`` (no global RNG state: resuming replays the same batches)."""
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=_generator(*key))
    x = torch.stack([data[i:i + block_size] for i in ix.tolist()])
    y = torch.stack([data[i + 1:i + 1 + block_size] for i in ix.tolist()])
    return x, y


# ------------------------------------------------------------------------------------------- run


def _node_size(value: "str | None") -> "int | str | None":
    return value if value in (None, "auto") else int(value)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--opt", choices=OPTS, default="compressed")
    p.add_argument("--compressor", default="topk:0.01", help="CompressedOptimizer's compressor")
    p.add_argument("--feedback", default="econtrol", help="CompressedOptimizer's error feedback")
    p.add_argument("--warmup-steps", type=int, default=2, help="CompressedOptimizer's dense steps first")
    p.add_argument("--node-size", default=None, help="CompressedOptimizer's node_size: ranks per node (an "
                   "integer, or 'auto'); compresses only between nodes (SPEC §8)")
    p.add_argument("--tau", type=int, default=12, help="CO2: local steps per round")
    p.add_argument("--mkor-update-every", type=int, default=10)
    p.add_argument("--mkor-skip", default="", help="comma-separated layer names MKOR leaves alone (e.g. lm_head)")
    # nanoGPT's knobs
    p.add_argument("--out-dir", default="out-nanogpt")
    p.add_argument("--max-iters", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-iters", type=int, default=4, help="batches per rank and split in a loss estimate")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N iters (0: only at the end)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                   help="resume from CKPT (default: OUT_DIR/ckpt.pt, or with --ckpt-mode per-rank the newest "
                        "OUT_DIR/ckpt_<iter>.rank<r>.pt of which every rank has its file); '{rank}' in CKPT is "
                        "replaced by this rank")
    p.add_argument("--resume-if-present", action="store_true",
                   help="resume from the default checkpoint of --resume when there is one (on every rank), "
                        "else start fresh (a requeued job); a checkpoint past --max-iters is refused")
    p.add_argument("--ckpt-mode", choices=("master", "per-rank", "both"), default="master",
                   help="master: rank 0 writes one file that every rank loads (nanoGPT); per-rank: every rank "
                        "writes and loads its own file (commopt's exact-resume recipe); both: write both kinds, "
                        "resume like master")
    p.add_argument("--batch-size", type=int, default=8, help="per rank and micro-step")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-steps per iteration")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=2e-4)
    p.add_argument("--warmup-iters", type=int, default=10)
    p.add_argument("--lr-decay-iters", type=int, default=None, help="default: --max-iters")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.99)
    p.add_argument("--grad-clip", type=float, default=1.0, help="0: no clipping")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="autocast dtype; fp16 turns the GradScaler on (bf16/fp32: a disabled, no-op scaler). "
                        "auto: bf16 on CUDA, fp32 on CPU (CPU autocast was 5-9x slower than fp32 here)")
    p.add_argument("--init-scale", type=float, default=2.0**16, help="GradScaler's initial loss scale (fp16)")
    p.add_argument("--no-pass-scaler", action="store_true",
                   help="do not pass grad_scaler= to CompressedOptimizer / MKOR (commopt then binds the scaler at "
                        "its first scaler.step, where supported)")
    p.add_argument("--max-train-chars", type=int, default=2_000_000)
    p.add_argument("--max-val-chars", type=int, default=200_000)
    p.add_argument("--max-file-chars", type=int, default=40_000, help="read at most this much of each file")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--backend", default=None)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on CPU")
    args = p.parse_args(argv)
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.max_iters
    return args


def get_lr(it: int, a: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to ``min_lr`` at ``lr_decay_iters`` (nanoGPT's schedule)."""
    if it < a.warmup_iters:
        return a.lr * (it + 1) / (a.warmup_iters + 1)
    if it > a.lr_decay_iters:
        return a.min_lr
    ratio = (it - a.warmup_iters) / max(1, a.lr_decay_iters - a.warmup_iters)
    return a.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (a.lr - a.min_lr)


def params_checksum(model: nn.Module) -> torch.Tensor:
    """Two float64 numbers that differ between replicas unless their parameters agree (practically)."""
    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    w = torch.arange(1, flat.numel() + 1, dtype=torch.float64)
    return torch.stack([flat.sum(), (flat * w).sum()])


def replicas_agree(model: nn.Module, world_size: int) -> bool:
    local = params_checksum(model)
    allv = [torch.zeros_like(local) for _ in range(world_size)]
    dist.all_gather(allv, local)
    return all(torch.equal(allv[0], v) for v in allv[1:])


def build_optimizer(args, ddp: DDP, base: torch.optim.Optimizer, scaler: torch.amp.GradScaler):
    """The optimizer the training loop steps: ``base`` itself (ddp) or a commopt wrapper around it."""
    if args.no_pass_scaler:
        scaler = None
    if args.opt == "ddp":
        return base
    if args.opt == "compressed":
        return commopt.CompressedOptimizer(ddp, base, compressor=args.compressor, feedback=args.feedback,
                                           warmup_steps=args.warmup_steps, grad_scaler=scaler,
                                           node_size=_node_size(args.node_size))
    if args.opt == "co2":
        # CO2 registers its own no-communication comm hook on the DDP model, so backward() never
        # all-reduces; the inner AdamW steps locally and every tau steps the round's displacement
        # is averaged asynchronously (applied one round late).
        return commopt.CO2(ddp, base, tau=args.tau)
    if args.opt == "mkor":
        skip = tuple(s for s in args.mkor_skip.split(",") if s)
        return commopt.MKOR(ddp, base, update_every=args.mkor_update_every, skip=skip, grad_scaler=scaler)
    raise ValueError(args.opt)


@torch.no_grad()
def estimate_loss(model: nn.Module, data: dict, args, ctx, rank: int, world_size: int) -> dict:
    """Mean loss over ``eval_iters`` fixed batches per rank and split, averaged over the ranks."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        losses = torch.zeros(args.eval_iters)
        for k in range(args.eval_iters):
            x, y = get_batch(data[split], args.batch_size, args.block_size, args.seed, "eval", split, rank, k)
            with ctx:
                _, loss = model(x, y)
            losses[k] = loss.float()
        m = losses.mean().reshape(1).double()
        dist.all_reduce(m)
        out[split] = float(m) / world_size
    model.train()
    return out


def choose_checkpoint(args: argparse.Namespace, rank: int, world_size: int) -> "str | None":
    """The file this rank resumes from, or None for a fresh start; the same decision on every rank.

    ``--resume CKPT`` names it. ``--resume`` alone reads OUT_DIR/ckpt.pt (master mode) or, per rank, the
    newest iteration of which *every* rank has its ``ckpt_<iter>.rank<r>.pt``: a job that died while
    saving (a node failure) may have left some ranks' newest files only, and mixing iterations would
    silently diverge. ``--resume-if-present`` (a requeued SLURM job: slurm/train_cpu.sbatch) does the same,
    and starts fresh when there is nothing to resume from yet."""
    if args.resume is None and not args.resume_if_present:
        return None
    if args.resume:
        return args.resume.replace("{rank}", str(rank))
    if args.ckpt_mode != "per-rank":
        path = os.path.join(args.out_dir, "ckpt.pt")
        found: list = [None] * world_size
        dist.all_gather_object(found, os.path.isfile(path))
        if all(found):
            return path
        if args.resume_if_present and not any(found):
            return None
        raise FileNotFoundError(f"{path} is missing on ranks {[r for r, f in enumerate(found) if not f]}: "
                                f"nothing to resume from")
    def mine() -> "dict[int, str]":
        try:
            return steps_in(args.out_dir, rf"ckpt_(\d+)\.rank{rank}\.pt")
        except OSError:  # an unreadable folder on this rank: nothing in common, decided with the others
            return {}

    it, path = latest_checkpoint(mine)
    if it is None:
        if args.resume_if_present:
            return None
        raise FileNotFoundError(f"no iteration has a checkpoint of every rank in {args.out_dir}: "
                                f"nothing to resume from")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info = commopt.init_distributed(backend=args.backend)
    rank, world_size, device = info.rank, info.world_size, info.device
    master = rank == 0
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    say = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)
    if master:
        os.makedirs(args.out_dir, exist_ok=True)
    torch.manual_seed(args.seed)  # the same initial model on every rank (DDP broadcasts rank 0's anyway)

    train_data, val_data, meta = build_dataset(args.max_train_chars, args.max_val_chars, args.max_file_chars)
    digests = [None] * world_size
    dist.all_gather_object(digests, meta["digest"])
    if len(set(digests)) != 1:
        raise RuntimeError(f"the ranks built different datasets: {digests}")
    data = {"train": train_data, "val": val_data}

    # -- autocast + GradScaler (fp16 scales the loss; bf16/fp32 get a disabled scaler, whose calls are no-ops)
    if args.dtype == "auto":
        args.dtype = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    ptdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    ctx = (contextlib.nullcontext() if args.dtype == "fp32"
           else torch.autocast(device_type=device.type, dtype=ptdtype))
    scaler = torch.amp.GradScaler(device.type, init_scale=args.init_scale, enabled=args.dtype == "fp16")

    # -- model (+ checkpoint), DDP, optimizer (+ checkpoint): nanoGPT's order, except that commopt's
    #    wrappers need the DDP model, so the optimizer state is loaded after DDP(...) is built.
    model_args = asdict(GPTConfig(block_size=args.block_size, vocab_size=len(VOCAB), n_layer=args.n_layer,
                                  n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout))
    iter_num, best_val_loss, checkpoint, resumed_from = 0, 1e9, None, None
    ckpt_path = choose_checkpoint(args, rank, world_size)
    if ckpt_path is not None:
        # nanoGPT: every rank reads rank 0's single checkpoint (per-rank mode: its own file). Read and
        # checked agreed: a file one rank cannot read, or that does not fit, refuses the resume on every
        # rank (commopt.load_checkpoint, refuse_together) instead of leaving the others waiting.
        checkpoint = commopt.load_checkpoint(ckpt_path, map_location=device)
        problem = None
        if checkpoint.get("rank", 0) != rank and args.ckpt_mode == "per-rank":
            problem = f"{ckpt_path} was written by rank {checkpoint.get('rank')}, this is rank {rank}"
        for k in ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size"):
            if problem is None and checkpoint["model_args"].get(k) != model_args[k]:
                problem = f"{ckpt_path} has {k}={checkpoint['model_args'].get(k)}, this run {model_args[k]}"
        if problem is None and checkpoint["iter_num"] > args.max_iters:
            problem = f"{ckpt_path} is of iteration {checkpoint['iter_num']}, past --max-iters {args.max_iters}"
        refuse_together(problem, what="resume")
        iters = [None] * world_size
        dist.all_gather_object(iters, checkpoint["iter_num"])
        if len(set(iters)) != 1:
            raise RuntimeError(f"the ranks' checkpoints are of different iterations ({iters}): resuming from them "
                               f"would mix states; resume every rank from the same iteration's files")
        if checkpoint["config"].get("opt") != args.opt:
            say(f"warning: checkpoint was written with --opt {checkpoint['config'].get('opt')}, resuming with "
                f"--opt {args.opt}")
        resumed_from = ckpt_path
    raw_model = GPT(GPTConfig(**model_args)).to(device)
    if checkpoint is not None:
        sd = checkpoint["model"]
        for k in list(sd):
            if k.startswith("_orig_mod."):
                sd[k[len("_orig_mod."):]] = sd.pop(k)
        raw_model.load_state_dict(sd)
        iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
    model = DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    base, (n_decay, n_no_decay) = raw_model.configure_optimizers(args.weight_decay, args.lr,
                                                                 (args.beta1, args.beta2))
    opt = build_optimizer(args, model, base, scaler)
    if checkpoint is not None:
        # --ckpt-mode master loads rank 0's optimizer state on every rank. What that means per --opt:
        # * ddp, mkor: AdamW's moments and MKOR's factors are the same on every rank: an exact resume.
        # * compressed: the error-feedback state is partly per rank (EControl: e_i, h_i; only h is
        #   replicated); rank 0's copy cannot stand in for rank 1's, so commopt restarts the feedback
        #   with dense rounds (with a warning): the run continues, not bitwise as the uninterrupted one.
        # * co2: θ (anchor) and the outer momentum m are replicated, but CO2's per-rank state is the
        #   round start s_i, the position in the round, the outer exchange's feedback state, and the
        #   inner AdamW's moments, which CO2 never averages. finish() before every save makes s_i = θ
        #   and the position 0 on every rank, so only the AdamW moments of rank 0 replace rank 1's:
        #   a small change of rank 1's iterates that a master-only checkpoint implies.
        # --ckpt-mode per-rank loads this rank's own file: every optimizer resumes exactly.
        opt.load_state_dict(checkpoint["optimizer"])
        if scaler.is_enabled() and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])  # the loss scale and its growth tracker
    checkpoint = None  # free memory

    say(f"{info.launcher}: world {world_size}, backend {dist.get_backend()}, device {device}, opt {args.opt} "
        f"({type(opt).__name__}), dtype {args.dtype}, scaler {'on' if scaler.is_enabled() else 'off'}, "
        f"master {os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}")
    say(f"data: {meta['train_files']} train files / {meta['train_chars']} chars, {meta['val_files']} val files / "
        f"{meta['val_chars']} chars from {meta['root']} (digest {meta['digest']}), vocab {len(VOCAB)}")
    say(f"model: {raw_model.num_params() / 1e6:.3f}M non-embedding params "
        f"({raw_model.num_params(False) / 1e6:.3f}M total); AdamW groups: {n_decay} decayed, {n_no_decay} not")
    if args.opt == "mkor":
        say(f"MKOR preconditions {len(opt.layer_names)} layers; tied (left to AdamW): "
            f"{getattr(opt, 'tied_layers', 'n/a')}")
    if resumed_from is not None:
        say(f"resumed from {resumed_from} at iter {iter_num}; replicas agree: {replicas_agree(raw_model, world_size)}")

    def sync_replicas() -> None:
        # CO2's replicas differ mid-round (local steps); finish() applies the all-reduce in flight and
        # averages this round's local progress, so every rank holds the same model (training continues).
        if args.opt == "co2":
            opt.finish()

    def save_checkpoint(it: int) -> None:
        # opt.state_dict() on every rank (a wrapper may need its peers, e.g. to wait for a collective);
        # the file is written by rank 0 only, nanoGPT-style (per-rank mode: every rank writes its own).
        ckpt = {"model": raw_model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                "model_args": model_args,
                "iter_num": it, "best_val_loss": best_val_loss, "config": vars(args),
                "world_size": world_size, "rank": rank}
        tags = ([""] if args.ckpt_mode != "per-rank" and master else []) + (
            [f".rank{rank}"] if args.ckpt_mode != "master" else [])
        os.makedirs(args.out_dir, exist_ok=True)
        for tag in tags:
            for name in (f"ckpt_{it:06d}{tag}.pt", f"ckpt{tag}.pt"):
                path = os.path.join(args.out_dir, name)
                torch.save(ckpt, path + ".tmp")
                os.replace(path + ".tmp", path)
        what = {"master": "ckpt_{:06d}.pt", "per-rank": "ckpt_{:06d}.rank*.pt",
                "both": "ckpt_{:06d}.pt + ckpt_{:06d}.rank*.pt"}[args.ckpt_mode].replace("{:06d}", f"{it:06d}")
        say(f"saved checkpoint at iter {it}: {args.out_dir}/{what}")
        dist.barrier()

    history = []
    start_iter = iter_num
    skipped_steps = 0
    t_last, iters_since = time.perf_counter(), 0
    while True:
        lr = get_lr(iter_num, args)
        for group in opt.param_groups:
            group["lr"] = lr

        do_eval = iter_num % args.eval_every == 0 or iter_num == args.max_iters
        do_save = iter_num > start_iter and (
            (args.save_every and iter_num % args.save_every == 0) or iter_num == args.max_iters)
        if do_eval or do_save:
            sync_replicas()
        if do_eval:
            dt_ms = 1000 * (time.perf_counter() - t_last) / max(1, iters_since)
            losses = estimate_loss(raw_model, data, args, ctx, rank, world_size)
            agree = replicas_agree(raw_model, world_size)
            best_val_loss = min(best_val_loss, losses["val"])
            history.append({"iter": iter_num, "train": losses["train"], "val": losses["val"],
                            "ms_per_iter": dt_ms if iters_since else None, "replicas_agree": agree})
            say(f"iter {iter_num:5d}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
                f"{dt_ms if iters_since else float('nan'):.1f} ms/iter, lr {lr:.2e}, replicas agree {agree}")
        if do_save:
            save_checkpoint(iter_num)
        if iter_num >= args.max_iters:
            break
        if do_eval:
            t_last, iters_since = time.perf_counter(), 0

        # -- one iteration: grad_accum micro-steps, only the last one all-reduces (DDP / commopt hook)
        for micro in range(args.grad_accum):
            x, y = get_batch(data["train"], args.batch_size, args.block_size, args.seed, "train", rank, iter_num, micro)
            model.require_backward_grad_sync = micro == args.grad_accum - 1
            with ctx:
                _, loss = model(x, y)
                loss = loss / args.grad_accum
            scaler.scale(loss).backward()
        if args.grad_clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        scale_before = scaler.get_scale() if scaler.is_enabled() else None
        scaler.step(opt)
        scaler.update()
        if scale_before is not None and scaler.get_scale() < scale_before:
            skipped_steps += 1  # inf/nan gradient: GradScaler skipped opt.step() and lowered the scale
        opt.zero_grad(set_to_none=True)
        iter_num += 1
        iters_since += 1

    stats = opt.comm_stats() if hasattr(opt, "comm_stats") else None
    say(f"comm_stats (rank 0): {stats}" if stats is not None else "comm_stats: n/a (plain DDP)")
    if scaler.is_enabled():
        say(f"GradScaler: scale {scaler.get_scale():g}, {skipped_steps} step(s) skipped in this run")
    if master:
        final = history[-1] if history else {}
        result = {"opt": args.opt, "world_size": world_size, "start_iter": start_iter, "resumed_from": resumed_from,
                  "final_iter": iter_num, "final_train_loss": final.get("train"),
                  "final_val_loss": final.get("val"), "replicas_agree": final.get("replicas_agree"),
                  "history": history, "comm_stats": stats, "scaler_scale": scaler.get_scale() if scaler.is_enabled()
                  else None, "skipped_steps": skipped_steps, "config": vars(args)}
        with open(os.path.join(args.out_dir, "result.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        # one readable traceback per rank, prefixed, so the driver's log shows which rank failed where
        r = os.environ.get("RANK", "?")
        sys.stderr.write("".join(f"[rank {r}] {line}\n" for line in traceback.format_exc().splitlines()))
        sys.stderr.flush()
        raise SystemExit(1)
