"""Tables and plots of a study (`tf_mtssl.study_grid` records): results.md, results.csv, results.json
and PNG plots, each headed by the command and the git commit(s) that made it.

Statistics (one protocol for every configuration):
  - per run: top-1 on the probe set's test split and its standard error `se` (clustered by source
    photo, `tf_mtssl.evaluation.probes.accuracy_and_se`);
  - per configuration and pretraining step: mean and standard deviation over seeds, and the standard
    error of that mean, sqrt(s^2 / n + mean(se)^2): s^2 / n for the seeds' spread, mean(se)^2 for the
    test sample, which is the same images for every seed and so is not divided by n (conservative);
  - a comparison A - B: the difference of means with sqrt(SE_A^2 + SE_B^2), and z = difference / SE.
"""

import csv
import io
import json
import math
import os
import textwrap
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

METRICS = (("linear_top1", "linear_se", "linear top-1"), ("knn_top1", "knn_se", "kNN top-1"),
           ("depth_delta1", None, "depth δ<1.25"))
CSV_FIELDS = ("study", "config", "label", "seed", "step", "linear_top1", "linear_se", "linear_val_top1",
              "linear_weight_decay", "linear_train_top1", "knn_top1", "knn_se", "knn_val_top1", "knn_k",
              "depth_delta1", "num_test", "seconds", "commit", "run_key", "eval_key")


def summarize(values: Sequence[float], ses: Optional[Sequence[float]] = None) -> Dict[str, float]:
  """mean, std (ddof 1; 0 for one value), n and the standard error of the mean (module docstring)."""
  v = np.asarray([x for x in values if x is not None and not math.isnan(x)], np.float64)
  if v.size == 0:
    return {"mean": float("nan"), "std": float("nan"), "n": 0, "se": float("nan")}
  std = float(v.std(ddof=1)) if v.size > 1 else 0.0
  test_se = float(np.mean([s for s in ses if s is not None and not math.isnan(s)])) if ses else 0.0
  return {"mean": float(v.mean()), "std": std, "n": int(v.size),
          "se": float(math.sqrt(std ** 2 / v.size + test_se ** 2))}


def aggregate(records: List[Dict]) -> Dict[Tuple[str, int], Dict[str, Dict]]:
  """(config, step) -> metric -> summarize(...) over seeds."""
  groups: Dict[Tuple[str, int], List[Dict]] = {}
  for r in records:
    groups.setdefault((r["config"], r["step"]), []).append(r)
  out = {}
  for key, rows in groups.items():
    out[key] = {m: summarize([r.get(m) for r in rows], [r.get(se) for r in rows] if se else None)
                for m, se, _ in METRICS if any(m in r for r in rows)}
  return out


def final_steps(records: List[Dict]) -> Dict[str, int]:
  """config -> its last evaluated pretraining step."""
  out = {}
  for r in records:
    out[r["config"]] = max(out.get(r["config"], 0), r["step"])
  return out


def compare(a: Dict, b: Dict) -> Dict[str, float]:
  diff = a["mean"] - b["mean"]
  se = math.sqrt(a["se"] ** 2 + b["se"] ** 2)
  return {"diff": diff, "se": se, "z": diff / se if se > 0 else float("nan")}


def _cell(s: Dict, pct: bool = True) -> str:
  if not s or s["n"] == 0:
    return "—"
  f = 100.0 if pct else 1.0
  return f"{f * s['mean']:.1f} ± {f * s['std']:.1f} (SE {f * s['se']:.1f}, n={s['n']})"


def comparisons(records: List[Dict], order: Sequence[str]) -> List[Dict]:
  """Each pretrained configuration against random init, and the best-single-task checks of issue 19."""
  agg, last = aggregate(records), final_steps(records)
  rows = []
  metrics = [m for m, _, _ in METRICS if any(m in r for r in records)]
  singles = [c for c in order if c in ("rp", "col", "ex", "ms") and c in last]

  def add(name, a, b):
    row = {"comparison": name}
    for m in metrics:
      if m in agg.get(a, {}) and m in agg.get(b, {}):
        row[m] = compare(agg[a][m], agg[b][m])
    rows.append(row)

  if "random" in last:
    for c in order:
      if c != "random" and c in last:
        add(f"{c} − random", (c, last[c]), ("random", 0))
  for combo, parts in (("rp_ex", ("rp", "ex")), ("rp_col", ("rp", "col")), ("all", tuple(singles))):
    present = [p for p in parts if p in singles]
    if combo in last and present:
      row = {"comparison": f"{combo} − best of {'/'.join(present)}"}
      for m in metrics:
        if m in agg[(combo, last[combo])]:
          best = max(present, key=lambda p: agg[(p, last[p])].get(m, {"mean": -1})["mean"])
          row[m] = {**compare(agg[(combo, last[combo])][m], agg[(best, last[best])][m]), "versus": best}
      rows.append(row)
  return rows


