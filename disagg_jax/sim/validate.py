"""Simulated against measured: the keys compared and how errors are reported."""

from __future__ import annotations

# (key, how the error is expressed): relative for latencies and throughput, absolute percentage
# points for SLO attainment.
COMPARED = (("median_ttft_ms", "rel"), ("p90_ttft_ms", "rel"), ("median_tpot_ms", "rel"),
            ("p90_tpot_ms", "rel"), ("output_throughput", "rel"), ("slo_attainment", "pp"))


def compare(measured: dict, simulated: dict) -> dict[str, float]:
  """{key: error}: (simulated - measured) / measured, or percentage points for attainment."""
  out = {}
  for key, kind in COMPARED:
    m, s = measured.get(key), simulated.get(key)
    if m is None or s is None:
      continue
    out[key] = (s - m) * 100.0 if kind == "pp" else (s - m) / m if m else float("nan")
  return out


def _cells(first: dict, second: dict, errors: dict) -> list[str]:
  cells = []
  for key, kind in COMPARED:
    m, s, e = first.get(key), second.get(key), errors.get(key)
    if m is None or s is None:
      cells.append("–")
    elif kind == "pp":
      cells.append(f"{m * 100:.0f}% / {s * 100:.0f}% ({e:+.1f} pp)")
    else:
      cells.append(f"{m:.4g} / {s:.4g} ({e * 100:+.1f}%)")
  return cells


def _label(row) -> str:
  run = f" (run {row['repeat'] + 1})" if row.get("repeat") else ""
  return f"| {row['mode']} | {row['request_rate']:g}{run} | "


def markdown_table(rows) -> str:
  """rows: dicts with mode, request_rate, measured, simulated, errors (and repeat, when a rate
  was measured more than once)."""
  head = "| mode | rate | " + " | ".join(k for k, _ in COMPARED) + " |"
  lines = [head, "| " + " | ".join(["---"] * (len(COMPARED) + 2)) + " |"]
  for row in rows:
    lines.append(_label(row) + " | ".join(_cells(row["measured"], row["simulated"],
                                                 row["errors"])) + " |")
  return "\n".join(lines)


def repeatability_table(rows) -> str:
  """Each repeated measurement against the first run of its mode and rate, as the simulator's
  errors are expressed (empty when nothing was repeated)."""
  first = {(r["mode"], r["request_rate"]): r for r in rows if not r.get("repeat")}
  lines = []
  for row in rows:
    base = first.get((row["mode"], row["request_rate"]))
    if row.get("repeat") and base is not None:
      lines.append(_label(row) + " | ".join(_cells(base["measured"], row["measured"], compare(
          base["measured"], row["measured"]))) + " |")
  if not lines:
    return ""
  head = "| mode | rate | " + " | ".join(k for k, _ in COMPARED) + " |"
  return "\n".join([head, "| " + " | ".join(["---"] * (len(COMPARED) + 2)) + " |"] + lines)


