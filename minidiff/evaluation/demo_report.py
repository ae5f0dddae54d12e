"""The demo's report from demo.py's summary dict: summary.md and demo.png. What the numbers mean:
docs/benchmarks.md ("The demo") and docs/sampler.md ("Infilling, as the demo scores it").
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from minidiff.evaluation.infilling import MASK_SHOWN
from minidiff.plumbing import files


def loss_curve(metrics_path: Path) -> dict:
    """{"train": [[step, loss], ...], "eval": [[step, eval_loss], ...]} from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {"train": [[r["step"], r["loss"]] for r in rows if "loss" in r],
            "eval": [[r["step"], r["eval_loss"]] for r in rows if "eval_loss" in r]}


def render_summary(s: dict) -> str:
    ppl, cpt, sft, data = s["perplexity"], s["cpt_curve"]["eval"], s["sft_curve"]["eval"], s["sft_data"]
    lines = [
        f"# minidiff demo ({s['parameters']:,} parameters, vocabulary {s['vocab_size']:,}, "
        f"{s['total_seconds']:.0f} s)",
        "",
        "| stage | held-out NELBO loss (per token) | MLM perplexity, held-out speeches (15% masked) |",
        "|---|---|---|",
        f"| random init | {cpt[0][1]:.3f} | {ppl['init']['perplexity']:.1f} |",
        f"| after pre-training | {cpt[-1][1]:.3f} | {ppl['after_cpt']['perplexity']:.1f} |",
        f"| after instruction tuning | - | {ppl['after_sft']['perplexity']:.1f} |",
        "",
        *render_infill(s["infill"]),
        "",
        f"Instruction tuning on all {data['rows']:,} pairs ({data['cut_prompt_too_long']:,} prompts cut from the left "
        f"to {data['max_len'] // 2} tokens, {data['truncated']:,} answers cut at {data['max_len']} tokens, "
        f"{data['dropped_prompt_too_long']:,} dropped). Held-out pairs, NELBO loss: {sft[0][1]:.3f} (the pre-trained "
        f"model) -> {sft[-1][1]:.3f}. A model of {s['parameters']:,} parameters trained for minutes on a CPU learns "
        "Turkish spelling, not meaning: expect letters, not answers, below.",
        "",
        "| question | answer (Diffutron's diffutron-short settings, seeded) | reference |",
        "|---|---|---|",
    ]

    def cell(text: str) -> str:
        text = " ".join(text.split()).replace("|", "/")
        return text if len(text) <= 90 else text[:87] + "..."

    for sample in s["samples"]:
        mark = " (held out)" if sample["held_out"] else ""
        lines.append(f"| {cell(sample['question'])}{mark} | {cell(sample['answer'])} | {cell(sample['reference'])} |")
    if s.get("picture"):
        lines += ["", f"Picture: {s['picture']}"]
    lines += ["", "Stage times (s): " + ", ".join(f"{k} {v}" for k, v in s["seconds"].items()), ""]
    return "\n".join(lines)


def render_infill(infill: dict) -> list[str]:
    """The infilling table, how it was made, and the example as its canvas fills."""
    frequent = infill["most_frequent_char"]
    lines = [
        f"Filling in masked characters of {infill['snippets']} held-out snippets ({infill['chars']:,} characters; "
        f"{infill['skipped_snippets']} left out where a character was not one token), model after pre-training, "
        "accuracy on the masked characters:",
        "",
        f"| masking | masked characters | most frequent character ({frequent!r}) | bigram, both neighbours "
        "| model, all at once | model, one character per step |",
        "|---|---|---|---|---|---|",
    ]
    for row in infill["rows"]:
        lines.append(f"| {row['masking']} | {row['masked_chars']:,} | {row['most_frequent']:.1%} | {row['bigram']:.1%} "
                     f"| {row['model_one_step']:.1%} | {row['model']:.1%} |")
    gaps = ", ".join(f"{100 * (row['model'] - row['bigram']):+.1f}" for row in infill["rows"])
    lines += ["", f"Model (one character per step) minus bigram, percentage points, row by row: {gaps}."]
    example, frames = infill["example"], infill["example"]["frames"]
    shown = sorted({round(k * (len(frames) - 1) / 4) for k in range(5)})
    labels = [f"step {i}/{len(frames) - 1}" for i in shown] + ["original"]
    width = max(map(len, labels)) + 2
    lines += [
        "",
        "Baselines fitted to the training speeches: the most frequent character everywhere; a character "
        "bigram model (add-one smoothing) that fills each masked run with the most probable character at "
        "each position given both known neighbours (forward-backward). The model fills the whole snippet as "
        "one block with `sampler.infill`, greedy: all masks in one step, or one character per step, most "
        "confident first.",
        "",
        f"One snippet as its canvas fills ({example['correct']} of {len(example['masked'])} masked characters "
        f"right; {MASK_SHOWN} = masked; replay: infill_trace.html):",
        "",
        "```",
        *(f"{label:<{width}}{text}" for label, text in zip(labels, [frames[i] for i in shown] + [example["text"]])),
        "```",
    ]
    return lines


