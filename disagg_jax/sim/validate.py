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
