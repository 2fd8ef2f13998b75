"""Plots of sweep results (matplotlib, PNG): latency CDFs, goodput against rate, the
throughput-per-device / tokens-per-user Pareto frontier, and per-phase time bars.

Every function takes the sweep's rows (dicts as written to results.jsonl, each with its config
label, workload, rate, metrics and per-request `ttft_s` / `itl_s` lists) and writes one PNG.
"""

from __future__ import annotations

import collections

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

PHASE_COLORS = {"queue": "#bbbbbb", "prefill": "#4477aa", "transfer": "#ee6677",
                "decode": "#228833"}


def _by_workload(rows):
  groups = collections.defaultdict(list)
  for row in rows:
    groups[row["workload"]].append(row)
  return dict(sorted(groups.items()))


def _subplots(n, title):
  fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.2), squeeze=False)
  fig.suptitle(title)
  return fig, axes[0]


def _at_highest_rate(rows):
  top = max(r["request_rate"] for r in rows)
  return [r for r in rows if r["request_rate"] == top], top


def latency_cdfs(rows, key: str, path: str) -> None:
  """CDF of per-request `key` ("ttft_s" or "itl_s") for each config at the highest rate."""
  groups = _by_workload(rows)
  label = {"ttft_s": "TTFT", "itl_s": "ITL"}[key]
  fig, axes = _subplots(len(groups), f"{label} CDF (highest request rate of each workload)")
  for ax, (workload, group) in zip(axes, groups.items()):
    chosen, rate = _at_highest_rate(group)
    for row in chosen:
      values = np.sort(np.asarray(row[key]) * 1e3)
      if len(values):
        ax.plot(values, np.arange(1, len(values) + 1) / len(values), label=row["label"])
    ax.set(xlabel=f"{label} (ms)", ylabel="fraction of " + ("requests" if key == "ttft_s"
                                                            else "token gaps"),
           title=f"{workload} @ {rate:g} req/s", xscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def goodput_vs_rate(rows, path: str) -> None:
  groups = _by_workload(rows)
  fig, axes = _subplots(len(groups), "Goodput against request rate")
  for ax, (workload, group) in zip(axes, groups.items()):
    by_label = collections.defaultdict(list)
    for row in group:
      by_label[row["label"]].append(row)
    for label, runs in sorted(by_label.items()):
      runs.sort(key=lambda r: r["request_rate"])
      ax.plot([r["request_rate"] for r in runs], [r["request_goodput"] or 0 for r in runs],
              marker="o", label=label)
    rates = sorted({r["request_rate"] for r in group})
    ax.plot(rates, rates, ls=":", color="gray", label="offered rate")
    ax.set(xlabel="request rate (req/s)", ylabel="goodput (req/s meeting the SLOs)",
           title=workload)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def pareto_frontier(points):
  """Indices of the points no other point beats on both coordinates (higher is better)."""
  order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
  frontier, best_y = [], -np.inf
  for i in order:
    if points[i][1] > best_y:
      frontier.append(i)
      best_y = points[i][1]
  return sorted(frontier, key=lambda i: points[i][0])


def throughput_pareto(rows, path: str) -> None:
  """Output tokens/s per device against tokens/s per user (1 / TPOT), as "Beyond the Buzz"
  plots disaggregation, with each mode's frontier."""
  groups = _by_workload(rows)
  fig, axes = _subplots(len(groups), "Throughput per device vs. interactivity")
  for ax, (workload, group) in zip(axes, groups.items()):
    for mode, marker in (("colocated", "s"), ("disagg", "o")):
      runs = [r for r in group if r["mode"] == mode and r["mean_tpot_ms"] > 0]
      if not runs:
        continue
      points = [(1e3 / r["mean_tpot_ms"], r["output_throughput"] / r["num_devices"])
                for r in runs]
      xs, ys = zip(*points)
      scatter = ax.scatter(xs, ys, marker=marker, label=f"{mode} runs", alpha=0.6)
      frontier = pareto_frontier(points)
      ax.plot([points[i][0] for i in frontier], [points[i][1] for i in frontier],
              color=scatter.get_facecolor()[0], label=f"{mode} frontier")
    ax.set(xlabel="tokens/s per user (1 / mean TPOT)",
           ylabel="output tokens/s per device", title=workload)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def phase_bars(rows, path: str) -> None:
  """Mean time per request in each phase, per config, at the highest rate."""
  groups = _by_workload(rows)
  fig, axes = _subplots(len(groups), "Where a request's time goes (highest rate)")
  for ax, (workload, group) in zip(axes, groups.items()):
    chosen, rate = _at_highest_rate(group)
    labels = [r["label"] for r in chosen]
    bottom = np.zeros(len(chosen))
    for phase, color in PHASE_COLORS.items():
      values = np.array([r[f"mean_{phase}_ms"] for r in chosen])
      ax.bar(labels, values, bottom=bottom, color=color, label=phase)
      bottom += values
    ax.set(ylabel="mean ms per request", title=f"{workload} @ {rate:g} req/s")
    ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def all_plots(rows, out_dir: str) -> list[str]:
  import os  # pylint: disable=g-import-not-at-top
  paths = {name: os.path.join(out_dir, f"{name}.png")
           for name in ("ttft_cdf", "itl_cdf", "goodput_vs_rate", "pareto", "phases")}
  latency_cdfs(rows, "ttft_s", paths["ttft_cdf"])
  latency_cdfs(rows, "itl_s", paths["itl_cdf"])
  goodput_vs_rate(rows, paths["goodput_vs_rate"])
  throughput_pareto(rows, paths["pareto"])
  phase_bars(rows, paths["phases"])
  return list(paths.values())
