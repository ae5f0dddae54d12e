"""A self-contained HTML page that replays a sampler run: the final tokens, each revealed at its step.

The sampler's trace (`GenerateOutput.trace`) says which positions each step committed; the page holds
it as JSON (no server, no network) with a slider and a play button. Reader's page: docs/sampler.md.
"""
from __future__ import annotations

import json
from pathlib import Path

from minidiff.plumbing.files import write_text

# a canvas row: the prompt grey, masks as light blocks, a step's tokens on yellow (also serve.py's live page)
STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:60em}
.row{white-space:pre-wrap;font-family:ui-monospace,monospace;border:1px solid #ccc;padding:.6em;margin:.6em 0}
.prompt{color:#777}.mask{color:#bbb}.new{background:#ffe08a}"""

PAGE = """<!DOCTYPE html>
<html lang="tr"><head><meta charset="utf-8"><title>minidiff denoising</title>
<style>
""" + STYLE + """
</style></head><body>
<h1>Denoising replay</h1>
<p><button id="play">play</button> step <span id="n">0</span> / <span id="total"></span>
<input id="slider" type="range" min="0" value="0" style="width:30em"></p>
<div id="rows"></div>
<script>
const DATA = __DATA__;
const slider = document.getElementById("slider"), rows = document.getElementById("rows");
slider.max = DATA.steps; document.getElementById("total").textContent = DATA.steps;
function esc(s){return s.replace(/&/g,"&amp;").replace(/</g,"&lt;").replace(/>/g,"&gt;");}
function draw(step){
  document.getElementById("n").textContent = step;
  rows.innerHTML = DATA.rows.map(r => '<div class="row"><span class="prompt">' + esc(r.prompt) +
    '</span>' + r.pieces.map((p, i) => r.reveal[i] > step ? '<span class="mask">\\u2591</span>' :
    '<span class="' + (r.reveal[i] === step && step > 0 ? 'new' : '') + '">' + esc(p) + '</span>').join('') +
    '</div>').join('');
}
let timer = null;
document.getElementById("play").onclick = () => {
  if (timer) { clearInterval(timer); timer = null; return; }
  if (+slider.value >= DATA.steps) slider.value = 0;
  timer = setInterval(() => { slider.value = +slider.value + 1; draw(+slider.value);
    if (+slider.value >= DATA.steps) { clearInterval(timer); timer = null; } }, 120);
};
slider.oninput = () => draw(+slider.value);
draw(0);
</script></body></html>
"""


def token_pieces(tok, ids: list[int]) -> list[str]:
    """The text each token adds (incremental decoding, so multi-byte characters come out whole)."""
    pieces, previous = [], ""
    for n in range(1, len(ids) + 1):
        text = tok.decode(ids[:n], skip_special_tokens=True)
        pieces.append(text[len(previous):] if text.startswith(previous) else tok.decode(ids[n - 1:n]))
        previous = text
    return pieces


def write_trace_html(path: Path, tok, out, prompts_text: list[str]) -> None:
    """A page with the final tokens and, per position, the step at which it was revealed."""
    steps, final, initial = out.num_forward, out.sequences.tolist(), out.initial.tolist()
    reveal = [[0] * len(row) for row in final]
    for n, step in enumerate(out.trace, start=1):
        for r, (positions, committed) in enumerate(zip(step.positions.tolist(), step.committed.tolist())):
            for p, c in zip(positions, committed):
                if c:
                    reveal[r][p] = n
    rows = []
    for r, row in enumerate(final):
        s, e = out.answer_start[r], out.answer_end[r]
        # positions masked at the start but never committed by a step (stop rules) appear last
        when = [reveal[r][p] if reveal[r][p] or initial[r][p] != out.mask_id else steps for p in range(s, e)]
        rows.append({"prompt": prompts_text[r], "pieces": token_pieces(tok, row[s:e]), "reveal": when})
    data = json.dumps({"steps": steps, "rows": rows}, ensure_ascii=False).replace("</", "<\\/")
    write_text(path, PAGE.replace("__DATA__", data))
