"""commopt.save_checkpoint / load_checkpoint at world size 1, and kill-and-restart from per-rank files.

* unreadable files (truncated, garbage, empty, missing, a flipped bit, a directory, objects that
  weights_only refuses) raise :class:`commopt.CheckpointError` naming the path and the cause, and
  the model and optimizer stay as they were (training goes on);
* every commopt optimizer's state dict loads with ``weights_only=True``;
* save is atomic: a save that fails midway, or a process SIGKILLed while saving, never leaves a
  truncated file under the real name;
* a structurally damaged optimizer state dict (missing keys, wrong shapes) raises and changes nothing;
* kill and restart: 2 ranks (plain RANK/WORLD_SIZE subprocesses, gloo) train CompressedOptimizer(DDP,
  AdamW, TopK, EControl), CO2(DDP, AdamW, tau=4; checkpoint mid-round with the outer all-reduce
  pending) and MKOR(DDP, AdamW) to step 10, save per-rank checkpoints, SIGKILL themselves; fresh
  processes resume to step 24: the final parameters equal the uninterrupted run's bitwise on every rank.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import commopt
from commopt import CheckpointError, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "resume_torchrun.py"


def _model_opt():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    opt = commopt.MKOR(model, torch.optim.AdamW(model.parameters(), lr=1e-2), update_every=2)
    return model, opt


def _train(model, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(torch.randn(8, 6, generator=g)), torch.randn(8, 3, generator=g)).backward()
        opt.step()


def _snapshot(model, opt):
    return copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and bool(
            torch.equal(a, b) or (torch.isnan(a).any() and torch.equal(a.nan_to_num(), b.nan_to_num())))
    return a == b


@pytest.fixture
def trained(tmp_path):
    model, opt = _model_opt()
    _train(model, opt, 5)
    path = tmp_path / "ckpt_rank0.pt"
    save_checkpoint({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()}, path)
    return model, opt, path


def test_round_trip_weights_only(trained):
    model, opt, path = trained
    ck = load_checkpoint(path)
    assert _same(ck["model"], model.state_dict()) and _same(ck["opt"], opt.state_dict())
    assert list(path.parent.iterdir()) == [path]   # no temporary file left behind


def test_co2_state_dict_loads_weights_only(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 2)
    opt = commopt.CO2(model, torch.optim.AdamW(model.parameters(), lr=1e-2), tau=3, compressor="topk:0.3")
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(4, 5)).square().mean().backward()
        opt.step()
    sd = opt.state_dict()   # one process: no mid-round warning
    save_checkpoint({"opt": sd}, tmp_path / "c.pt")
    assert _same(load_checkpoint(tmp_path / "c.pt")["opt"], sd)
    opt.finish()


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "truncated_tail":   # only the last bytes missing
        path.write_bytes(data[:-10])
    elif how == "garbage":
        path.write_bytes(os.urandom(len(data)))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "missing":
        path.unlink()
    elif how == "bitflip":   # one bit of tensor data: torch.load alone would load it silently
        b = bytearray(data)
        i = b.find(b"data/0") + 200
        b[i] ^= 0x10
        path.write_bytes(bytes(b))
    elif how == "directory":
        path.unlink()
        path.mkdir()
    else:
        raise ValueError(how)


CAUSES = {"truncated": "truncated", "truncated_tail": "truncated", "garbage": "not a torch checkpoint",
          "empty": "empty", "missing": "no such file", "bitflip": "CRC-32 mismatch", "directory": "directory"}


@pytest.mark.parametrize("how", sorted(CAUSES))
def test_unreadable_file_raises_clearly_and_changes_nothing(trained, how):
    model, opt, path = trained
    before = _snapshot(model, opt)
    _damage(path, how)
    with pytest.raises(CheckpointError) as info:
        ck = load_checkpoint(path)
        model.load_state_dict(ck["model"])   # never reached
        opt.load_state_dict(ck["opt"])
    msg = str(info.value)
    assert msg.startswith("commopt.load_checkpoint: could not read ") and str(path) in msg, msg
    assert CAUSES[how] in msg, msg
    assert isinstance(info.value, ValueError)
    assert _same(_snapshot(model, opt), before)
    _train(model, opt, 2, seed=1)   # training goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bitflip_loads_without_verify(trained):
    """verify=False is torch.load's own behaviour: a flipped data bit goes unnoticed."""
    _, _, path = trained
    _damage(path, "bitflip")
    load_checkpoint(path, verify=False)


