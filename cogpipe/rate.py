"""`cogpipe rate CONFIG`: a web page where people rate checkpoint videos against the base
model's, blind, at the same prompt and seed.

    cogpipe rate demo/demo.yaml                 # http://127.0.0.1:8700/ until Ctrl-C
    cogpipe rate demo/demo.yaml --port 0 --run other-run

A pair is one checkpoint's video and the base model's video of the same prompt and seed,
from `evaluate/<ekey>/<run>/`. The two are shown side by side, left and right drawn at
random per pair when the server starts; the page only ever sees a random pair id and
`pair/<id>/left|right` video URLs, so nothing on it names the base. Answers are left /
right / tie per question; the server maps them to checkpoint / base / tie and appends one
part file per judgment to `evaluate/ratings.parquet/` (`cogpipe.ratings`). Each rater
gets the pairs they have rated least first (all unrated ones, in one shuffled order).

Routes: `GET /` the page, `GET /api/next?rater=` the next pair, `POST /api/rate` a
judgment (form fields pair, rater and one per question), `GET /pair/<id>/<side>` a video
(files inside `evaluate/` only), `GET /summary` win rates against the base.
"""

from __future__ import annotations

import html
import json
import random
import signal
import socket
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

import pandas as pd
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse
from starlette.concurrency import run_in_threadpool

from cogpipe.config import PipelineConfig
from cogpipe.errors import UserError
from cogpipe.evaluate import BASE, eval_key
from cogpipe.ratings import (
    HEADER,
    QUESTIONS,
    append_rating,
    read_ratings,
    refresh_report,
    table_cells,
    win_rates,
)
from cogpipe.stages import stage_keys
from cogpipe.workspace import Workspace, read_table

SIDES = ("left", "right")
CHOICES = ("left", "right", "tie")  # what the page sends per question
MAX_RATER = 64  # characters of a rater name


class RateError(UserError, RuntimeError):
    """Nothing to rate for this config (no evaluation, no checkpoint, unknown run)."""


@dataclass(frozen=True)
class Pair:
    """One checkpoint video and the base video of the same prompt and seed."""

    id: str  # random: says nothing about the checkpoint or the sides
    checkpoint: str
    prompt_index: int
    prompt: str
    seed: int
    video: str  # the checkpoint's file name in its folder
    base_side: str  # 'left' | 'right'
    files: dict[str, Path]  # side -> video file

    @property
    def identity(self) -> tuple[str, str, int]:
        return (self.checkpoint, self.prompt, self.seed)

    def answer(self, choice: str) -> str:
        """A page answer (left / right / tie) as stored (base / checkpoint / tie)."""
        if choice == "tie":
            return "tie"
        return "base" if choice == self.base_side else "checkpoint"


def run_folder(cfg: PipelineConfig, run: str | None = None) -> tuple[Workspace, str, Path]:
    """The workspace, eval key and `evaluate/<ekey>/<run>/` folder to rate.

    Raises:
        RateError: the run was never evaluated (with the command to run first).
    """
    ws, ekey = Workspace(cfg.workspace), eval_key(cfg)
    run = run or cfg.name or _train_key(cfg)
    if not run or "/" in run or "\\" in run or run.startswith("."):
        raise RateError(f"--run {run!r}: give a run folder's name under evaluate/{ekey}/")
    folder = ws.root / "evaluate" / ekey / run
    if not (folder / BASE / "metrics.parquet").is_file():
        runs = sorted(p.name for p in folder.parent.glob("*") if (p / BASE).is_dir())
        others = f" (evaluated runs under this eval key: {', '.join(runs)})" if runs else ""
        raise RateError(
            f"no evaluation of run {run!r} under {folder.parent} yet{others}; "
            "run `cogpipe evaluate CONFIG` first"
        )
    return ws, ekey, folder


def _train_key(cfg: PipelineConfig) -> str:
    try:
        return stage_keys(cfg, "train")["train"]
    except (FileNotFoundError, ValueError) as e:  # no source to list (SourceError)
        raise RateError(f"cannot tell the run's folder ({e}); set `name` or pass --run") from e