def _z_cell(c: Optional[Dict]) -> str:
  if not c:
    return "—"
  versus = f", vs {c['versus']}" if "versus" in c else ""
  if not c["se"] > 0:  # one run of a metric without a standard error of its own (depth)
    return f"{100 * c['diff']:+.1f} (no standard error{versus})"
  return f"{100 * c['diff']:+.1f} ± {100 * c['se']:.1f} (z = {c['z']:+.1f}{versus})"


def markdown(records: List[Dict], order: Sequence[str], labels: Dict[str, str], header: str,
             setup: str, weight_changes: Optional[Dict[Tuple[str, int, int], float]] = None) -> str:
  agg, last = aggregate(records), final_steps(records)
  metrics = [(m, title) for m, _, title in METRICS if any(m in r for r in records)]
  out = io.StringIO()
  out.write(header + "\n\n" + setup + "\n\n")
  out.write("Each cell: mean ± std over seeds of the test-split top-1 (or δ<1.25), in %, with the "
            "standard error of the mean (seeds' spread and test sampling, see tf_mtssl/study_report.py) "
            "and the number of seeds.\n\n")
  out.write("## At the end of pretraining (paper_spec 8.2 layout)\n\n")
  out.write("| Pre-training | steps | " + " | ".join(t for _, t in metrics) + " |\n")
  out.write("|---|---|" + "---|" * len(metrics) + "\n")
  for c in order:
    if c in last:
      a = agg[(c, last[c])]
      out.write(f"| {labels[c]} | {last[c]} | " + " | ".join(_cell(a.get(m)) for m, _ in metrics) + " |\n")
  rows = comparisons(records, order)
  if rows:
    out.write("\n## Differences (percentage points ± standard error; z = difference / SE)\n\n")
    out.write("| comparison | " + " | ".join(t for _, t in metrics) + " |\n")
    out.write("|---|" + "---|" * len(metrics) + "\n")
    for row in rows:
      out.write(f"| {row['comparison']} | " + " | ".join(_z_cell(row.get(m)) for m, _ in metrics) + " |\n")
  steps = sorted({r["step"] for r in records if r["step"] > 0})
  if len(steps) > 1:
    out.write("\n## Over pretraining (paper_spec 8.5, figure 3 analogue)\n\n")
    out.write("| Pre-training | step | " + " | ".join(t for _, t in metrics) + " |\n")
    out.write("|---|---|" + "---|" * len(metrics) + "\n")
    for c in order:
      for s in sorted({r["step"] for r in records if r["config"] == c}):
        a = agg[(c, s)]
        out.write(f"| {labels[c]} | {s} | " + " | ".join(_cell(a.get(m)) for m, _ in metrics) + " |\n")
  pretext = _pretext_table(records, order, labels, last)
  if pretext:
    out.write("\n## Pretext metrics at the end of pretraining (last logged value, mean over seeds)\n\n")
    out.write(pretext)
  if weight_changes:
    out.write("\n## How far pretraining moved the trunk: ||W - W0|| / ||W0|| over its conv kernels "
              "(W0 = the seed's random init; mean over seeds)\n\n| Pre-training | "
              + " | ".join(f"step {s}" for s in steps) + " |\n|---|" + "---|" * len(steps) + "\n")
    for c in order:
      cells = []
      for s in steps:
        values = [v for (cc, _, ss), v in weight_changes.items() if cc == c and ss == s and v is not None]
        cells.append(f"{np.mean(values):.2f}" if values else "—")
      if any(x != "—" for x in cells):
        out.write(f"| {labels[c]} | " + " | ".join(cells) + " |\n")
  out.write("\n## Hyper-parameters chosen on the validation split (per run)\n\n")
  out.write("| Pre-training | seed | step | linear weight decay | linear train / val / test top-1 | kNN k |\n")
  out.write("|---|---|---|---|---|---|\n")
  for c in order:
    for r in sorted((r for r in records if r["config"] == c and r["step"] == last.get(c)), key=lambda r: r["seed"]):
      out.write(f"| {labels[c]} | {r['seed']} | {r['step']} | {r.get('linear_weight_decay', '—')} | "
                f"{100 * r.get('linear_train_top1', float('nan')):.1f} / {100 * r.get('linear_val_top1', float('nan')):.1f}"
                f" / {100 * r.get('linear_top1', float('nan')):.1f} | {r.get('knn_k', '—')} |\n")
  return out.getvalue()


PRETEXT_TAGS = ("rp/accuracy", "col/top1_bin_accuracy", "ex/retrieval_accuracy", "ms/mask_iou")


def _pretext_table(records, order, labels, last) -> str:
  lines = []
  for c in order:
    rows = [r for r in records if r["config"] == c and r["step"] == last.get(c) and r.get("pretext")]
    if not rows:
      continue
    cells = []
    for tag in PRETEXT_TAGS:
      values = [r["pretext"][tag] for r in rows if tag in r["pretext"]]
      if values:
        cells.append(f"{tag} {np.mean(values):.3f}")
    lines.append(f"| {labels[c]} | {', '.join(cells)} |")
  if not lines:
    return ""
  return "| Pre-training | pretext metrics |\n|---|---|\n" + "\n".join(lines) + "\n"


