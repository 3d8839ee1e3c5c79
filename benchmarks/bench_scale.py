"""Wall time and memory of each command at reference scale, every command a separate process, beside its floor.

The checkpoint is the reference layout, consolidated (tests/reference_layout.py writes it): D 1024, 4 layers, memory
layers 1 and 3 sharing one value table of 1,048,576 slots x 1024 in bfloat16 (2 GiB; the consolidated file holds a
copy per memory layer, 4.5 GB), H 4, k 32, K 512, bytes tokenizer. It is built once and cached under
~/.cache/memedit-bench (``--n-keys`` and ``--dim`` make a smaller or larger one). TEXT is 200 lines of ~70 bytes;
NATIVE is the folder ``convert`` writes (made fresh on every run). ``export`` runs right after ``audit``: the
commands after it change the model, and export refuses statistics gathered on another model.

Per command it samples, every 50 ms, the anonymous resident memory (``RssAnon`` of /proc/PID/status: private memory;
pages of a mapped checkpoint are the page cache's and do not count) and the total RSS of the process and all its
children, and prints wall time, peak private memory, peak total RSS and bytes written (``ru_oublock``) beside the
floor, and the CPU time (user + system) of the command's process, which a busy machine inflates less than the
wall time. The load average is printed before and after: on a shared machine the figures move with it.

Usage: nice -n 10 python benchmarks/bench_scale.py [--n-keys 1024] [--dim 1024] [--timeout 600] [--only info,convert]
                                                   [--smoke]
It needs about 5 GB of memory while it builds the checkpoint and ~7 GB of disk.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "memedit-bench"
GB = 1e9
PROMPT = "The capital of France is"


@dataclass
class Row:
    name: str  # what the README table shows
    args: list[str]  # the memedit command line (without the executable)
    floor_wall: float  # seconds
    floor_private: float  # GB
    note: str = ""  # a floor beyond wall and memory, printed beside it


def build_checkpoint(n_keys: int, dim: int) -> Path:
    """The consolidated reference checkpoint (cached): its folder holding consolidated.pth and params.json."""
    import torch

    from tests.reference_layout import params, reference_state, write_consolidated

    step = CACHE / f"scale-D{dim}-N{n_keys}"
    folder = step / "consolidated"
    if (folder / "consolidated.pth").is_file() and (folder / "params.json").is_file():
        return folder
    shutil.rmtree(step, ignore_errors=True)
    H, k, K = 4, 32, 512
    p = params(mem_n_keys=n_keys, mem_heads=H, mem_knn=k, mem_k_dim=K, layers="1,3")
    p["model"].update(dim=dim, n_heads=max(1, dim // 64), n_kv_heads=max(1, dim // 128), multiple_of=256,
                      max_seqlen=1024)
    # Everything but the memory from the fixture writer at a small N (fast), then the full-size sub-keys and the
    # value table, generated a block of rows at a time so that no float32 copy of the table ever exists.
    small = params(mem_n_keys=k, mem_heads=H, mem_knn=k, mem_k_dim=K, layers="1,3")
    small["model"].update({f: p["model"][f] for f in ("dim", "n_heads", "n_kv_heads", "multiple_of", "max_seqlen")})
    t0 = time.perf_counter()
    state = reference_state(small)
    g = torch.Generator().manual_seed(1)
    table = torch.empty(n_keys * n_keys, dim, dtype=torch.bfloat16)
    block = 1 << 16
    for r in range(0, table.shape[0], block):
        table[r : r + block] = (torch.randn(min(block, table.shape[0] - r), dim, generator=g) * dim**-0.5).bfloat16()
    for L in (1, 3):
        f = f"layers.{L}.feed_forward."
        state[f + "keys"] = torch.randn(2 * H * n_keys, K // 2, generator=g)
        state[f + "values.weight"] = table if L == 1 else table.clone()  # the reference stores a copy per layer
    del table
    step.mkdir(parents=True, exist_ok=True)
    tmp = step / ".building"
    shutil.rmtree(tmp, ignore_errors=True)
    write_consolidated(tmp, state, p)
    os.replace(tmp / "consolidated", folder)
    shutil.rmtree(tmp, ignore_errors=True)
    size = (folder / "consolidated.pth").stat().st_size
    print(f"built {folder} ({size / GB:.2f} GB) in {time.perf_counter() - t0:.0f} s", flush=True)
    return folder


def write_text(path: Path, lines: int = 200, seed: int = 0) -> Path:
    """``lines`` lines of ~70 bytes of English-like text (a fixed word list, a fixed seed)."""
    words = ("the of and to in is was for on that with as by at from his her it an were which are this be has "
             "capital city river north old new king queen born year people country France Paris Rome Berlin water "
             "music school house garden market bridge station library church museum river valley island mountain"
             ).split()
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        line = ""
        while len(line) < 70:
            line += rng.choice(words) + " "
        out.append(line.strip().capitalize() + ".")
    path.write_text("\n".join(out) + "\n")
    return path


def descendants(pid: int) -> list[int]:
    """pid and every process below it (from the parent ids in /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def memory_of(pids: list[int]) -> tuple[int, int]:
    """(RssAnon, VmRSS) in bytes summed over ``pids``."""
    anon = rss = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        anon += int(line.split()[1]) * 1024
                    elif line.startswith("VmRSS:"):
                        rss += int(line.split()[1]) * 1024
        except OSError:
            pass
    return anon, rss


def run(args: list[str], cwd: Path, timeout: float) -> dict:
    """Run one memedit command; wall, peak private and total memory, bytes written, exit code, last error line."""
    cmd = [sys.executable, "-m", "memedit_cli", *args]
    err = open(cwd / "stderr.txt", "w+")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err)
    peak_anon = peak_rss = 0
    killed = False
    status = usage = None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        anon, rss = memory_of(descendants(proc.pid))
        peak_anon, peak_rss = max(peak_anon, anon), max(peak_rss, rss)
        if time.perf_counter() - t0 > timeout and not killed:
            proc.kill()
            killed = True
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err.seek(0)
    lines = [ln.strip() for ln in err.read().splitlines() if ln.strip()]
    err.close()
    # ru_maxrss is not used: after fork + exec it keeps this (parent) process's high-water mark
    return {"wall": wall, "private": peak_anon, "rss": peak_rss,
            "written": usage.ru_oublock * 512, "cpu": usage.ru_utime + usage.ru_stime, "rc": proc.returncode,
            "killed": killed,
            "error": lines[-1][:140] if lines and proc.returncode else ""}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-keys", type=int, default=1024, help="N: sub-keys per half (N² slots)")
    ap.add_argument("--dim", type=int, default=1024, help="D: model dim and value row width")
    ap.add_argument("--timeout", type=float, default=600, help="seconds before a command is killed")
    ap.add_argument("--only", default="", help="comma-separated row names to run (convert always runs)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--reuse", action="store_true", help="keep the last run's NATIVE folder and files (with --only: "
                                                          "rerun a few rows; convert is skipped when NATIVE exists)")
    ap.add_argument("--smoke", action="store_true",
                    help="a 1,024-slot checkpoint, D 128, every command once; exit 1 if one fails (not a measurement)")
    args = ap.parse_args()
    if args.smoke:
        args.n_keys, args.dim, args.reuse, args.only = 32, 128, False, ""

    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    cons = build_checkpoint(args.n_keys, args.dim)
    work = CACHE / ("scale-smoke" if args.smoke else "scale-run")
    if not args.reuse:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    text = write_text(work / "text.txt")
    native = work / "native"
    rows = [
        Row("info --model CONSOLIDATED", ["info", "--model", str(cons)], 3, 0.5),
        Row("convert NATIVE --model CONSOLIDATED", ["convert", str(native), "--model", str(cons)], 60, 3),
        Row(f'generate "{PROMPT}" -n 3', ["generate", PROMPT, "-n", "3", "--model", str(native)], 5, 1.5),
        Row(f'inspect "{PROMPT}" --target " Paris" --json',
            ["inspect", PROMPT, "--target", " Paris", "--json", "--model", str(native)], 10, 1.5),
        Row("patch set -t shared -r 5,9 --scalar 0 --apply",
            ["patch", "set", "-t", "shared", "-r", "5,9", "--scalar", "0", "--apply", "--model", str(native)], 3, 1.5,
            "<= 1 MB written"),
        Row("audit TEXT --tokens 4000 --out A.h5",
            ["audit", str(text), "--tokens", "4000", "--out", str(work / "A.h5"), "--model", str(native)], 15, 1.5),
        Row("export --out E.h5 --stats A.h5",
            ["export", "--out", str(work / "E.h5"), "--stats", str(work / "A.h5"), "--model", str(native)], 60, 2),
        Row("background TEXT", ["background", str(text), "--model", str(native)], 30, 2),
        # a random model has no answer of its own to the prompt, so the old answer is given; its edits change much of
        # its text, so the guard refuses them: --force measures the whole path, commit included
        Row('edit --prompt "The capital of {} is" --subject France --target-new " Rome" --target-true " Paris" '
            '--force',
            ["edit", "--prompt", "The capital of {} is", "--subject", "France", "--target-new", " Rome",
             "--target-true", " Paris", "--force", "--model", str(native)], 30, 2),
        Row("keys adapt TEXT", ["keys", "adapt", str(text), "--model", str(native)], 60, 2),
        Row("verify --random 64 --json", ["verify", "--random", "64", "--json", "--model", str(native)], 40, 2),
    ]
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    results = []
    print("| command | wall | floor | CPU time | peak private | floor | peak total RSS | written | exit |\n"
          "|---|---|---|---|---|---|---|---|---|", flush=True)
    for row in rows:
        first = row.name.split()[0] if row.args[0] != "keys" else "keys " + row.args[1]
        if only and first not in only and not (row.args[0] == "convert" and not native.exists()):
            continue
        r = run(row.args, work, args.timeout)
        results.append({"command": row.name, **r, "floor_wall": row.floor_wall, "floor_private": row.floor_private})
        ok_w = "ok" if r["wall"] <= row.floor_wall else "over"
        ok_m = "ok" if r["private"] / GB <= row.floor_private else "over"
        exit_txt = "killed" if r["killed"] else str(r["rc"]) + (f": {r['error']}" if r["error"] else "")
        print(f"| `{row.name}` | {r['wall']:.1f} s | ≤ {row.floor_wall:g} s ({ok_w}) | {r['cpu']:.1f} s "
              f"| {r['private'] / GB:.2f} GB "
              f"| ≤ {row.floor_private:g} GB ({ok_m}) | {r['rss'] / GB:.2f} GB | {r['written'] / 1e6:,.1f} MB"
              f"{' (' + row.note + ')' if row.note else ''} | {exit_txt} |", flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"checkpoint D {args.dim}, N {args.n_keys} ({args.n_keys**2:,} slots), H 4, k 32, K 512, bfloat16 values; "
          f"{os.cpu_count()} CPUs; children's total CPU time "
          f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    failed = [r["command"] for r in results if r["rc"] or r["killed"]]
    if args.smoke and failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