def list_pairs(folder: Path, rng: random.Random) -> list[Pair]:
    """Every (checkpoint, prompt, seed) of a run's evaluation that the base model also has,
    in a shuffled order, each with random sides. A unit still being written (`.tmp-*`) is
    left out; checkpoints evaluated later are listed when the server starts again.

    Raises:
        RateError: no checkpoint beside the base model.
    """
    base = read_table(folder / BASE / "metrics.parquet")[["prompt", "seed", "video"]]
    pairs = []
    units = [p for p in folder.iterdir() if (p / "metrics.parquet").is_file()]
    for unit in sorted(p for p in units if p.name != BASE and not p.name.startswith(".")):
        rows = read_table(unit / "metrics.parquet").merge(
            base, on=["prompt", "seed"], suffixes=("", "_base")
        )
        for r in rows.itertuples(index=False):
            side = rng.choice(SIDES)
            other = SIDES[1 - SIDES.index(side)]
            files = {side: folder / BASE / r.video_base, other: unit / r.video}
            pairs.append(
                Pair(
                    uuid.UUID(int=rng.getrandbits(128)).hex[:16],
                    unit.name,
                    int(r.prompt_index),
                    r.prompt,
                    int(r.seed),
                    r.video,
                    side,
                    files,
                )
            )
    if not pairs:
        raise RateError(
            f"{folder} holds the base model's videos but no checkpoint's; "
            "train, then run `cogpipe evaluate CONFIG`"
        )
    rng.shuffle(pairs)
    return pairs


class Ratings:
    """The service's state: the pairs, and which pairs each rater has rated how often."""

    def __init__(self, ws: Workspace, ekey: str, folder: Path, seed: int | None = None):
        self.ws, self.ekey, self.run, self.folder = ws, ekey, folder.name, folder
        self.pairs = {p.id: p for p in list_pairs(folder, random.Random(seed))}
        self.lock = threading.Lock()
        self.rated: dict[str, Counter] = {}
        history = read_ratings(ws, ekey=ekey, run=self.run)
        for r in history.itertuples(index=False):
            self.rated.setdefault(r.rater, Counter())[(r.checkpoint, r.prompt, int(r.seed))] += 1

    def next_pair(self, rater: str) -> Pair:
        """The first pair (in the shuffled order) that `rater` has rated least often."""
        seen = self.rated.get(rater, Counter())
        return min(self.pairs.values(), key=lambda p: seen[p.identity])

    def done_by(self, rater: str) -> int:
        """How many distinct pairs `rater` has rated."""
        seen = self.rated.get(rater, Counter())
        return sum(1 for p in self.pairs.values() if seen[p.identity])

    def record(self, pair: Pair, rater: str, choices: dict[str, str]) -> None:
        """Append one judgment (page answers per question) to `evaluate/ratings.parquet/`."""
        row = {
            "rater": rater,
            "ekey": self.ekey,
            "run": self.run,
            "checkpoint": pair.checkpoint,
            "prompt_index": pair.prompt_index,
            "prompt": pair.prompt,
            "seed": pair.seed,
            "video": pair.video,
            "base_side": pair.base_side,
            **{q: pair.answer(choices[q]) for q in QUESTIONS},
        }
        append_rating(self.ws, row)
        with self.lock:
            self.rated.setdefault(rater, Counter())[pair.identity] += 1
            refresh_report(self.ws, self.ekey, self.run, self.folder / "report.md")

    def video(self, pair_id: str, side: str) -> Path:
        """A pair's video file; only files inside `evaluate/` are served.

        Raises:
            LookupError: unknown pair or side, a missing file, or a path outside `evaluate/`.
        """
        pair = self.pairs.get(pair_id)
        if pair is None or side not in SIDES:
            raise LookupError(f"no video {side!r} of pair {pair_id!r}")
        path = pair.files[side].resolve()
        if not path.is_relative_to((self.ws.root / "evaluate").resolve()) or not path.is_file():
            raise LookupError(f"pair {pair_id}'s {side} video is not a file inside evaluate/")
        return path


