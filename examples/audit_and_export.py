"""Audit how the memory is used, export everything to HDF5, open it with xarray, plot it.

    python examples/audit_and_export.py                       # the bundled demo model and its world's corpus
    python examples/audit_and_export.py --model ./my-model --corpus corpus.jsonl --tokens 200000 --out results/

The same from the command line:
    memedit audit --tokens 50000 --out results/audit.h5 --plot results/usage.png
    memedit export --out results/memory.h5 --stats results/audit.h5
"""

from __future__ import annotations

import argparse
from pathlib import Path

import xarray as xr

import memedit
from memedit.auditing.audit import audit, open_corpus
from memedit.auditing.hdf5 import export
from memedit.auditing.plots import plot_usage
from memedit.auditing.stats import report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the bundled demo model)")
    ap.add_argument("--corpus", default=None, help="text or JSONL corpus (default: the demo world's sentences)")
    ap.add_argument("--tokens", type=int, default=50_000)
    ap.add_argument("--out", type=Path, default=Path("audit-results"))
    args = ap.parse_args()

    # 1. audit: count every lookup over the corpus
    model = memedit.load(args.model)
    stats = audit(model, open_corpus(args.corpus, model), max_tokens=args.tokens)
    rows = report(stats)
    for r in rows:
        if r["scope"] in ("table", "layer") and r["basis"] == "count":
            where = f"table {r['table']}" if r["scope"] == "table" else f"layer {r['layer']}"
            print(f"{where:14s} used {r['used']:5.1f}%  Gini {r['gini']:.3f}  dead {r['dead']:,}  "
                  f"top 1% of slots take {100 * r['top1pct_share']:.1f}% of accesses")

    # 2. export: statistics + value-row norms, sub-key norms, top promoted tokens, frozen rows, edit log
    path = export(args.out / "memory.h5", model, stats, rows, top_k=5)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")

    # 3. open it without memedit: one xarray Dataset with named dimensions
    ds = xr.open_dataset(path, engine="h5netcdf")
    table = str(ds.table.values[0])
    use = ds.table_counts.sel(table=table).sum("head")  # accesses of each value row, all heads and layers
    layer = int(ds.layer.values[0])
    print(f"hub slots of table {table!r} (layer {layer}'s top promoted tokens):")
    for slot in use.argsort().values[::-1][:5]:
        tokens = [str(ds.vocab.values[t]) for t in ds.top_tokens.sel(layer=layer, slot=slot).values]
        print(f"  slot {int(slot):6d}  {int(use[slot]):6d} accesses  |value| "
              f"{float(ds.value_norms.sel(table=table, slot=slot)):.2f}"
              f"  promotes {' '.join(tokens)}")
    ds.close()

    # 4. plot: sorted usage per layer and the N x N slot grid
    print(f"wrote {plot_usage(stats, args.out / 'usage.png')}")


if __name__ == "__main__":
    main()
