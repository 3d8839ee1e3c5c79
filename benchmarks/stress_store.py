"""Stress the model store: concurrent writers, random kill -9, 1,000 mixed operations reverted, a 2-row write on a
2 GiB table.

    nice python benchmarks/stress_store.py [--kills 52] [--ops 1000] [--runs 3] [--writers 8] [--skip-big] [--smoke]

1. writers   8 processes at once, each `patch set --apply` on its own row of one folder, 3 runs: every row must hold
             its value and every "applied" must be in the log (lost updates, phantom log entries).
2. kills     `patch set --apply`, `edit`, `keys adapt`, `freeze` on a copy of the demo model, each killed (SIGKILL) at
             a random moment; after each, `memedit check` must find the folder consistent (weights == row log) and
             leave no temp files.
3. mixed     1,000 random operations in one process (value patches, key patches, freeze/unfreeze), then every
             applied patch reverted, newest first: sha256 of the state dict must equal the original's.
4. big       a folder with a 1,048,576 x 1024 bf16 value table (2 GiB; sparse on disk, built once under
             ~/.cache/memedit-bench): `patch set -r 5,9 --scalar 0 --apply` as a separate process: wall time, bytes
             written, peak private memory (RssAnon).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import memedit  # noqa: E402
from memedit.storage.check import check_folder  # noqa: E402
from memedit.storage.checkpoint import save  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1")


def cmd(*args) -> list[str]:
    return [sys.executable, "-m", "memedit_cli", *map(str, args)]


def state_sha(path: Path) -> str:
    from memedit.storage.checkpoint import native_state

    h = hashlib.sha256()
    for k, v in sorted(native_state(memedit.load(path)).items()):
        h.update(k.encode())
        h.update(v.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def writers(base: Path, n: int, runs: int) -> dict:
    lost = phantom = refused = 0
    for run in range(runs):
        path = base / f"writers{run}"
        save(memedit.load(), path)
        procs = [subprocess.Popen(cmd("patch", "set", "-m", path, "-t", "shared", "-r", 100 + i, "--scalar", i + 1,
                                      "--apply", "--json"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
                 for i in range(n)]
        ids = {}
        for i, p in enumerate(procs):
            out, _ = p.communicate(timeout=300)
            if p.returncode == 0:
                ids[i] = json.loads(out)["id"]
            else:
                refused += 1
        m = memedit.load(path)
        w = m.table("shared").weight
        logged = set(json.loads(subprocess.run(cmd("patch", "log", "-m", path, "--json"), capture_output=True,
                                               env=ENV).stdout)["applied"])
        for i, pid in ids.items():
            lost += not bool(w[100 + i].eq(i + 1).all())
            phantom += (pid in logged) != bool(w[100 + i].eq(i + 1).all())
    return {"runs": runs, "writers": n, "lost_updates": lost, "log_disagrees": phantom, "refused": refused}


def kills(base: Path, n: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    path = base / "killed"
    save(memedit.load(), path)
    corpus = base / "corpus.txt"
    from memedit.world.facts import world_of

    world = world_of(memedit.load())
    corpus.write_text("\n".join(world.training_sentences()[:64]) + "\n")
    facts = [f.id for f in world.facts[:n]]
    ops = [
        lambda i: ("patch", "set", "-t", "shared", "-r", f"{i},{i + 1}", "--scalar", 0.01 * i, "--apply"),
        lambda i: ("edit", "--fact", facts[i % len(facts)], "--forgetting-sample", "0"),
        lambda i: ("keys", "adapt", corpus, "--steps", 3),
        lambda i: ("freeze", "-t", "shared", "-r", 2000 + i),
    ]
    inconsistent = temps = killed = finished = 0
    for i in range(n):
        args = ops[i % len(ops)](i)
        p = subprocess.Popen(cmd(*args, "-m", path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
        try:
            p.wait(timeout=rng.uniform(1.5, 6.0))
            finished += 1
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
            killed += 1
        r = subprocess.run(cmd("check", "-m", path, "--json"), capture_output=True, text=True, env=ENV)
        res = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {"ok": False, "problems": [r.stderr]}
        inconsistent += not res["ok"]
        temps += len(list(path.rglob(".*.tmp"))) + len(list(path.rglob(".tmp??????")))  # ours and safetensors'
    return {"runs": n, "killed": killed, "finished": finished, "inconsistent_after_check": inconsistent,
            "temp_files_left": temps}


def mixed(base: Path, n: int, seed: int = 0) -> dict:
    from memedit.editing import freeze as F
    from memedit.editing import patch as P
    from memedit.lm.hooks import keys_name
    from memedit.storage.patch import Patch
    from memedit.storage.store import Change

    rng = random.Random(seed)
    path = base / "mixed"
    save(memedit.load(), path)
    original = state_sha(path)
    m = memedit.load(path)
    t = m.table("shared")
    layers = list(m.memory_layers)
    applied_value, applied_keys, refused = [], [], 0
    t0 = time.perf_counter()
    for i in range(n):
        op = rng.random()
        try:
            if op < 0.5:
                rows = rng.sample(range(t.n_rows), rng.randint(1, 4))
                p = P.make_patch(m, {"shared": (rows, torch.randn(len(rows), t.weight.shape[1]))}, kind="set")
                P.apply(m, p)
                applied_value.append(p.id)
            elif op < 0.7:
                L = rng.choice(layers)
                k = m.memory_layers[L].keys
                rows = torch.tensor(sorted(rng.sample(range(k.shape[0]), 2)))
                kp = Patch([Change(keys_name(L), keys_name(L), rows, k.detach()[rows].clone(),
                                   k.detach()[rows] + 0.01 * torch.randn(2, k.shape[1]))], kind="keys")
                P.apply(m, kp)
                applied_keys.append(kp.id)
            elif op < 0.85:
                F.freeze(m, {"shared": rng.sample(range(t.n_rows), 3)})
            else:
                F.unfreeze(m, None)
        except memedit.MemeditError:
            refused += 1  # e.g. a random row that is frozen: refused, nothing written
    F.unfreeze(m, None)
    log = P.applied_ids(m)
    for pid in reversed(log):
        P.revert(m, pid)
    seconds = time.perf_counter() - t0
    after = state_sha(path)
    return {"operations": n, "value_patches": len(applied_value), "key_patches": len(applied_keys),
            "refused": refused, "reverted": len(log), "identical": after == original, "seconds": round(seconds, 1),
            "check_ok": check_folder(path)["ok"]}


def peak_anon(pid: int, stop: threading.Event, out: list) -> None:
    peak = 0
    while not stop.is_set():
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("RssAnon:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            break
        time.sleep(0.01)
    out.append(peak)


def big() -> dict:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "memedit-bench" / "store-2gib"
    if not (cache / "config.json").is_file():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.test_store import write_sparse_model

        shutil.rmtree(cache, ignore_errors=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_sparse_model(cache, n_keys=1024, dim=1024)
        # fold nothing, but write the base the way `convert` does: with its fingerprint sums (hashed once, here)
        subprocess.run(cmd("compact", "-m", cache), check=True, env=ENV)
        shutil.rmtree(cache / "memedit", ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix="store-big-"))
    try:
        folder = work / "m"
        folder.mkdir()
        for f in cache.iterdir():  # the base is never written: a hard link stands for a copy
            os.link(f, folder / f.name) if f.is_file() else None
        res = {}
        for run in ("first", "second"):
            size0 = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            t0 = time.perf_counter()
            rows, value = ("5,9", 0) if run == "first" else ("11,12", 1)
            p = subprocess.Popen(cmd("patch", "set", "-m", folder, "-t", "layer1", "-r", rows, "--scalar", value,
                                     "--apply", "--json"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
            stop, peak = threading.Event(), []
            th = threading.Thread(target=peak_anon, args=(p.pid, stop, peak))
            th.start()
            _, err = p.communicate()
            stop.set()
            th.join()
            wall = time.perf_counter() - t0
            size1 = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            res[run] = {"rc": p.returncode, "wall_s": round(wall, 2), "bytes_written": size1 - size0,
                        "peak_private_MiB": round(peak[0] / 2**20, 1) if peak else None}
            if p.returncode:
                res[run]["error"] = err.decode()[-300:]
        # the same command in a process that has already imported torch and memedit: the store's own cost
        code = ("import time, sys, torch, memedit.storage.checkpoint, memedit.editing.patch; "
                "from memedit_cli.app import app; "
                "from typer.testing import CliRunner; "
                "t = time.perf_counter(); r = CliRunner().invoke(app, sys.argv[1:]); "
                "print(r.exit_code, round(time.perf_counter() - t, 3))")
        r = subprocess.run([sys.executable, "-c", code, "patch", "set", "-m", str(folder), "-t", "layer1", "-r",
                            "13,14", "--scalar", "3", "--apply"], capture_output=True, text=True, env=ENV)
        rc, secs = r.stdout.split()[-2:]
        res["after_imports"] = {"rc": int(rc), "seconds": float(secs)}
        return {"table": "1,048,576 x 1024 bf16", **res}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--writers", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--kills", type=int, default=52)
    ap.add_argument("--ops", type=int, default=1000)
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="2 writers, 1 run, 2 kills, 20 operations, no 2 GiB table: does it run (not a measurement)")
    a = ap.parse_args()
    if a.smoke:
        a.writers, a.runs, a.kills, a.ops, a.skip_big = 2, 1, 2, 20, True
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="stress-store-") as d:
        base = Path(d)
        for name, fn in (("big", None if a.skip_big else big), ("writers", lambda: writers(base, a.writers, a.runs)),
                         ("mixed", lambda: mixed(base, a.ops)), ("kills", lambda: kills(base, a.kills))):
            if fn is None:
                continue
            t0 = time.perf_counter()
            res = fn()
            print(json.dumps({name: res, "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
