"""Plots of sweep results (matplotlib, PNG): latency CDFs, goodput against rate, the
throughput-per-device / tokens-per-user Pareto frontier, and per-phase time bars; and an elastic
run's split, arrival rate and attainment over time (`elastic_timeline`).

The sweep functions take the sweep's rows (dicts as written to results.jsonl, each with its
config label, workload, rate, metrics and per-request `ttft_s` / `itl_s` lists) and write one PNG.
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


def elastic_timeline(path: str, *, timeline, arrivals, runs: dict, best_split, phases,
                     title: str, unit: str = "devices", window: float = 10.0) -> None:
  """Three panels over time: the elastic run's split (`timeline`: [[t, prefill, decode], ...])
  beside the best static split (`best_split`: prefill, decode), the arrival rate of `arrivals`
  (seconds), and the SLO attainment per `window` of each run in `runs` ({label: [(arrival,
  met), ...]}); `phases`: [[name, start, end], ...] of a shifting workload, marked."""
  arrivals = np.asarray(arrivals, np.float64)
  end = max(float(arrivals.max()), timeline[-1][0])
  edges = np.arange(0.0, end + window, window)
  fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
  steps = list(timeline) + [[end, *timeline[-1][1:]]]
  for side, column in (("prefill", 1), ("decode", 2)):
    axes[0].step([t[0] for t in steps], [t[column] for t in steps], where="post",
                 c=f"C{column - 1}", label=f"elastic {side} {unit}")
    axes[0].axhline(best_split[column - 1], ls=":", c=f"C{column - 1}",
                    label=f"best static {side}")
  axes[0].set_ylabel(unit)
  axes[0].legend(fontsize=7, loc="upper right")
  counts, _ = np.histogram(arrivals, edges)
  axes[1].plot(edges[:-1], counts / window)
  axes[1].set_ylabel("arrivals / s")
  for i, (label, met) in enumerate(runs.items()):
    which = np.digitize([a for a, _ in met], edges) - 1
    share = [np.mean([ok for (_, ok), w in zip(met, which) if w == k]) if (which == k).any()
             else np.nan for k in range(len(edges) - 1)]
    axes[2].plot(edges[:-1], share, ls="-" if i == 0 else ":", label=label)
  axes[2].set_ylabel("SLO attainment")
  axes[2].set_xlabel("seconds (by arrival)")
  axes[2].legend(fontsize=7)
  for name, start, _ in phases or []:
    for ax in axes:
      ax.axvline(start, c="grey", lw=0.5)
    axes[1].text(start, axes[1].get_ylim()[1] * 0.9, name, fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