def parse_judgment(body: bytes) -> tuple[str, str, dict[str, str]]:
    """A form body (urlencoded) -> (pair id, rater, {question: left | right | tie}).

    Raises:
        ValueError: a field is missing or empty, or an answer is not left / right / tie.
    """
    try:
        form = {k: v[0].strip() for k, v in parse_qs(body.decode(), keep_blank_values=True).items()}
    except UnicodeDecodeError as e:
        raise ValueError("the form is not UTF-8 text") from e
    rater, pair_id = form.get("rater", ""), form.get("pair", "")
    if not pair_id:
        raise ValueError("pair: missing")
    if not rater or len(rater) > MAX_RATER or not rater.isprintable():
        raise ValueError(f"rater: give your name (1 to {MAX_RATER} printable characters)")
    problems = [
        f"{q}: {form[q]!r} is not left, right or tie" if q in form else f"{q}: missing"
        for q in QUESTIONS
        if form.get(q) not in CHOICES
    ]
    if problems:
        raise ValueError("; ".join(problems))
    return pair_id, rater, {q: form[q] for q in QUESTIONS}


def create_app(state: Ratings):
    """The FastAPI app of the rating page over one run's pairs."""
    app = FastAPI(title="cogpipe rate", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return render_page(state)

    @app.get("/api/next")
    def next_pair(rater: str = "") -> dict:
        pair, rater = state.next_pair(rater.strip()), rater.strip()
        return {
            "pair": pair.id,
            "prompt": pair.prompt,
            "left": f"pair/{pair.id}/left",
            "right": f"pair/{pair.id}/right",
            "rated": state.done_by(rater),
            "pairs": len(state.pairs),
        }

    @app.post("/api/rate")
    async def rate(request: Request) -> dict:
        try:
            pair_id, rater, choices = parse_judgment(await request.body())
        except ValueError as e:
            raise HTTPException(400, f"bad rating: {e}") from None
        if pair_id not in state.pairs:
            raise HTTPException(404, f"unknown pair {pair_id!r}: reload the page for a new pair")
        await run_in_threadpool(state.record, state.pairs[pair_id], rater, choices)
        return {"saved": True, "rated": state.done_by(rater), "pairs": len(state.pairs)}

    @app.get("/pair/{pair_id}/{side}")
    def video(pair_id: str, side: str) -> FileResponse:
        try:
            return FileResponse(state.video(pair_id, side), media_type="video/mp4")
        except LookupError as e:
            raise HTTPException(404, str(e)) from None

    @app.get("/summary", response_class=HTMLResponse)
    def summary() -> str:
        return render_summary(state, win_rates(read_ratings(state.ws, state.ekey, state.run)))

    return app


def serve(state: Ratings, host: str, port: int, on_url: Callable[[str], None] = print) -> None:
    """Serve the rating page until SIGINT or SIGTERM; `port` 0 picks a free port.

    The socket is bound and listening here, so the URL (with the port picked) is printed
    before serving and a client that connects at once waits instead of being refused.
    """
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen()  # connections wait in the backlog until uvicorn accepts them
    except OSError as e:
        sock.close()
        raise RateError(
            f"cannot listen on {host}:{port} ({e.strerror}); pick another --port (0: any free one)"
        ) from e
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    on_url(f"http://{shown}:{sock.getsockname()[1]}/")
    config = uvicorn.Config(
        create_app(state), log_level="warning", access_log=False, timeout_graceful_shutdown=3
    )
    with quiet_stop():
        uvicorn.Server(config).run(sockets=[sock])


@contextmanager
def quiet_stop():
    """uvicorn raises the signal that stopped it again once it has shut down; with these
    handlers in place, that ends `serve` normally (exit status 0, no traceback)."""
    signals = (signal.SIGINT, signal.SIGTERM)
    originals = {s: signal.signal(s, lambda *_: None) for s in signals}
    try:
        yield
    finally:
        for s, handler in originals.items():
            signal.signal(s, handler)


# --------------------------------------------------------------------------- pages


def render_summary(state: Ratings, table: pd.DataFrame) -> str:
    """`/summary`: the win-rate table of this run (the same as `ratings_markdown`'s)."""
    head = "".join(f"<th>{h}</th>" for h in HEADER)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in table_cells(r)) + "</tr>"
        for r in table.itertuples(index=False)
    )
    body = f"<table><tr>{head}</tr>{rows}</table>" if len(table) else "<p>No ratings yet.</p>"
    note = (
        "Win rate: the checkpoint preferred over the base model at the same prompt and seed, "
        "ties as half. 95% CI: Wilson score interval. W / L / T: wins, losses, ties."
    )
    page = SUMMARY.replace("__STYLE__", STYLE).replace("__RUN__", html.escape(state.run))
    return page.replace("__TABLE__", body).replace("__NOTE__", note)