def write_csv(path: str, records: List[Dict], header: str) -> None:
  buf = io.StringIO()
  for line in header.splitlines():
    buf.write(f"# {line.lstrip('# ')}\n")
  writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
  writer.writeheader()
  for r in sorted(records, key=lambda r: (r["config"], r["seed"], r["step"])):
    writer.writerow(r)
  write_text(path, buf.getvalue())


def write_text(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def write_json(path: str, records: List[Dict], meta: Dict) -> None:
  body = {**meta, "records": [{k: v for k, v in r.items() if k != "detail"} for r in records],
          "details": {f"{r['config']}-s{r['seed']}-step{r['step']}": r.get("detail") for r in records}}
  write_text(path, json.dumps(body, indent=1, sort_keys=True, default=float) + "\n")


# ---- plots --------------------------------------------------------------------------------------------
def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def plot_accuracy_vs_steps(path: str, records: List[Dict], order, labels, title: str) -> None:
  plt = _plt()
  agg = aggregate(records)
  metrics = [(m, t) for m, _, t in METRICS if any(m in r for r in records)]
  fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.2), squeeze=False)
  for ax, (m, t) in zip(axes[0], metrics):
    for c in order:
      points = sorted((s, a[m]) for (cc, s), a in agg.items() if cc == c and m in a)
      if not points:
        continue
      if c == "random":
        mean, se = points[0][1]["mean"], points[0][1]["se"]
        ax.axhline(100 * mean, color="k", ls="--", lw=1, label=f"{labels[c]}")
        ax.axhspan(100 * (mean - 2 * se), 100 * (mean + 2 * se), color="k", alpha=0.08)
        continue
      xs = [s for s, _ in points]
      ys = np.array([100 * a["mean"] for _, a in points])
      es = np.array([100 * a["se"] for _, a in points])
      line = ax.plot(xs, ys, marker="o", label=labels[c])[0]
      ax.fill_between(xs, ys - 2 * es, ys + 2 * es, color=line.get_color(), alpha=0.12)
    ax.set_xlabel("pretraining steps")
    ax.set_ylabel(f"{t} (%), test split")
    ax.set_title(t)
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  fig.suptitle(title + "\nmean over seeds; bands: ± 2 standard errors; dashed: random init", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_lasso_alpha(path: str, records: List[Dict], title: str) -> bool:
  rows = [r for r in records if r.get("lasso_alpha")]
  if not rows:
    return False
  plt = _plt()
  last = max(r["step"] for r in rows)
  final = [r for r in rows if r["step"] == last]
  alpha = np.mean([np.abs(np.array(r["lasso_alpha"]["alpha"])) for r in final], axis=0)
  tasks = final[0]["lasso_alpha"]["tasks"]
  fig, ax = plt.subplots(figsize=(max(4, 0.6 * alpha.shape[1] + 2), 0.6 * len(tasks) + 1.6))
  im = ax.imshow(alpha, cmap="viridis", vmin=0, aspect="auto")
  ax.set_yticks(range(len(tasks)), tasks)
  ax.set_xticks(range(alpha.shape[1]), [str(i + 1) for i in range(alpha.shape[1])])
  ax.set_xlabel("block-3 unit")
  for (i, j), v in np.ndenumerate(alpha):
    ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < alpha.max() / 2 else "k", fontsize=8)
  fig.colorbar(im, ax=ax, label="|alpha| (unit L2 norm per task)")
  ax.set_title(textwrap.fill(f"{title}; lasso alpha at step {last}, mean |alpha| over {len(final)} seeds", 60),
               fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def plot_training_curves(path: str, records: List[Dict], curves: Dict, order, labels, suffix: str,
                         ylabel: str, title: str) -> bool:
  """One panel per configuration: the tags ending in `suffix` (e.g. '/trunk_update_norm'), seed 0."""
  chosen = []
  for c in order:
    recs = sorted((r for r in records if r["config"] == c and r["step"] > 0), key=lambda r: r["seed"])
    if recs:
      tags = {t: v for t, v in curves.get(recs[0]["run_key"], {}).items() if t.endswith(suffix)}
      if tags:
        chosen.append((c, recs[0]["seed"], tags))
  if not chosen:
    return False
  plt = _plt()
  cols = min(3, len(chosen))
  rows_n = math.ceil(len(chosen) / cols)
  fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.4 * rows_n), squeeze=False)
  for ax, (c, seed, tags) in zip(axes.flat, chosen):
    for tag, points in sorted(tags.items()):
      ax.plot([s for s, _ in points], [v for _, v in points], label=tag.split("/")[0])
    ax.set_title(f"{labels[c]} (seed {seed})", fontsize=9)
    ax.set_xlabel("pretraining step")
    ax.set_ylabel(ylabel, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(chosen):]:
    ax.axis("off")
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True
