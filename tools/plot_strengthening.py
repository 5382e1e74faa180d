"""Strengthening frontier: refusal on harmful prompts against over-refusal on benign ones, per steering and
multiplier above 1, from saved comparison JSONs (`write_comparison_json`, `cna-local eval --json-out`).

Not a test. Each file's own baseline is drawn too, so runs against different baselines stay visibly apart.

    python tools/plot_strengthening.py sweep15.json str15.json --out docs/strengthening-1.5b.png
"""

from __future__ import annotations

import json
from pathlib import Path

import click


def label_of(entry: dict) -> str:
    gate = entry.get("gate")
    if not gate:
        return "static (every prompt)"
    strict = gate.get("threshold_strengthen")
    if strict is not None:
        return f"gated, strengthening threshold {strict:.4g}"
    return f"gated, one threshold {gate['threshold']:.4g}"


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Where to write the PNG.")
@click.option("--title", default=None, help="The plot's title.")
def main(files, out, title):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 5.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    bases = set()
    for path in files:
        data = json.loads(path.read_text())
        base = data["baseline"]
        bases.add((base["over_refusal_rate"], base["refusal_rate"]))
        for entry in data["masks"]:
            rows = sorted((r for r in entry["rows"] if r["multiplier"] > 1), key=lambda r: r["multiplier"])
            if not rows:
                continue
            pts = [(base["over_refusal_rate"], base["refusal_rate"], None)]
            pts += [(r["over_refusal_rate"], r["refusal_rate"], r["multiplier"]) for r in rows]
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label_of(entry))
            at: dict[tuple, list] = {}  # strengths that land on the same point share one label
            for x, y, m in pts[1:]:
                at.setdefault((x, y), []).append(f"{m:g}")
            for (x, y), ms in at.items():
                ax.annotate("m = " + ", ".join(ms), (x, y), textcoords="offset points", xytext=(5, -10), fontsize=7,
                            color=line.get_color())
    for x, y in bases:
        ax.plot([x], [y], marker="*", markersize=14, color="black", linestyle="none")
        ax.axvline(x, color="grey", linewidth=0.8, linestyle=":")
    ax.plot([], [], marker="*", markersize=10, color="black", linestyle="none", label="unsteered (dotted: its over-refusal)")
    ax.axhline(0.95, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("over-refusal on benign prompts (lower is better)")
    ax.set_ylabel("refusal on harmful prompts (dashed: 0.95)")
    ax.grid(alpha=0.3)
    ax.set_title(title or "strengthening: refusal against over-refusal, per multiplier", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, format="png")
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
