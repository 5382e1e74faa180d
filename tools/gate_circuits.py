"""Which circuit to put behind the gate: the selective score with a lighter cost term, side by side.

The selective score subtracts each neuron's activity on ordinary text (its RMS over every token of the
negative prompts) because static steering scales it on every prompt. Behind a gate a benign prompt is
steered only when the gate fires on it by mistake, so that term guards less, and a circuit chosen with a
lighter one may remove refusals the product's circuit cannot (REPORT.md section 8: the product's 72
neurons leave 5 of 60 held-out prompts refused at any strength). This study makes the product mask the way
`cna-local attribute` does (same prompts, the last 20 benign ones held out for calibration, same gate),
then circuits with the cost term weighted by each of --cost-weights, every one behind that same gate;
runs the gated calibration of `attribute` on each (its bounds decide, not the held-out sets), and with
--eval the held-out sets at each calibrated strength, one run, one baseline.

    python tools/gate_circuits.py --model default --cost-weights 1,0.5,0 --eval --json circuits.json
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cna_local.attribution import AttributionOptions, attribute  # noqa: E402
from cna_local.calibration import CalibrationError, calibrate_gated  # noqa: E402
from cna_local.capture import LlamaSource  # noqa: E402
from cna_local.commands.attribute import CALIBRATION_PROMPTS  # noqa: E402
from cna_local.models import resolve_model  # noqa: E402
from cna_local.prompts import PromptSet, load_bundled  # noqa: E402
from cna_local.scoring import direction_writes, resolve_k, selective_score, top_neurons  # noqa: E402


class Recording:
    """A LlamaSource that keeps what each collect returned, so the circuits reuse the product's capture."""

    def __init__(self, source):
        self._source, self.stats = source, []

    def __getattr__(self, name):
        return getattr(self._source, name)

    def collect(self, *args, **kwargs):
        out = self._source.collect(*args, **kwargs)
        self.stats.append(out)
        return out


@click.command()
@click.option("--model", default="default", show_default=True)
@click.option("--cost-weights", default="1,0.5,0", show_default=True, help="Comma-separated; 1 is the product's score.")
@click.option("--top-fraction", default=0.001, show_default=True, type=float)
@click.option("--eval", "run_eval", is_flag=True, help="Then the held-out sets at each calibrated strength.")
@click.option("--extra", default="", help="Extra strengths for every circuit in the held-out run, comma-separated.")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path))
def main(model, cost_weights, top_fraction, run_eval, extra, batch_size, json_out):
    path = resolve_model(model)
    pos = load_bundled("harmful_train")
    neg_all = load_bundled("benign_train")
    neg = PromptSet(neg_all.name, neg_all.prompts[:-CALIBRATION_PROMPTS])
    cal_benign, cal_harmful = neg_all.prompts[-CALIBRATION_PROMPTS:], pos.prompts[-CALIBRATION_PROMPTS:]
    t0 = time.perf_counter()
    source = Recording(LlamaSource(path))
    product = attribute(source, pos, neg, AttributionOptions(multiplier=-1.0)).mask
    pos_stats, neg_stats = source.stats
    write = direction_writes(source.down_weights(), pos_stats.resid_mean, neg_stats.resid_mean)
    source.close()
    print(f"capture and product mask: {len(product.layers)} neurons, gate threshold {product.gate.threshold:.4g} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    k = resolve_k(product.n_layer * product.n_ff, top_fraction)
    circuits = []
    for c in [float(x) for x in cost_weights.split(",")]:
        scores = selective_score(pos_stats.mean, neg_stats.mean, neg_stats.token_ms, write, cost_weight=c)
        n = min(k, int((scores != 0).sum()))
        sel = top_neurons(scores, n, exclude=scores == 0)
        mask = dataclasses.replace(product, layers=sel.layers, neurons=sel.neurons, scores=sel.scores, scales=None,
                                   meta={**product.meta, "name": f"selective, cost x{c:g}"})
        shared = len(set(zip(sel.layers.tolist(), sel.neurons.tolist()))
                     & set(zip(product.layers.tolist(), product.neurons.tolist())))
        print(f"cost x{c:g}: {n} neurons, layers {sel.layers.min()}-{sel.layers.max()}, {shared} in the product's",
              flush=True)
        circuits.append({"cost_weight": c, "neurons": n, "shared_with_product": shared, "mask": mask})
    for circ in circuits:
        t0 = time.perf_counter()
        try:
            cal = calibrate_gated(path, circ["mask"], cal_benign, cal_harmful, batch_size=batch_size,
                                  progress=lambda msg: print("  " + msg, flush=True))
            circ["calibrated"], circ["calibration"] = cal.chosen, cal.record
            circ["tried"] = cal.tried
        except CalibrationError as exc:
            circ["calibrated"], circ["calibration"] = None, {"error": str(exc)}
        print(f"cost x{circ['cost_weight']:g}: calibrated {circ['calibrated']} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    doc = {"model": str(path), "circuits": [{k: v for k, v in c.items() if k != "mask"} for c in circuits]}
    if run_eval:
        from cna_local.evaluation.report import comparison_dict, format_comparison
        from cna_local.evaluation.runner import evaluate_masks

        extras = [float(x) for x in extra.split(",") if x]
        chosen = [c for c in circuits if c["calibrated"] is not None or extras]
        strengths = [sorted({*([c["calibrated"]] if c["calibrated"] is not None else []), *extras}) for c in chosen]
        t0 = time.perf_counter()
        results = evaluate_masks(path, [c["mask"] for c in chosen], strengths, gates=[True] * len(chosen),
                                 batch_size=batch_size)
        print(format_comparison(results))
        print(f"held-out run: {time.perf_counter() - t0:.0f} s")
        doc["eval"] = comparison_dict(results, records=True)
    if json_out:
        json_out.write_text(json.dumps(doc, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
