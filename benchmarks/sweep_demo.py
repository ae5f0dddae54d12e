"""The sweep behind the demo's defaults: each cell is one `demo.py` run with a few flags changed.
Findings and the cells: docs/benchmarks.md ("The demo's settings: a sweep").

    python benchmarks/sweep_demo.py --out runs/sweep --json runs/sweep/sweep.json   # about 35 minutes
    python benchmarks/sweep_demo.py --only "centre" "peak lr 4e-3"                  # some cells

Cells change one thing at a time around a centre; the width x depth cells get the centre's
seconds of pre-training, timed by short runs of each shape made in the same sweep.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from common import banner, parse, write_results

ROOT = Path(__file__).resolve().parents[1]
CENTRE = {"cpt_steps": 2000, "cpt_warmup": 400, "cpt_lr": 2e-3, "cpt_min_lr_ratio": 0.1,
          "cpt_batch_size": 16, "hidden_size": 128, "num_layers": 4, "intermediate_size": 256}
SHAPES = {  # width x depth cells: their steps come from the timing runs
    "hidden 96, 6 layers": {"hidden_size": 96, "num_layers": 6, "intermediate_size": 192},
    "hidden 192, 2 layers": {"hidden_size": 192, "num_layers": 2, "intermediate_size": 384},
}
CELLS = {  # name -> changes to the centre
    "warm-up 100 (the old default, 5%)": {"cpt_warmup": 100},
    "warm-up 200": {"cpt_warmup": 200},
    "centre": {},
    "warm-up 800": {"cpt_warmup": 800},
    "peak lr 1e-3": {"cpt_lr": 1e-3},
    "peak lr 4e-3": {"cpt_lr": 4e-3},
    "final lr 1% of peak": {"cpt_min_lr_ratio": 0.01},
    "batch 32, 1,000 steps": {"cpt_batch_size": 32, "cpt_steps": 1000, "cpt_warmup": 200},
    "batch 8, 4,000 steps": {"cpt_batch_size": 8, "cpt_steps": 4000, "cpt_warmup": 800},
    **SHAPES,
}
TIMING_STEPS = 150
DEMO_MAX_LEN = 64  # tokens per pre-training row (demo.py --max-len)


def run_demo(out: Path, settings: dict) -> dict:
    """One demo run with `settings` (DemoConfig fields); its summary.json."""
    flags = [a for k, v in settings.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    subprocess.run([sys.executable, str(ROOT / "demo.py"), "--out", str(out), "--no-progress", *flags],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


def seconds_per_step(out: Path, settings: dict) -> float:
    """Seconds per pre-training step of this shape, from the trainer's median tokens/s in a short demo run."""
    short = {**settings, "cpt_steps": TIMING_STEPS, "cpt_warmup": 10, "sft_epochs": 1, "infill_snippets": 1,
             "samples": 1}
    run_demo(out, short)
    rows = [json.loads(line) for line in (out / "cpt" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    tokens_per_second = statistics.median(r["tokens_per_s"] for r in rows if "tokens_per_s" in r)
    return settings["cpt_batch_size"] * DEMO_MAX_LEN / tokens_per_second


def equal_time_steps(out: Path, names) -> dict[str, int]:
    """Steps for each shape cell: as many as fit in the centre's seconds of pre-training."""
    centre = seconds_per_step(out / "timing-centre", CENTRE)
    return {name: int(round(CENTRE["cpt_steps"] * centre / seconds_per_step(
        out / f"timing-{i}", {**CENTRE, **SHAPES[name]}), -1)) for i, name in enumerate(names)}


def row(name: str, settings: dict, summary: dict) -> dict:
    """One row of the table: the settings and what the demo measured."""
    return {"cell": name, "settings": settings, "parameters": summary["parameters"],
            "held_out_nelbo": summary["cpt_curve"]["eval"][-1][1],
            "sft_held_out_nelbo": summary["sft_curve"]["eval"][-1][1],
            "infill": {r["masking"]: {k: r[k] for k in ("bigram", "model", "model_one_step", "most_frequent")}
                       for r in summary["infill"]["rows"]},
            "seconds": summary["seconds"], "total_seconds": summary["total_seconds"]}


def markdown(rows: list[dict]) -> str:
    head = ("| cell | steps | warm-up | peak lr | final lr | batch | hidden x layers | held-out NELBO "
            "| 15%: model / bigram | 30%: model / bigram | words: model / bigram | pre-training s | demo s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        s = r["settings"]
        pct = [f"{100 * c['model']:.1f}% / {100 * c['bigram']:.1f}%" for c in r["infill"].values()]
        lines.append(f"| {r['cell']} | {s['cpt_steps']:,} | {s['cpt_warmup']} | {s['cpt_lr']:g} | "
                     f"{s['cpt_lr'] * s['cpt_min_lr_ratio']:g} | {s['cpt_batch_size']} | "
                     f"{s['hidden_size']} x {s['num_layers']} | {r['held_out_nelbo']:.3f} | {' | '.join(pct)} | "
                     f"{r['seconds']['pre-training']:.0f} | {r['total_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/sweep", help="where each cell's demo run goes (default runs/sweep)")
    parser.add_argument("--only", nargs="+", choices=sorted(CELLS), help="run only these cells")
    args = parse(parser, argv)
    out = Path(args.out).resolve()
    print(banner(), flush=True)
    names = args.only or list(CELLS)
    steps = equal_time_steps(out, [n for n in names if n in SHAPES])
    rows = []
    for i, name in enumerate(names):
        settings = {**CENTRE, **CELLS[name]}
        if name in steps:  # the centre's share of warm-up (a fifth)
            settings.update(cpt_steps=steps[name], cpt_warmup=steps[name] // 5)
        rows.append(row(name, settings, run_demo(out / f"cell-{i:02d}", settings)))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
        write_results(args.json, {"rows": rows, "equal_time_steps": steps})
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
