"""The live page (GET /): type a prompt and watch the canvas fill, step by step.

It streams its own route /page/chat (a chat completion with trace on, the server's API key
when one is set: the key field) and draws each `event: step` as sample.py's
--trace-html replay draws a step (plumbing/trace_page.py); a slider replays the steps received.
One self-contained document. Reader's page: docs/serving.md ("The page").
"""
from __future__ import annotations

import json

from minidiff.plumbing.trace_page import STYLE, token_pieces

PAGE = """<!DOCTYPE html>
<html lang="tr"><head><meta charset="utf-8"><title>minidiff: denoising live</title>
<style>
__STYLE__
.block{background:#e8f0ff}textarea{width:100%;font:inherit}
</style></head><body>
<h1>Denoising live: __MODEL_TEXT__</h1>
<form id="ask"><textarea id="prompt" rows="3" placeholder="Türkiye'nin başkenti neresidir?"></textarea>
<p>max tokens <input id="max_tokens" type="number" min="1" placeholder="server's">
steps <input id="steps" type="number" min="1" placeholder="server's">
API key <input id="key" type="password" placeholder="if the server has one">
<button id="go" type="submit">generate</button> <span id="status"></span></p></form>
<p>step <span id="n">0</span> / <span id="total">0</span>
<input id="slider" type="range" min="0" max="0" value="0" style="width:30em"></p>
<div class="row"><span class="prompt" id="asked"></span><span id="canvas"></span></div>
<p><span class="mask">\u2591</span> still masked, <span class="block">blue</span>: the block being denoised,
<span class="new">yellow</span>: committed by this step (the most confident first)</p>
<h2>Answer</h2><div class="row" id="answer"></div>
<script>
const MODEL = __MODEL__;
const $ = id => document.getElementById(id);
let frames = [], following = true;
function esc(s){return s.replace(/&/g,"&amp;").replace(/</g,"&lt;").replace(/>/g,"&gt;");}
function draw(step){
  $("n").textContent = step;
  const f = frames[step]; if (!f) { $("canvas").innerHTML = ""; return; }
  $("canvas").innerHTML = f.cells.map((c, i) => {
    const cls = f.new.includes(i) ? "new" : i >= f.block[0] && i < f.block[1] ? "block" : "";
    return c === null ? '<span class="mask ' + cls + '">\\u2591</span>'
                      : '<span class="' + cls + '">' + esc(c) + '</span>';
  }).join("");
}
function addFrame(f){
  if (!frames.length) frames.push({cells: f.cells.map(() => null), new: [], block: f.block});
  frames.push(f);
  $("slider").max = frames.length - 1; $("total").textContent = frames.length - 1;
  if (following) { $("slider").value = frames.length - 1; draw(frames.length - 1); }
}
$("slider").oninput = () => { following = +$("slider").value === frames.length - 1; draw(+$("slider").value); };
function handle(block){
  let name = "message", data = "";
  for (const line of block.split("\\n")) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data += line.slice(5).trim();
  }
  if (!data) return;
  if (data === "[DONE]") { $("status").textContent = "done"; return; }
  const obj = JSON.parse(data);
  if (name === "step") addFrame(obj);
  else if (obj.error) $("status").textContent = "error: " + obj.error.message;
  else for (const c of obj.choices) $("answer").textContent += c.delta.content || "";
}
$("ask").onsubmit = async ev => {
  ev.preventDefault();
  frames = []; following = true; draw(0); $("answer").textContent = ""; $("status").textContent = "denoising";
  const body = {model: MODEL, messages: [{role: "user", content: $("prompt").value}], stream: true, trace: true};
  for (const k of ["max_tokens", "steps"]) if ($(k).value) body[k] = +$(k).value;
  $("asked").textContent = $("prompt").value + "\\n";
  const headers = {"Content-Type": "application/json"};
  if ($("key").value) headers.Authorization = "Bearer " + $("key").value;
  const reply = await fetch("/page/chat", {method: "POST", headers, body: JSON.stringify(body)});
  if (!reply.ok) { $("status").textContent = "error: " + (await reply.json()).error.message; return; }
  const reader = reply.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\\n\\n")) >= 0) { handle(buffer.slice(0, cut)); buffer = buffer.slice(cut + 2); }
  }
};
</script></body></html>
"""


def page_html(model_name: str) -> str:
    """The page, asking for `model_name`."""
    text = model_name.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return (PAGE.replace("__STYLE__", STYLE).replace("__MODEL_TEXT__", text)
            .replace("__MODEL__", json.dumps(model_name).replace("</", "<\\/")))


def cells(tok, ids: list[int], mask_id: int) -> list[str | None]:
    """Each answer position's text, None where still masked: the text its token adds to those
    before it (trace_page.token_pieces; a mask adds none), so multi-byte characters come out whole."""
    return [None if token == mask_id else piece for token, piece in zip(ids, token_pieces(tok, ids))]
