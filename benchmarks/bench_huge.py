"""A value table larger than RAM, opened from its DCP shards: wall time and private memory of each command.

The checkpoint is a reference-layout training step folder (params.json, .metadata, __0_0.distcp, __1_0.distcp) as
two gloo ranks write it (tests/sharded_dcp.py), with bench_scale.py's dimensions (D 1024, 4 layers, bytes tokenizer,
H 4, k 32, K 512) but ONE memory layer (layer 3) whose value table is 16,777,216 slots (N 4096) x 1024 in bfloat16:
32 GiB, more than the 24 GiB of RAM of the machine it was written for. Each rank writes its half in ``--chunks``
(>= 64) row chunks, each made from a seed and its row range when DCP asks for it, so no copy of the table exists
in memory or on disk. It is built once and cached under ~/.cache/memedit-bench/huge (34.4 GB of shards; the script
checks the free disk first and says what is missing).

Then each command runs as a fresh process on the DCP folder or on LINKED, the folder ``convert --link`` writes
(its base is the DCP folder itself): wall time, peak private memory (RssAnon of the process tree, sampled every
50 ms), bytes written, exit code, beside the issue's floors. Read-only commands run twice: cold (the shard files'
pages evicted from the page cache with posix_fadvise DONTNEED first) and warm (right after). At the end: the
shards' sha256 against the one taken before (byte-identical), and every patch and edit reverted must give back
the fingerprint LINKED had right after convert (the weights exactly). The load average is printed before and after
each command: timings on a shared machine move with it.

Usage: nice -n 10 python benchmarks/bench_huge.py [--n-keys 4096] [--dim 1024] [--chunks 64] [--only ...] [--smoke]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_scale import CACHE, GB, PROMPT, run, write_text  # noqa: E402

HUGE = CACHE / "huge"


def params_for(n_keys: int, dim: int) -> dict:
    from tests.reference_layout import params

    p = params(mem_n_keys=n_keys, mem_heads=4, mem_knn=32, mem_k_dim=512, layers="3")
    p["model"].update(dim=dim, n_heads=max(1, dim // 64), n_kv_heads=max(1, dim // 128), multiple_of=256,
                      max_seqlen=1024)
    return p


def build_checkpoint(n_keys: int, dim: int, chunks: int, root: Path = HUGE) -> Path:
    """The DCP step folder (cached): two ranks, ``chunks`` row chunks of the value table each."""
    from tests.sharded_dcp import write_sharded_step

    step = root / f"dcp-D{dim}-N{n_keys}-c{chunks}"
    if (step / "BUILT").is_file():
        return step
    shutil.rmtree(step, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    table = n_keys * n_keys * dim * 2
    need = table + (1 << 30)  # the table, everything else (~0.2 GB) and room
    free = shutil.disk_usage(root).free
    if free < need:
        sys.exit(f"building the checkpoint needs {need / GB:.1f} GB of disk under {root}; {free / GB:.1f} GB free "
                 f"({(need - free) / GB:.1f} GB missing)")
    t0 = time.perf_counter()
    print(f"building {step}: a {n_keys * n_keys:,} x {dim} bfloat16 table ({table / 2**30:.1f} GiB) in "
          f"{2 * chunks} chunks, two ranks ...", flush=True)
    tmp = root / f".{step.name}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    write_sharded_step(tmp, params_for(n_keys, dim), seed=1, chunks_per_rank=chunks, timeout=6 * 3600)
    os.replace(tmp, step)
    (step / "BUILT").write_text(f"{time.perf_counter() - t0:.0f} s\n")
    size = sum(f.stat().st_size for f in step.iterdir())
    print(f"built {step} ({size / GB:.2f} GB) in {time.perf_counter() - t0:.0f} s", flush=True)
    return step


def shard_files(step: Path) -> list[Path]:
    return sorted(step.glob("*.distcp")) + [step / ".metadata", step / "params.json"]


def sha256s(files: list[Path]) -> dict[str, str]:
    def one(f: Path) -> str:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while chunk := fh.read(16 << 20):
                h.update(chunk)
        return h.hexdigest()

    with ThreadPoolExecutor(max(1, min(len(files), os.cpu_count() or 1))) as ex:
        return dict(zip((f.name for f in files), ex.map(one, files), strict=True))


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (a cold start for the next command; needs no privileges)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-keys", type=int, default=4096, help="N: sub-keys per half (N² slots)")
    ap.add_argument("--dim", type=int, default=1024, help="D: model dim and value row width")
    ap.add_argument("--chunks", type=int, default=64, help="row chunks of the value table per rank")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds before a command is killed")
    ap.add_argument("--only", default="", help="comma-separated starts of the row names to run, e.g. info,edit,audit "
                    "(convert always runs)")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold runs")
    ap.add_argument("--no-sha", action="store_true", help="skip the sha256 of the shards before and after")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--smoke", action="store_true",
                    help="a 4,096-slot table, D 128, 8 chunks per rank, four commands once (not a measurement); exit "
                         "1 if one fails, the revert is not exact or the shards changed")
    args = ap.parse_args()
    root = HUGE
    if args.smoke:
        args.n_keys, args.dim, args.chunks, args.only = 64, 128, 8, ""
        root = CACHE / "huge-smoke"

    print(f"load average before: {load()}", flush=True)
    step = build_checkpoint(args.n_keys, args.dim, args.chunks, root)
    work = root / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    text = write_text(work / "text.txt")
    linked = work / "linked"
    files = shard_files(step)
    before = sha256s(files) if not args.no_sha else {}
    s = str
    # (name, args, wall floor s, private floor GB, written floor MB or None, read-only)
    rows = [
        ("info", ["info", "--model", s(step)], 3, 0.5, None, True),
        ("convert --link", ["convert", s(linked), "--model", s(step), "--link"], 90, 1.0, 100, False),
        ("generate -n 3", ["generate", PROMPT, "-n", "3", "--model", s(linked)], 10, 1.5, None, True),
        ("inspect --target", ["inspect", PROMPT, "--target", " Paris", "--json", "--model", s(linked)], 15, 1.5,
         None, True),
        ("patch set 2 rows --apply", ["patch", "set", "-t", "layer3", "-r", "5,9", "--scalar", "0", "--apply",
                                      "--model", s(linked)], 3, 1.0, 1, False),
        ("background TEXT", ["background", s(text), "--model", s(linked)], None, 2.0, None, False),
        ("edit", ["edit", "--prompt", "The capital of {} is", "--subject", "France", "--target-new", " Rome",
                  "--target-true", " Paris", "--force", "--model", s(linked)], 60, 2.0, None, False),
        ("audit 4,000 tokens", ["audit", s(text), "--tokens", "4000", "--out", s(work / "A.h5"), "--model",
                                s(linked)], 30, 2.0, None, True),
        ("verify --random 64", ["verify", "--random", "64", "--json", "--model", s(linked)], 300, 2.0, None, True),
        ("export", ["export", "--out", s(work / "E.h5"), "--stats", s(work / "A.h5"), "--model", s(linked)],
         900, 2.0, None, False),
    ]
    if args.smoke:  # the mechanics in under a minute: link, read, write, audit, stream, revert, shards untouched
        rows = [r for r in rows if r[0] in ("convert --link", "patch set 2 rows --apply", "audit 4,000 tokens",
                                            "export")]
        args.no_cold = True
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    results = []
    fp_after_convert = None

    def report(name: str, kind: str, r: dict, wall_f, priv_f, written_f, la0: str) -> None:
        ok_w = wall_f is None or r["wall"] <= wall_f
        ok_p = r["private"] / GB <= priv_f
        ok_b = written_f is None or r["written"] / 1e6 <= written_f
        cap = "" if written_f is None else f" (≤ {written_f:g} MB: {'ok' if ok_b else 'MISSED'})"
        print(f"| `{name}` ({kind}) | {r['wall']:.1f} s | {f'≤ {wall_f:g} s' if wall_f else '—'} "
              f"({'ok' if ok_w else 'MISSED'}) | {r['private'] / GB:.2f} GB | ≤ {priv_f:g} GB "
              f"({'ok' if ok_p else 'MISSED'}) | {r['rss'] / GB:.2f} GB | {r['written'] / 1e6:,.1f} MB"
              f"{cap} | "
              f"{r['rc']} | {la0} → {load()} |{(' ' + r['error']) if r['error'] else ''}", flush=True)
        results.append(dict(r, name=name, kind=kind, load_before=la0, load_after=load(),
                            ok=bool(ok_w and ok_p and ok_b and r["rc"] == 0)))

    print("| command | wall | floor | peak private | floor | peak total RSS | written | exit | load avg |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, cmd, wall_f, priv_f, written_f, read_only in rows:
        if only and not any(name.startswith(o) for o in only) and name != "convert --link":
            continue
        kinds = ["cold", "warm"] if read_only and not args.no_cold else ["cold" if not args.no_cold else "warm"]
        if name in ("export", "verify --random 64"):  # export reads the whole table; verify is compute-bound
            kinds = ["cold"] if not args.no_cold else ["warm"]
        for kind in kinds:
            if kind == "cold":
                evict(files)
            la0 = load()
            r = run(cmd, work, args.timeout)
            report(name, kind, r, wall_f, priv_f, written_f, la0)
        if name == "convert --link":
            fp_after_convert = fingerprint(linked)
    # every change reverted gives back the weights exactly; the shards never changed
    log = json.loads(cli_out(["patch", "log", "--json", "--model", s(linked)]))
    ids = [e["id"] for e in (log if isinstance(log, list) else log.get("entries", log.get("log", [])))
           if e.get("op") == "apply"]
    for pid in reversed(ids):
        cli_out(["patch", "revert", pid, "--model", s(linked)])
    fp_end = fingerprint(linked)
    exact = fp_end == fp_after_convert
    print(f"reverted {len(ids)} changes: fingerprint {fp_end} vs {fp_after_convert} after convert: "
          f"{'identical' if exact else 'DIFFERENT'}")
    after = sha256s(files) if not args.no_sha else {}
    same = before == after
    if not args.no_sha:
        print(f"shards sha256 before/after: {'byte-identical' if same else 'CHANGED'} "
              f"({', '.join(f'{k} {v[:12]}' for k, v in after.items())})")
    print(f"load average after: {load()}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "revert_exact": exact, "shards_identical": same},
                                        indent=1))
    failed = [r["name"] for r in results if r["rc"] != 0]
    if args.smoke and (failed or not exact or not same):
        sys.exit(f"smoke run failed: {', '.join(failed) or 'revert/sha'}")


def cli_out(cmd: list[str]) -> str:
    import subprocess

    r = subprocess.run([sys.executable, "-m", "memedit_cli", *cmd], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"memedit {' '.join(cmd)} failed: {r.stderr.strip()[-300:]}")
    return r.stdout


def fingerprint(folder: Path) -> str:
    """The folder's fingerprint (a hash of every block of every tensor, kept per block: nothing is re-read)."""
    import subprocess

    code = "import sys, memedit; from memedit.storage.checkpoint import fingerprint; " \
           "print(fingerprint(memedit.load(sys.argv[1])))"
    return subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True,
                          check=True).stdout.strip()


if __name__ == "__main__":
    main()
