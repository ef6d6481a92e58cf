"""A training script that checkpoints every K steps and resumes from the newest complete checkpoint.

Run it under torchrun with restarts; one worker SIGKILLs itself mid-run on the first attempt only::

    .venv/bin/torchrun --nproc_per_node 2 --max-restarts 2 experiments/resume_torchrun.py \\
        --opt compressed --steps 40 --save-every 5 --kill-at 23 --ckpt-dir /tmp/ck --out /tmp/out

torchrun restarts the whole group; every rank then finds, by agreement
(:func:`commopt.latest_checkpoint`), the newest step for which every rank has a complete file, loads
its own file (:func:`commopt.load_checkpoint`: a collective, so an unreadable file raises on every rank)
and trains on to ``--steps``. Checkpoints are per rank (:func:`commopt.save_checkpoint`: atomic) and hold
the model, the optimizer, the LR scheduler, the data sampler's generator and torch's global RNG state
(the model has dropout), so the resumed run sees exactly the batches and dropout masks of an
uninterrupted one. ``experiments/resume_torchrun_check.py`` compares it to an uninterrupted run.

Without torchrun it also runs from plain ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``
(``tests/test_resume.py`` does that); ``--die-after-save STEP`` stops training right after the
checkpoint of STEP is on disk (a barrier first) and then makes every rank SIGKILL itself, which that
test uses. ``--opt compressed,co2,mkor`` runs the three one after the other in one process (one
interpreter start), each in its own ``CKPT_DIR/<opt>`` and ``OUT/<opt>``.

Optimizers (``--opt``): ``compressed`` = CompressedOptimizer(DDP, AdamW, topk:0.05, EControl);
``co2`` = CO2(DDP, AdamW, tau=4), whose checkpoint steps (not multiples of 4 by default) fall mid-round
with the previous round's outer all-reduce in flight; ``mkor`` = MKOR(DDP, AdamW, update_every=3).

Each rank writes ``OUT[/<opt>]/final_rank{r}.pt`` (the parameters at the end; for CO2 also after ``finish()``)
and ``OUT[/<opt>]/result_rank{r}.json`` (restart count, the step it resumed from, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import commopt  # noqa: E402
from commopt.checkpoint import steps_in  # noqa: E402

D_IN, D_HID, D_OUT, ROWS = 16, 32, 4, 8


def build(kind: str):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D_IN, D_HID), torch.nn.Tanh(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(D_HID, D_HID), torch.nn.Tanh(), torch.nn.Linear(D_HID, D_OUT))
    ddp = DDP(model)
    adamw = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    if kind == "compressed":
        opt = commopt.CompressedOptimizer(ddp, adamw, compressor="topk:0.05", feedback="econtrol")
    elif kind == "co2":
        opt = commopt.CO2(ddp, adamw, tau=4)
    elif kind == "mkor":
        opt = commopt.MKOR(ddp, adamw, update_every=3)
    else:
        raise ValueError(kind)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=200)
    return model, ddp, opt, sched


def run(kind: str, args, rank: int, world: int, attempt: int, ckpt_dir: Path, out: Path) -> None:
    """Train ``kind`` to ``args.steps`` (resuming from the newest complete checkpoint in ``ckpt_dir``)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    model, ddp, opt, sched = build(kind)
    data = torch.Generator().manual_seed(1000 + rank)     # the sampler: a stateful generator per rank
    torch.manual_seed(100 + rank)                          # dropout draws from torch's global RNG
    start, resumed_co2 = 0, None
    local = steps_in(ckpt_dir, rf"step(\d+)_rank{rank}\.pt")
    newest_local = max(local, default=None)                # this rank may be a save ahead of the others
    step, path = commopt.latest_checkpoint(lambda: local)
    if step is not None:
        ck = commopt.load_checkpoint(path)                 # a collective: unreadable anywhere -> raises everywhere
        model.load_state_dict(ck["model"])                 # the model first (CO2's models are per rank)
        opt.load_state_dict(ck["opt"])                     # a collective too
        sched.load_state_dict(ck["sched"])
        data.set_state(ck["data_rng"])
        torch.set_rng_state(ck["torch_rng"])
        start, resumed_co2 = int(ck["step"]), ck.get("co2")
        assert start == step
    print(f"[rank {rank}] {kind} attempt {attempt}: " + (f"resumed from step {start} ({path}; newest file of this rank: step {newest_local})" if step is not None
                                                         else "no checkpoint, starting at step 0"), flush=True)
    in_flight_at_save = []
    loss = torch.zeros(())
    for t in range(start, args.steps):
        if args.kill_at and t == args.kill_at and attempt == 0 and rank == args.kill_rank:
            print(f"[rank {rank}] {kind}: SIGKILL before step {t}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        x = torch.randn(ROWS, D_IN, generator=data)
        y = torch.randn(ROWS, D_OUT, generator=data) + 0.3 * rank
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        opt.step()
        sched.step()
        done = t + 1
        if done % args.save_every == 0 and done < args.steps:
            # CO2: the position in the round, and whether an outer all-reduce is in flight / not yet applied
            co2 = {"position": opt.position, "in_flight": bool(opt.exchange.in_flight),
                   "pending": bool(opt.exchange.pending)} if kind == "co2" else None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # CO2 mid-round: we do save per-rank models
                state = {"step": done, "rank": rank, "world_size": world, "model": model.state_dict(),
                         "opt": opt.state_dict(), "sched": sched.state_dict(), "data_rng": data.get_state(),
                         "torch_rng": torch.get_rng_state(), "co2": co2}
            if co2 is not None:
                in_flight_at_save.append({"step": done, **co2})
            commopt.save_checkpoint(state, ckpt_dir / f"step{done}_rank{rank}.pt")
            for old in sorted(steps_in(ckpt_dir, rf"step(\d+)_rank{rank}\.pt"))[:-args.keep]:
                os.unlink(ckpt_dir / f"step{old}_rank{rank}.pt")
            if args.die_after_save and done == args.die_after_save:
                dist.barrier()                              # every rank's file of this step is on disk
                print(f"[rank {rank}] {kind}: saved step {done}, stopping here", flush=True)
                return
    final = {"params": [q.detach().clone() for q in model.parameters()]}
    if kind == "co2":
        opt.finish()
        final["finished"] = [q.detach().clone() for q in model.parameters()]
    torch.save(final, out / f"final_rank{rank}.pt")
    result = {"opt": kind, "rank": rank, "world_size": world, "restart_count": attempt,
              "resumed_from": start if step is not None else None, "newest_local_checkpoint": newest_local,
              "steps": args.steps,
              "co2_saves": in_flight_at_save or None,
              "resumed_checkpoint_co2": resumed_co2, "final_loss": float(loss.detach())}
    (out / f"result_rank{rank}.json").write_text(json.dumps(result))
    print(f"[rank {rank}] RESULT {json.dumps(result)}", flush=True)


def init_process_group(timeout: timedelta) -> None:
    """gloo from torchrun's (or plain RANK/WORLD_SIZE/MASTER_*) environment. Under torchrun the store keys
    get a per-attempt prefix: after a restart, ``init_process_group("gloo")`` through env:// read the
    previous attempt's (dead) peers' addresses from the store here (``Gloo connectFullMesh failed ...
    Connection refused`` on every restart, torch 2.13, ``--standalone``)."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        dist.init_process_group("gloo", timeout=timeout)
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_store and rank == 0, timeout=timeout)
    dist.init_process_group("gloo", store=dist.PrefixStore(f"resume_torchrun/attempt_{attempt}", store),
                            rank=rank, world_size=world, timeout=timeout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--opt", default="compressed",
                   help="compressed | co2 | mkor, or several comma-separated (run one after the other, "
                        "each in CKPT_DIR/<opt> and OUT/<opt>)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept per rank (>= 2: ranks may be one apart)")
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--kill-at", type=int, default=0,
                   help="on the first attempt, --kill-rank SIGKILLs itself before step KILL_AT (0: never)")
    p.add_argument("--kill-rank", type=int, default=1)
    p.add_argument("--die-after-save", type=int, default=0,
                   help="stop each optimizer's run once the checkpoint of this step is saved (a barrier first), "
                        "then every rank SIGKILLs itself (0: never)")
    p.add_argument("--timeout", type=float, default=60.0, help="process-group timeout, seconds")
    args = p.parse_args()
    kinds = args.opt.split(",")
    if any(k not in ("compressed", "co2", "mkor") for k in kinds):
        p.error(f"--opt: unknown optimizer in {args.opt!r}")

    torch.set_num_threads(1)
    init_process_group(timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    for kind in kinds:
        sub = (lambda d: Path(d) / kind) if len(kinds) > 1 else Path
        run(kind, args, rank, world, attempt, sub(args.ckpt_dir), sub(args.out))
    if args.die_after_save:
        print(f"[rank {rank}] SIGKILL after the saves", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
