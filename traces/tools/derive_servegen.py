"""Derive moesim's shipped ServeGen files from ../shared/data/arrival_traces/servegen_alibaba (Apache-2.0).

    python traces/tools/derive_servegen.py ../shared/data/arrival_traces/servegen_alibaba traces/

Writes
  servegen_deepseek_r1_clients.csv.gz   the DeepSeek-R1 client traces, byte for byte (73 clients x 144 windows)
  servegen_deepseek_r1_lengths.csv      per client: input and output token quantiles of the day, from the
                                        6-hour-window PDFs weighted by the client's requests in each window

Only these small statistics are shipped; the per-window length PDFs (1.7 MB) stay in ../shared."""

from __future__ import annotations

import ast
import gzip
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

LEVELS = [0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0]


def quantiles(pdfs: list[tuple[float, dict]]) -> list[float]:
    """Token counts at LEVELS of the weighted mixture of the windows' PDFs."""
    mass: dict[int, float] = {}
    for weight, pdf in pdfs:
        for tokens, p in pdf.items():
            mass[int(tokens)] = mass.get(int(tokens), 0.0) + weight * p
    tokens = np.array(sorted(mass))
    cdf = np.cumsum([mass[t] for t in tokens])
    cdf /= cdf[-1]
    return [int(tokens[min(np.searchsorted(cdf, q), len(tokens) - 1)]) if q > 0 else int(tokens[0]) for q in LEVELS]


def main(src: Path, out: Path) -> None:
    clients_csv = src / "reason_deepseek-r1_client_traces.csv.gz"
    shutil.copyfile(clients_csv, out / "servegen_deepseek_r1_clients.csv.gz")
    trace = pd.read_csv(clients_csv, keep_default_na=False)
    rows = []
    for path in sorted((src / "reason_deepseek-r1_datasets").glob("chunk-*-dataset.json.gz"), key=lambda p: int(p.name.split("-")[1])):
        client = int(path.name.split("-")[1])
        data = json.loads(gzip.decompress(path.read_bytes()))
        mine = trace[trace.client_id == client]
        per_field: dict[str, list] = {"input_tokens": [], "output_tokens": []}
        for start, fields in data.items():
            s = int(start)
            weight = float(mine[(mine.window_start_s >= s) & (mine.window_start_s < s + 21600)].rate_rps.sum())
            for name in per_field:
                text = fields.get(name)
                pdf = ast.literal_eval(text) if text else {}
                if pdf and weight > 0:
                    per_field[name].append((weight, pdf))
        if not per_field["input_tokens"] or not per_field["output_tokens"]:
            continue
        for name, pdfs in per_field.items():
            rows.append([client, name] + quantiles(pdfs))
    table = pd.DataFrame(rows, columns=["client_id", "field"] + [f"q{q:g}" for q in LEVELS])
    table.to_csv(out / "servegen_deepseek_r1_lengths.csv", index=False)
    print(f"wrote {len(table)} rows for {table.client_id.nunique()} clients")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