def test_weights_only_refusal_says_so_and_false_loads(tmp_path):
    np = pytest.importorskip("numpy")
    path = tmp_path / "np.pt"
    save_checkpoint({"np_rng": np.random.get_state()}, path)
    with pytest.raises(CheckpointError, match=r"weights_only=True\) does not allow.*pass weights_only=False"):
        load_checkpoint(path)
    assert load_checkpoint(path, weights_only=False)["np_rng"][0] == "MT19937"


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint({"v": torch.arange(3)}, path)
    real_save = torch.save

    def half_then_crash(obj, f, **kw):
        real_save(obj, f, **kw)
        f.truncate(f.tell() // 2)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"v": torch.arange(1000)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(load_checkpoint(path)["v"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


_SAVER = """
import sys, torch, commopt
big = {"w": torch.randn(2_000_000), "i": 0}
i = 0
while True:
    i += 1
    big["i"] = i
    commopt.save_checkpoint(big, sys.argv[1])
    print(i, flush=True)
"""


@pytest.mark.timeout(120)
def test_sigkill_mid_save_never_leaves_a_truncated_file(tmp_path):
    """A process saving an 8 MB checkpoint in a loop is SIGKILLed at arbitrary moments: the real name
    always holds a complete checkpoint (only leftover temporary files may be partial)."""
    path = tmp_path / "ck.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for delay in (0.0, 0.05, 0.13, 0.31):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(path)], stdout=subprocess.PIPE, env=env, text=True)
        first = proc.stdout.readline()   # at least one save completed
        assert first.strip(), "the saver died"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        ck = load_checkpoint(path)
        assert ck["w"].numel() == 2_000_000 and ck["i"] >= 1
    leftovers = [p for p in tmp_path.iterdir() if p != path]
    assert all(p.name.startswith(".ck.pt.") and p.name.endswith(".tmp") for p in leftovers), leftovers


# -- structurally damaged state dicts (world size 1; the multi-rank agreement: tests/mpi/test_mpi_resume.py) --

def _mkor_damages(sd):
    out = {}
    d = copy.deepcopy(sd); del d["mkor"]["factors"]; out["mkor_missing_factors"] = d
    d = copy.deepcopy(sd); name = next(iter(d["mkor"]["factors"])); f = d["mkor"]["factors"][name]
    f["left"] = f["left"][:-1]; out["mkor_factor_shape"] = d
    d = copy.deepcopy(sd); d["param_groups"][0]["params"] = d["param_groups"][0]["params"][:-1]
    out["inner_group_size"] = d
    d = copy.deepcopy(sd); del d["state"]; out["no_state_key"] = d
    d = copy.deepcopy(sd); k = next(iter(d["state"])); d["state"][k]["exp_avg"] = d["state"][k]["exp_avg"][:1]
    out["inner_moment_shape"] = d
    return out


@pytest.mark.parametrize("damage", ["mkor_missing_factors", "mkor_factor_shape", "inner_group_size",
                                    "no_state_key", "inner_moment_shape"])
def test_damaged_mkor_state_dict_raises_and_changes_nothing(damage):
    model, opt = _model_opt()
    _train(model, opt, 5)
    sd = copy.deepcopy(opt.state_dict())
    _train(model, opt, 3, seed=2)   # the live state moves on
    before = _snapshot(model, opt)
    with pytest.raises((ValueError, KeyError, RuntimeError)):
        opt.load_state_dict(_mkor_damages(sd)[damage])
    assert _same(_snapshot(model, opt), before)
    _train(model, opt, 2, seed=3)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -- kill and restart from per-rank files (2 ranks, fresh processes) ----------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], world: int = 2, timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Run the script as ``world`` ranks (RANK/WORLD_SIZE/MASTER_* like torchrun sets them)."""
    port = _free_port()
    procs = []
    for r in range(world):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        env.pop("TORCHELASTIC_RESTART_COUNT", None)
        procs.append(subprocess.Popen([sys.executable, str(SCRIPT), *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    out = []
    try:
        for p in procs:
            stdout, _ = p.communicate(timeout=timeout)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


KINDS = ["compressed", "co2", "mkor"]
STEPS, KILL = 24, 10


@pytest.mark.timeout(600)
def test_kill_and_restart_equals_uninterrupted(tmp_path):
    common = ["--opt", ",".join(KINDS), "--steps", str(STEPS), "--save-every", "5"]
    full = _launch(common + ["--ckpt-dir", str(tmp_path / "A_ck"), "--out", str(tmp_path / "A")])
    assert all(p.returncode == 0 for p in full), [p.stdout[-3000:] for p in full]
    killed = _launch(common + ["--ckpt-dir", str(tmp_path / "B_ck"), "--out", str(tmp_path / "B"),
                               "--die-after-save", str(KILL)])
    assert all(p.returncode == -signal.SIGKILL for p in killed), [(p.returncode, p.stdout[-3000:]) for p in killed]
    assert not (tmp_path / "B").exists() or not any((tmp_path / "B").rglob("final_rank*.pt"))
    resumed = _launch(common + ["--ckpt-dir", str(tmp_path / "B_ck"), "--out", str(tmp_path / "B")])
    assert all(p.returncode == 0 for p in resumed), [p.stdout[-3000:] for p in resumed]
    for kind in KINDS:
        for r in range(2):
            res = json.loads((tmp_path / "B" / kind / f"result_rank{r}.json").read_text())
            assert res["resumed_from"] == KILL, res
            a = torch.load(tmp_path / "A" / kind / f"final_rank{r}.pt")
            b = torch.load(tmp_path / "B" / kind / f"final_rank{r}.pt")
            for key in a:   # "params" (and CO2's "finished": after opt.finish())
                diff = [j for j, (x, y) in enumerate(zip(a[key], b[key])) if not torch.equal(x, y)]
                assert diff == [], f"{kind} rank {r} {key}: parameters {diff} differ after the restart"
        if kind == "co2":   # the checkpoint step fell mid-round with the previous outer all-reduce unapplied
            res = json.loads((tmp_path / "B" / kind / "result_rank0.json").read_text())
            assert res["resumed_checkpoint_co2"]["position"] == KILL % 4 and res["resumed_checkpoint_co2"]["pending"]
    # the ranks' models differ (per-rank data) for CO2 mid-round; DDP-synchronised optimizers agree
    for kind in ("compressed", "mkor"):
        p0, p1 = (torch.load(tmp_path / "A" / kind / f"final_rank{r}.pt")["params"] for r in range(2))
        assert all(torch.equal(x, y) for x, y in zip(p0, p1))


def test_damaged_group_or_missing_state_is_refused_by_the_inner_load():
    """A saved param group without 'lr' (torch loads it; the next step fails), or a dict without 'state':
    refused inside the wrapper's inner load, with nothing changed."""
    model, opt = _model_opt()
    _train(model, opt, 4)
    sd = copy.deepcopy(opt.state_dict())
    before = _snapshot(model, opt)
    no_lr = copy.deepcopy(sd)
    del no_lr["param_groups"][0]["lr"]
    with pytest.raises(ValueError, match=r"param group 0 of the checkpoint lacks \['lr'\]"):
        opt.load_state_dict(no_lr)
    no_state = {k: v for k, v in sd.items() if k not in ("state", "param_groups")}
    with pytest.raises(ValueError, match="not an optimizer state_dict"):
        opt.load_state_dict(no_state)
    assert _same(_snapshot(model, opt), before)
    _train(model, opt, 2, seed=4)