def render_page(state: Ratings) -> str:
    questions = json.dumps([[q, label] for q, label in QUESTIONS.items()])
    page = PAGE.replace("__STYLE__", STYLE).replace("__RUN__", html.escape(state.run))
    return page.replace("__QUESTIONS__", questions)


STYLE = """
body{font:15px/1.45 system-ui,sans-serif;margin:0;background:#f5f5f4;color:#1c1917}
header{display:flex;gap:1.2rem;align-items:center;padding:.55rem 1.2rem;background:#1c1917;color:#fafaf9}
header h1{font-size:1.05rem;margin:0;font-weight:600;flex:1} header a{color:#fcd34d}
header input{font:inherit;padding:.2rem .4rem;width:11rem}
main{max-width:1360px;margin:0 auto;padding:.8rem 1.2rem}
kbd{font:12px ui-monospace,monospace;border:1px solid #a8a29e;border-bottom-width:2px;border-radius:3px;padding:0 .3rem;background:#fff;color:#1c1917}
table{border-collapse:collapse;background:#fff} td,th{padding:.35rem .7rem;border-bottom:1px solid #e7e5e4;text-align:left}
"""

PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>Rate __RUN__</title><style>__STYLE__
.prompt{font-size:1.05rem;background:#fff;border-left:4px solid #d97706;padding:.5rem .9rem;margin:0 0 .7rem}
.videos{display:grid;grid-template-columns:1fr 1fr;gap:1rem}
figure{margin:0} figcaption{font-weight:600;padding:.2rem 0}
video{width:100%;height:360px;background:#000;object-fit:contain;display:block}
.bottom{display:flex;gap:2rem;margin-top:.8rem;align-items:flex-start}
caption{text-align:left;font-weight:600;padding:.3rem 0} tr.current td{background:#fef3c7} td:first-child{font-weight:600;width:11rem}
button{font:inherit;padding:.25rem .8rem;border:1px solid #a8a29e;border-radius:4px;background:#fff;cursor:pointer}
button.on{background:#d97706;border-color:#b45309;color:#fff}
#submit{padding:.45rem 1.4rem;background:#1c1917;color:#fff;margin-top:.6rem}
.help{font-size:.9rem;color:#57534e;max-width:30rem} .help p{margin:.2rem 0}
#status{min-height:1.4rem;margin-top:.5rem} #status.error{color:#b91c1c;font-weight:600}
</style></head><body>
<header><h1>Blind A/B rating &middot; run __RUN__</h1><span id="progress"></span>
<label>Rater <input id="rater" placeholder="your name" autocomplete="off"></label>
<a href="summary" target="_blank">summary</a></header>
<main>
<p class="prompt" id="prompt">loading&hellip;</p>
<div class="videos">
<figure><figcaption>Left</figcaption><video id="left" muted loop autoplay playsinline></video></figure>
<figure><figcaption>Right</figcaption><video id="right" muted loop autoplay playsinline></video></figure>
</div>
<div class="bottom"><div><table id="questions"></table>
<button id="submit">Submit and next <kbd>Enter</kbd></button><div id="status"></div></div>
<div class="help"><p><b>Keyboard</b> (answers the highlighted question, then moves on):</p>
<p><kbd>A</kbd> or <kbd>1</kbd> left is better &middot; <kbd>S</kbd> or <kbd>2</kbd> tie &middot;
<kbd>D</kbd> or <kbd>3</kbd> right is better</p>
<p><kbd>&uarr;</kbd> <kbd>&darr;</kbd> another question &middot; <kbd>Enter</kbd> submit and
next pair &middot; <kbd>R</kbd> replay both videos</p>
<p>Which side shows the base model changes from pair to pair and is never shown.</p></div></div>
</main>
<script>
const QUESTIONS = __QUESTIONS__;
const KEYS = {a: "left", "1": "left", s: "tie", "2": "tie", d: "right", "3": "right"};
const $ = (id) => document.getElementById(id);
let pair = null, answers = {}, current = 0, busy = false, saved = 0;
const rater = () => $("rater").value.trim();

function status(text, error) { $("status").textContent = text; $("status").className = error ? "error" : ""; }

function render() {
  $("questions").innerHTML = "<caption>Which video is better?</caption>" + QUESTIONS.map(([q, label], i) =>
    `<tr class="${i === current ? "current" : ""}"><td>${label}</td>` +
    ["left", "tie", "right"].map((c, j) =>
      `<td><button class="${answers[q] === c ? "on" : ""}" data-q="${i}" data-c="${c}">` +
      `${{left: "Left", tie: "Tie", right: "Right"}[c]} <kbd>${"ASD"[j]}</kbd></button></td>`).join("") +
    "</tr>").join("");
}

function choose(i, c) {
  answers[QUESTIONS[i][0]] = c;
  const open = QUESTIONS.findIndex(([q]) => !answers[q]);
  current = open < 0 ? i : open;
  render();
}

async function next() {
  const r = await fetch("api/next?rater=" + encodeURIComponent(rater()));
  const p = await r.json();
  pair = p; answers = {}; current = 0; render();
  $("prompt").textContent = p.prompt;
  $("left").src = p.left; $("right").src = p.right;
  $("progress").textContent = `${p.rated} of ${p.pairs} pairs rated` + (rater() ? ` by ${rater()}` : "");
  document.body.dataset.pair = p.pair;
}

async function submit() {
  if (busy || !pair) return;
  if (!rater()) { status("Type your name in the Rater field first.", true); $("rater").focus(); return; }
  const open = QUESTIONS.filter(([q]) => !answers[q]).map(([, label]) => label);
  if (open.length) { status("Answer every question: " + open.join(", ") + ".", true); return; }
  busy = true;
  try {
    const body = new URLSearchParams({pair: pair.pair, rater: rater(), ...answers});
    const r = await fetch("api/rate", {method: "POST", body});
    const out = await r.json();
    if (!r.ok) { status(out.detail || r.statusText, true); return; }
    saved += 1; document.body.dataset.saved = saved;
    status(`Saved. ${out.rated} of ${out.pairs} pairs rated by ${rater()}.`);
    await next();
  } catch (e) { status("Not saved: " + e, true); } finally { busy = false; }
}

document.addEventListener("keydown", (e) => {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  if (e.target.tagName === "INPUT") { if (e.key === "Enter") e.target.blur(); return; }
  const k = e.key.toLowerCase();
  if (KEYS[k]) choose(current, KEYS[k]);
  else if (k === "arrowup" || k === "arrowdown") {
    current = (current + (k === "arrowup" ? QUESTIONS.length - 1 : 1)) % QUESTIONS.length; render();
  }
  else if (k === "enter") submit();
  else if (k === "r") { for (const v of [$("left"), $("right")]) { v.currentTime = 0; v.play(); } }
  else return;
  e.preventDefault();
});
$("questions").addEventListener("click", (e) => {
  const b = e.target.closest("button"); if (b) choose(+b.dataset.q, b.dataset.c);
});
$("submit").addEventListener("click", submit);
$("rater").value = localStorage.getItem("cogpipe-rater") || "";
$("rater").addEventListener("change", () => { localStorage.setItem("cogpipe-rater", rater()); next(); });
document.body.dataset.saved = 0;
next();
</script></body></html>
"""

SUMMARY = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>Ratings of __RUN__</title><style>__STYLE__</style></head><body>
<header><h1>Human A/B ratings against the base model &middot; run __RUN__</h1>
<a href="./">rate more</a></header>
<main>__TABLE__<p>__NOTE__</p></main></body></html>
"""