def attainment_table(rows) -> str:
  """SLO attainment under the extra SLO sets of each row (row["attainment"]: {SLOs: [measured,
  simulated]})."""
  specs = sorted({spec for row in rows for spec in row.get("attainment", {})})
  lines = ["| mode | rate | " + " | ".join(specs) + " |",
           "| " + " | ".join(["---"] * (len(specs) + 2)) + " |"]
  for row in rows:
    cells = []
    for spec in specs:
      pair = row.get("attainment", {}).get(spec)
      cells.append("–" if pair is None else
                   f"{pair[0] * 100:.0f}% / {pair[1] * 100:.0f}% ({(pair[1] - pair[0]) * 100:+.1f} pp)")
    lines.append(_label(row) + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(rows, path: str) -> None:
  """Measured (solid) and simulated (dashed) TTFT and TPOT medians / p90s and throughput by rate."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  keys = ("median_ttft_ms", "p90_ttft_ms", "median_tpot_ms", "output_throughput")
  fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4))
  for ax, key in zip(axes, keys):
    for mode, color in (("colocated", "tab:blue"), ("disagg", "tab:orange")):
      mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["request_rate"])
      if not mine:
        continue
      ax.plot([r["request_rate"] for r in mine], [r["measured"][key] for r in mine], "o",
              color=color, alpha=0.7, label=f"{mode} measured")
      once = [r for r in mine if not r.get("repeat")]
      ax.plot([r["request_rate"] for r in once], [r["simulated"][key] for r in once], "x--",
              color=color, label=f"{mode} simulated")
    ax.set_xlabel("request rate (req/s)")
    ax.set_title(key)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# Fidelity against the noise. For one mode and rate the same requests and arrivals are
# served for real n >= 2 times and simulated once. Per metric:
#   error:      the simulated value against the mean of the real runs, (sim - mean) / mean, or
#               sim - mean in percentage points for SLO attainment;
#   run_errors: the same against each real run separately;
#   spread:     the real runs' own difference, (max - min) / mean, or max - min in percentage
#               points (for two runs, |run 2 - run 1| / mean);
#   within_noise: |error| <= spread (None with a single real run: no noise measured);
#   within_5pct:  |error| <= 5%, judged for the medians and the throughput only (None otherwise);
#   real_within_5pct: the same 5% judgement with each real run in the simulator's place, against
#                 the mean of the other runs: the fraction of runs within (None with a single
#                 run, or for the other metrics). What an exact simulator could score: the 5%
#                 bound means little where the real runs themselves miss it;
#   sim_difference:  the simulated value's mean distance from each real run, mean_k |sim - r_k|;
#   real_difference: the real runs' mean distance from each other, mean_{i<j} |r_i - r_j| (None
#                    with a single run); both / mean, or in percentage points for attainment.
# The goal is judged per metric (`fidelity_summary`): over all rates of a mode, the simulator's
# mean distance from a real run no larger than a real run's mean distance from an identical one,
# and every median and throughput within 5% of the real mean. (Per cell, "within the range of
# the runs" is reported too, but it is a draw: an exact simulator fails it in ~8% of cells.)
FIVE_PCT_KEYS = ("median_ttft_ms", "median_tpot_ms", "output_throughput")
FIVE_PCT = 0.05


def _group_key(row) -> tuple:
  """Rows of one invocation at one rate share a simulation; rows without a session (written
  before it was recorded) are told apart by their simulated values."""
  session = row.get("session")
  if session is None:
    session = tuple(row["simulated"].get(k) for k, _ in COMPARED)
  return (row["mode"], row["request_rate"], session)


def _judge(kind: str, key: str, real: list[float], sim: float) -> dict:
  mean = sum(real) / len(real)
  if kind == "pp":
    error, run_errors = (sim - mean) * 100.0, [(sim - r) * 100.0 for r in real]
    spread = (max(real) - min(real)) * 100.0
  else:
    nan = float("nan")
    error = (sim - mean) / mean if mean else nan
    run_errors = [(sim - r) / r if r else nan for r in real]
    spread = (max(real) - min(real)) / mean if mean else nan
  # A NaN (a zero mean) compares False: judged not within.
  within_noise = abs(error) <= spread if len(real) > 1 else None
  within_5pct = abs(error) <= FIVE_PCT if key in FIVE_PCT_KEYS else None
  real_within_5pct = None
  if key in FIVE_PCT_KEYS and len(real) > 1:
    others = [(sum(real) - r) / (len(real) - 1) for r in real]
    real_within_5pct = sum(abs(r - o) <= FIVE_PCT * o for r, o in zip(real, others)) / len(real)
  scale = 100.0 if kind == "pp" else (1.0 / mean if mean else float("nan"))
  sim_difference = sum(abs(sim - r) for r in real) / len(real) * scale
  pairs = [abs(a - b) for i, a in enumerate(real) for b in real[i + 1:]]
  real_difference = sum(pairs) / len(pairs) * scale if pairs else None
  return {"kind": kind, "real": real, "real_mean": mean, "simulated": sim, "error": error,
          "run_errors": run_errors, "spread": spread, "within_noise": within_noise,
          "within_5pct": within_5pct, "real_within_5pct": real_within_5pct,
          "sim_difference": sim_difference,
          "real_difference": real_difference}


def fidelity(rows) -> list[dict]:
  """Rows (as validate_sim.py writes them) grouped by mode, rate and invocation, each judged per
  metric: [{"mode", "request_rate", "session", "goodput", "runs", "metrics": {key: {"kind",
  "real", "real_mean", "simulated", "error", "run_errors", "spread", "within_noise",
  "within_5pct", "real_within_5pct", ...}}}], in the order the groups first appear."""
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    groups.setdefault(_group_key(row), []).append(row)
  out = []
  for (mode, rate, _), mine in groups.items():
    simulated = mine[0]["simulated"]
    judged = {}
    for key, kind in COMPARED:
      real = [r["measured"].get(key) for r in mine]
      sim = simulated.get(key)
      if sim is None or any(v is None for v in real):
        continue
      judged[key] = _judge(kind, key, [float(v) for v in real], float(sim))
    out.append({"mode": mode, "request_rate": rate, "session": mine[0].get("session"),
                "goodput": mine[0].get("goodput"), "runs": len(mine), "metrics": judged})
  return out


def fidelity_summary(groups) -> dict[str, dict]:
  """Per mode: {"cells", "judged" (cells with >= 2 real runs), "within_noise" (cells within
  the runs' range), "five_pct" (median/throughput cells), "within_5pct", "real_within_5pct"
  (the cells a real run in the simulator's place is within 5% of, on average; None without
  repeats), "by_metric" ({key:
  [cells within the range, judged]}), "metrics" ({key: {"sim_difference", "real_difference"
  (their means over the judged rates), "within"}}), "metrics_within", "goal_met"}. The goal:
  on every metric the simulator no farther from a real run than the real runs from each other
  (sim_difference <= real_difference, over the mode's rates), and every median and throughput
  within 5%."""
  out: dict[str, dict] = {}
  for group in groups:
    s = out.setdefault(group["mode"], {"cells": 0, "judged": 0, "within_noise": 0,
                                       "five_pct": 0, "within_5pct": 0,
                                       "real_within_5pct": None, "by_metric": {},
                                       "metrics": {}})
    for key, cell in group["metrics"].items():
      s["cells"] += 1
      if cell["within_noise"] is not None:
        s["judged"] += 1
        s["within_noise"] += bool(cell["within_noise"])
        count = s["by_metric"].setdefault(key, [0, 0])
        count[0] += bool(cell["within_noise"])
        count[1] += 1
        m = s["metrics"].setdefault(key, {"sim": [], "real": []})
        m["sim"].append(cell["sim_difference"])
        m["real"].append(cell["real_difference"])
      if cell["within_5pct"] is not None:
        s["five_pct"] += 1
        s["within_5pct"] += bool(cell["within_5pct"])
      if cell["real_within_5pct"] is not None:
        s["real_within_5pct"] = (s["real_within_5pct"] or 0.0) + cell["real_within_5pct"]
  for s in out.values():
    for key, m in s["metrics"].items():
      sim, real = sum(m["sim"]) / len(m["sim"]), sum(m["real"]) / len(m["real"])
      # A NaN (a zero mean) compares False: judged not within.
      s["metrics"][key] = {"sim_difference": sim, "real_difference": real,
                           "within": bool(sim <= real)}
    s["metrics_within"] = sum(m["within"] for m in s["metrics"].values())
    s["goal_met"] = (s["judged"] == s["cells"] > 0
                     and s["metrics_within"] == len(s["metrics"])
                     and s["within_5pct"] == s["five_pct"])
  return out


def _amount(kind: str, value: float, signed: bool = True) -> str:
  if kind == "pp":
    return f"{value:+.1f} pp" if signed else f"{value:.1f} pp"
  return f"{value * 100:+.1f}%" if signed else f"{value * 100:.1f}%"


def _mark(flag) -> str:
  return "–" if flag is None else "✓" if flag else "✗"


def _sessions_differ(groups) -> bool:
  """The same mode and rate from more than one invocation: tell them apart by their session."""
  return len({(g["mode"], g["request_rate"]) for g in groups}) < len(groups)


def _group_label(group, with_session: bool) -> str:
  label = f"| {group['mode']} | {group['request_rate']:g} | {group['runs']} |"
  if with_session:
    label += f" {group.get('session') or '–'} |"
  return label


def fidelity_table(groups) -> str:
  """One line per mode and rate; each cell is `simulator error / real spread`, then ✓ or ✗ for
  within the noise and, on medians and throughput, `(5% ✓)` or `(5% ✗)`."""
  if not groups:
    return ""
  repeated = _sessions_differ(groups)
  head = "| mode | rate | runs |" + (" session |" if repeated else "")
  head += " " + " | ".join(k for k, _ in COMPARED) + " |"
  lines = [head, "| " + " | ".join(["---"] * (len(COMPARED) + 3 + repeated)) + " |"]
  for group in groups:
    cells = []
    for key, kind in COMPARED:
      cell = group["metrics"].get(key)
      if cell is None:
        cells.append("–")
        continue
      text = (f"{_amount(kind, cell['error'])} / {_amount(kind, cell['spread'], False)} "
              f"{_mark(cell['within_noise'])}")
      if cell["within_5pct"] is not None:
        text += f" (5% {_mark(cell['within_5pct'])})"
      cells.append(text)
    lines.append(_group_label(group, repeated) + " " + " | ".join(cells) + " |")
  return "\n".join(lines)


def fidelity_summary_lines(groups) -> list[str]:
  lines = []
  for mode, s in fidelity_summary(groups).items():
    lines.append(f"- **{mode}**: on {s['metrics_within']} of {len(s['metrics'])} metrics the "
                 f"simulator is no farther from a real run than the real runs from each other"
                 + (f" ({s['cells'] - s['judged']} cells not judged: one real run)"
                    if s["judged"] < s["cells"] else "")
                 + f"; {s['within_5pct']} of {s['five_pct']} medians and throughputs within 5%"
                 + (f" (a real run in the simulator's place, against the mean of the others: "
                    f"{s['real_within_5pct']:.1f} of {s['five_pct']})"
                    if s["real_within_5pct"] is not None else "") + "; "
                 f"goal {'met' if s['goal_met'] else 'not met'}. Per cell, within the range of "
                 f"the real runs: {s['within_noise']} of {s['judged']} ("
                 + ", ".join(f"{key} {n}/{of}" for key, (n, of) in s["by_metric"].items())
                 + ").")
  return lines


def fidelity_metric_table(groups) -> str:
  """One line per mode and metric: the simulator's mean distance from a real run against the
  real runs' mean distance from each other (means over the rates), and whether it is within."""
  lines = ["| mode | metric | simulated vs real: mean over rates of mean_k |sim − run k| | "
           "real vs real: mean over rates of mean |run i − run j| | within |",
           "| --- | --- | --- | --- | --- |"]
  for mode, s in fidelity_summary(groups).items():
    for key, kind in COMPARED:
      m = s["metrics"].get(key)
      if m is not None:
        lines.append(f"| {mode} | {key} | {_amount(kind, m['sim_difference'], False)} | "
                     f"{_amount(kind, m['real_difference'], False)} | {_mark(m['within'])} |")
  return "\n".join(lines) if len(lines) > 2 else ""


def fidelity_detail_table(groups) -> str:
  """One line per mode, rate and metric: the real runs, their mean, the simulated value, the
  error against the mean and against each run, the real spread and the verdicts."""
  repeated = _sessions_differ(groups)
  head = ("| mode | rate | runs |" + (" session |" if repeated else "") + " metric | real runs | "
          "real mean | simulated | sim − mean | sim − each run | real spread | within noise | "
          "within 5% |")
  lines = [head, "| " + " | ".join(["---"] * (12 + repeated)) + " |"]
  for group in groups:
    for key, _ in COMPARED:
      cell = group["metrics"].get(key)
      if cell is None:
        continue
      kind = cell["kind"]
      fmt = (lambda v: f"{v * 100:.1f}%") if kind == "pp" else (lambda v: f"{v:.4g}")
      runs = ", ".join(fmt(v) for v in cell["real"])
      each = ", ".join(_amount(kind, e) for e in cell["run_errors"])
      lines.append(_group_label(group, repeated) + f" {key} | {runs} | "
                   f"{fmt(cell['real_mean'])} | {fmt(cell['simulated'])} | "
                   f"{_amount(kind, cell['error'])} | {each} | "
                   f"{_amount(kind, cell['spread'], False)} | {_mark(cell['within_noise'])} | "
                   f"{_mark(cell['within_5pct'])} |")
  return "\n".join(lines)


FIDELITY_LEGEND = (
    "Each cell: the simulator's error against the mean of the real runs / the real runs' own "
    "spread, (max − min) / mean (for two runs |run 2 − run 1| / mean); SLO attainment in "
    "percentage points (sim − mean, max − min). ✓: |error| ≤ spread, within the range of the "
    "real runs; ✗: outside it; –: one real run, no noise measured. On medians and throughput "
    "also (5% ✓) when |error| ≤ 5%, (5% ✗) when not, judged apart from the noise.")

METRIC_LEGEND = (
    "Per metric, over the mode's rates (the goal): the simulated value's mean distance from "
    "each real run against the real runs' mean distance from each other, relative to the real "
    "mean (attainment in percentage points). ✓: the simulator is no farther from a real run "
    "than a second identical real run is.")


def fidelity_markdown(rows) -> str:
  """The whole report: the table, its legend, the summary per mode, the per-metric judgement
  and the per-metric detail."""
  groups = fidelity(rows)
  if not groups:
    return ""
  parts = [FIDELITY_LEGEND, fidelity_table(groups), "\n".join(fidelity_summary_lines(groups))]
  metric_table = fidelity_metric_table(groups)
  if metric_table:
    parts += [METRIC_LEGEND, metric_table]
  return "\n\n".join(parts + ["Per metric (the real runs, the simulated value, the error "
                               "against each run):", fidelity_detail_table(groups)]) + "\n"
