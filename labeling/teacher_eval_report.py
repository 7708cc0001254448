"""Tables, ``comparison.md``, ``per_class_ap.png`` and ``report.json`` of ``distillery teachers
eval`` (:mod:`distillery.labeling.teacher_eval` measures; this module only presents)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from distillery.engine.evaluation import write_report
from distillery.labeling.teacher_eval import METRICS, SHORT, TeacherEval


def _fmt(v, signed: bool = False) -> str:
    return "-" if v is None else (f"{v:+.3f}" if signed else f"{v:.3f}")


def tables(ev: TeacherEval) -> tuple[list[list[str]], list[list[str]]]:
    """(summary table, per-class table) as rows of strings, headers first. Teachers are
    lettered A, B, ... in ``--teachers`` order (the summary names them); AP is AP50-95 and
    a ``B-A`` column is a delta against the baseline A."""
    ts = ev.report["teachers"]
    key = [chr(65 + i) if i < 26 else f"T{i + 1}" for i in range(len(ts))]
    heads = ["box mAP50-95", "box mAP50", "mask mAP50-95", "mask mAP50", "mask mIoU"]
    top = [["teacher", *heads]]
    for i, t in enumerate(ts):
        top.append([f"{key[i]} {t['label']}", *(_fmt(t[h]) for h in heads)])
        if i:
            top.append([f"{key[i]}-A", *(_fmt(None if None in (t[h], ts[0][h]) else t[h] - ts[0][h], True) for h in heads)])
    per = [["class", "GT"] + [x for m in METRICS for x in [f"{SHORT[m]} {k}" for k in key]
                              + [f"{k}-A" for k in key[1:]]] + ["worse"]]
    letter = {t["label"]: k for t, k in zip(ts, key)}
    for r in ev.rows:
        per.append([r["class"], str(r["gt_instances"])]
                   + [x for m in METRICS for x in [_fmt(r["values"][t["label"]][m]) for t in ts]
                      + [_fmt(r["delta"][t["label"]][m], True) for t in ts[1:]]]
                   + ["; ".join(f"{letter[t]}: {', '.join(SHORT[m] for m in ms)}" for t, ms in r["worse"].items())])
    return top, per


def markdown(rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])] + ["| " + " | ".join(r) + " |" for r in rows[1:]]


def write_outputs(ev: TeacherEval, out: str | Path) -> Path:
    """Into ``out`` (created): ``report.json``, ``comparison.md`` (both tables, worse classes
    in bold), ``per_class_ap.png`` (box AP50-95, mask AP50-95 and mask mIoU per class, one
    colour per teacher)
    and one folder per teacher with :func:`~distillery.engine.evaluation.write_report`'s files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    r = ev.report
    (out / "report.json").write_text(json.dumps(r, indent=2))
    title = f"teachers on {r['gt']['name'] or r['gt']['labelset']} ({r['images']} images, {r['split']['why']})"
    for t in r["teachers"]:
        write_report(r["reports"][t["label"]], out / re.sub(r"[^A-Za-z0-9._-]", "-", t["label"]),
                     f"{t['label']} on {r['gt']['name'] or r['gt']['labelset']}")
    top, per = tables(ev)
    per = [per[0]] + [[f"**{c}**" if row[-1] else c for c in row] for row in per[1:]]
    md = [f"# {title}", "", f"Baseline A: {r['baseline']}. AP is AP50-95; a B-A column is teacher B minus A; classes "
          "where any delta is negative are in bold.", "", *markdown(top), "", *markdown(per)]
    md += [""] + [f"- warning: {w}" for w in ev.warnings]
    (out / "comparison.md").write_text("\n".join(md) + "\n")

    names = [row["class"] for row in ev.rows]
    labels = [t["label"] for t in r["teachers"]]
    fig, axes = plt.subplots(1, 3, figsize=(16, max(2.5, 0.3 * len(names) * len(labels) / 2 + 1.5)), squeeze=False)
    y, h = np.arange(len(names)), 0.8 / len(labels)
    for ax, m in zip(axes[0], METRICS):
        for i, t in enumerate(labels):
            ax.barh(y + i * h, [row["values"][t][m] for row in ev.rows], height=h, color=f"C{i}", label=t)
        ax.set_yticks(y + h * (len(labels) - 1) / 2, names)
        ax.invert_yaxis()
        ax.set(xlim=(0, 1), title=f"per-class {m}")
        ax.legend(fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "per_class_ap.png", dpi=100)
    plt.close(fig)
    return out