def draw_picture(summary: dict, path: Path) -> str | None:
    """The loss curve, infilling bars and denoising as a PNG at `path`: its name, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from PIL import Image
    except ImportError:
        return None
    fig, (curve, bars, canvas) = plt.subplots(1, 3, figsize=(16, 4.2), dpi=110,
                                              gridspec_kw={"width_ratios": [1, 1, 2.2]})
    draw_loss_curve(curve, summary)
    draw_infill_bars(bars, summary["infill"]["rows"])
    draw_denoising(canvas, summary["infill"]["example"])
    fig.tight_layout()
    fig.canvas.draw()
    pixels = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())).convert("RGB")
    plt.close(fig)
    with files.atomic_path(path) as tmp:  # 128 colours: a third of the bytes
        pixels.quantize(colors=128, method=Image.Quantize.FASTOCTREE).save(tmp, format="PNG", optimize=True)
    return path.name


def draw_infill_bars(ax, rows: list[dict]) -> None:
    kinds = [("most_frequent", "most frequent char", "#bbbbbb"), ("bigram", "bigram, both neighbours", "#dd8452"),
             ("model", "model, one char per step", "#4c72b0")]
    x = np.arange(len(rows))
    for k, (key, label, colour) in enumerate(kinds):
        values = [100 * row[key] for row in rows]
        ax.bar(x + (k - 1) * 0.27, values, 0.27, color=colour, label=label)
        for xi, v in zip(x + (k - 1) * 0.27, values):
            ax.text(xi, v + 0.8, f"{v:.0f}", ha="center", fontsize=7)
    ax.set_xticks(x, [row["masking"].replace(", 20% of the words", "").replace("random characters, ", "random ")
                      for row in rows], fontsize=8)
    ax.set_ylim(0, 1.4 * max(100 * row["model"] for row in rows))  # room for the legend above the bars
    ax.set_ylabel("masked characters right (%)")
    ax.set_title("held-out infilling, 128 snippets")
    ax.legend(frameon=False, fontsize=8, loc="upper right")


def draw_loss_curve(ax, summary: dict) -> None:
    train, held = summary["cpt_curve"]["train"], summary["cpt_curve"]["eval"]
    ax.plot([s for s, _ in train], [v for _, v in train], color="#4c72b0", lw=1.2, label="training batches")
    ax.plot([s for s, _ in held], [v for _, v in held], "o-", color="#dd8452", label="held-out speeches")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("NELBO (nats per character)")
    ax.set_title(f"pre-training, {summary['parameters']:,} parameters", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)


def draw_denoising(ax, example: dict, rows: int = 8) -> None:
    """Some of the example's frames, one per line (the colours: the title's)."""
    frames, text = example["frames"], example["text"]
    shown = sorted({round(k * (len(frames) - 1) / (rows - 1)) for k in range(rows)})
    last, masked = len(frames) - 1, set(example["masked"])
    lines = [(f"step {i}", frames[i], frames[j]) for j, i in zip([shown[0]] + shown, shown)]
    for y, (label, line, above) in enumerate(lines + [("original", text, text)]):
        ax.text(-1.5, y, label, ha="right", va="center", fontsize=10, color="#555555")
        for x, (char, before) in enumerate(zip(line, above)):
            style = {"color": "#999999" if char == MASK_SHOWN else "#222222"}
            if before == MASK_SHOWN and char != MASK_SHOWN:  # filled since the line above
                style["bbox"] = {"facecolor": "#ffd54f", "edgecolor": "none", "pad": 0.6}
            if (label == f"step {last}" and x in masked) or (label == "original" and x in masked):
                right = char == text[x] or label == "original"
                style.update(color="#222222" if label == "original" else "#2e7d32" if right else "#c62828",
                             fontweight="bold")
            shown = "␣" if char == " " and x in masked and label != "original" else char  # a filled space
            ax.text(x, y, shown, ha="center", va="center", family="DejaVu Sans Mono", fontsize=13, **style)
    ax.set_xlim(-8, len(text))
    ax.set_ylim(len(lines) + 0.5, -0.5)
    ax.axis("off")
    ax.set_title("held-out text, masked characters filled one per step, most confident first\n"
                 "(yellow: filled since the line above; last step green / red: right / wrong)", fontsize=11)
