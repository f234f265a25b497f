#!/usr/bin/env python3
"""Plots a soak's samples (bench/soak.sh) to a PNG: each node's RSS and
open files, and Redis' memory, over time.

    python3 bench/plot_soak.py bench/results/soak-1h.csv docs/soak-1h.png

Needs matplotlib (pip install matplotlib).
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src, out = sys.argv[1], sys.argv[2]
rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(open(src))]
t = [r["t_s"] / 60 for r in rows]
fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
axes[0].plot(t, [r["node1_rss_kib"] / 1024 for r in rows], label="node 1")
axes[0].plot(t, [r["node2_rss_kib"] / 1024 for r in rows], label="node 2")
axes[0].set_ylabel("RSS (MiB)")
axes[1].plot(t, [r["node1_fds"] for r in rows], label="node 1")
axes[1].plot(t, [r["node2_fds"] for r in rows], label="node 2")
axes[1].set_ylabel("open files")
axes[2].plot(t, [r["redis_used_memory_b"] / 2**20 for r in rows], label="used_memory")
axes[2].plot(t, [r["redis_rss_b"] / 2**20 for r in rows], label="used_memory_rss")
axes[2].set_ylabel("Redis (MiB)")
axes[2].set_xlabel("minutes")
for ax in axes:
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
fig.suptitle("Soak: 400 clients, 4 channels, 200 msg/s, 5 drops/s, two nodes on one Redis")
fig.tight_layout()
fig.savefig(out, dpi=90)
