"""`cogpipe rate`: blind A/B ratings of checkpoint videos against the base model.

A fake evaluation on disk (base and two checkpoints, tiny mp4s, metrics.parquet; no
model) stands in for `cogpipe evaluate`. The statistics and the 4xx answers are tested
in-process; the acceptance test starts `cogpipe rate` as a real process and rates by
keyboard in two headless Chromium sessions at once. With COGPIPE_SCREENSHOTS=docs/screenshots
the page's screenshot is also written there (the README shows it).
"""

from __future__ import annotations

import queue
import shutil
import signal
import subprocess
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cli_support import cogpipe_command, find_chromium, open_chromium, save_screenshot

from cogpipe.cli import main
from cogpipe.config import load_config
from cogpipe.evaluate import BASE, eval_key
from cogpipe.rate import Ratings, create_app, run_folder
from cogpipe.ratings import (
    COLUMNS,
    QUESTIONS,
    append_rating,
    ratings_dir,
    ratings_markdown,
    ratings_section,
    read_ratings,
    win_rates,
)
from cogpipe.video import write_mp4
from cogpipe.workspace import Workspace, write_table

PROMPTS = ["A fighter winds up and slaps, the head snaps", "A fighter blocks and resets"]
SEEDS = [42, 7]
CHECKPOINTS = ["checkpoint-000010", "checkpoint-000020"]
PAIRS = len(CHECKPOINTS) * len(PROMPTS) * len(SEEDS)  # 8


def moving_square(speed: int, colour: tuple[int, int, int], frames: int = 16) -> np.ndarray:
    """[F, 96, 160, 3] uint8: a square crossing a grey floor, `speed` pixels per frame."""
    video = np.full((frames, 96, 160, 3), 60, np.uint8)
    video[:, 70:] = 110  # the floor
    for f in range(frames):
        x = (10 + speed * f) % 130
        video[f, 40:70, x : x + 30] = colour
    return video


def fake_evaluation(root: Path, checkpoints: list[str] = CHECKPOINTS) -> Path:
    """A config and `evaluate/<ekey>/slap-run/{base,checkpoint-...}/` as evaluate writes it."""
    config = root / "rate.yaml"
    prompts = "".join(f"\n    - {p}" for p in PROMPTS)
    config.write_text(
        f"workspace: workspace\nname: slap-run\nmodel: THUDM/CogVideoX-2b\n"
        f"evaluate:\n  prompts:{prompts}\n  seeds: {SEEDS}\n"
    )
    cfg = load_config(config)
    run = Path(cfg.workspace) / "evaluate" / eval_key(cfg) / "slap-run"
    for i, name in enumerate([BASE, *checkpoints]):
        rows = []
        for p, prompt in enumerate(PROMPTS):
            for seed in SEEDS:
                video = f"p{p:02d}-s{seed}.mp4"
                write_mp4(run / name / video, moving_square(4 + 4 * i, (220, 120 + 60 * i, 40)), 8)
                rows.append(
                    {
                        "checkpoint": name,
                        "prompt_index": p,
                        "prompt": prompt,
                        "seed": seed,
                        "video": video,
                        "clip_score": 20.0 + i,
                    }
                )
        write_table(run / name / "metrics.parquet", pd.DataFrame(rows))
    ws = Workspace(cfg.workspace)  # the report evaluate writes, with its ratings section
    (run / "report.md").write_text(
        f"# Evaluation\n\n{ratings_section(ws, eval_key(cfg), run.name)}\nPrompts:\n"
    )
    if checkpoints:  # a unit still being written: never a pair
        shutil.copytree(run / checkpoints[-1], run / ".tmp-checkpoint-000030-1a2b3c4d")
    return config


def judgments(answers: list[str]) -> pd.DataFrame:
    """Ratings of one checkpoint where every question got the same answer."""
    rows = [
        {
            "rater": f"r{i % 3}",
            "ekey": "e",
            "run": "r",
            "checkpoint": "checkpoint-000010",
            "prompt_index": 0,
            "prompt": "p",
            "seed": i,
            "video": "p00-s0.mp4",
            "base_side": "left",
            **dict.fromkeys(QUESTIONS, a),
            "rated_at": pd.Timestamp.now(tz="UTC"),
        }
        for i, a in enumerate(answers)
    ]
    return pd.DataFrame(rows, columns=COLUMNS)


# --------------------------------------------------------------------------- statistics


def test_win_rate_counts_ties_as_half_with_a_wilson_interval():
    table = win_rates(judgments(["checkpoint"] * 7 + ["base"] * 2 + ["tie"]))
    assert list(table.question) == list(QUESTIONS)
    r = table.iloc[0]
    assert (r.wins, r.losses, r.ties, r.n, r.raters) == (7, 2, 1, 10, 3)
    assert r.win_rate == 0.75
    assert r.ci_low == pytest.approx(0.4422, abs=1e-4)  # Wilson score, p = 7.5 / 10, z = 1.96
    assert r.ci_high == pytest.approx(0.9191, abs=1e-4)

    ties = win_rates(judgments(["tie"] * 10)).iloc[0]
    assert ties.win_rate == 0.5
    assert ties.ci_low < 0.5 < ties.ci_high
    assert ties.ci_low == pytest.approx(1 - ties.ci_high)


def test_ratings_markdown_is_a_table_for_the_report():
    md = ratings_markdown(win_rates(judgments(["checkpoint"] * 7 + ["base"] * 2 + ["tie"])))
    assert "| checkpoint-000010 | Motion accuracy | 0.75 | 0.44–0.92 | 7 / 2 / 1 | 10 | 3 |" in md
    assert "Wilson" in md
    assert "No ratings yet" in ratings_markdown(win_rates(read_ratings(Workspace("nowhere"))))


def test_each_rating_is_its_own_part_and_reading_concatenates_them(tmp_path):
    ws = Workspace(tmp_path)
    row = judgments(["base"]).iloc[0].drop("rated_at").to_dict()
    parts = [append_rating(ws, row | {"seed": s}) for s in (1, 2)]
    (ratings_dir(ws) / ".tmp-part-x.parquet").write_bytes(b"half-written")  # a killed writer
    assert sorted(p.name for p in ratings_dir(ws).iterdir() if p.suffix) == sorted(
        [p.name for p in parts] + [".tmp-part-x.parquet"]
    )
    df = read_ratings(ws)
    assert list(df.columns) == COLUMNS and list(df.seed) == [1, 2]
    assert len(pd.read_parquet(ratings_dir(ws))) == 2  # a Parquet dataset to other readers too
    assert read_ratings(ws, ekey="other").empty
    with pytest.raises(ValueError, match="bad answers"):
        append_rating(ws, row | {"overall": "left"})


# --------------------------------------------------------------------------- service


@pytest.fixture
def client(tmp_path):
    from fastapi.testclient import TestClient

    ws, ekey, folder = run_folder(load_config(fake_evaluation(tmp_path)))
    state = Ratings(ws, ekey, folder, seed=0)
    with TestClient(create_app(state)) as c:
        yield c, state


def form(pair: str, rater: str = "ann", **answers: str) -> dict[str, str]:
    return {"pair": pair, "rater": rater, **(dict.fromkeys(QUESTIONS, "left") | answers)}


def test_a_judgment_is_stored_as_checkpoint_base_or_tie(client):
    c, state = client
    page = c.get("/").text
    assert "checkpoint-0" not in page and ".mp4" not in page
    nxt = c.get("/api/next", params={"rater": "ann"}).json()
    assert (nxt["rated"], nxt["pairs"], nxt["left"]) == (0, PAIRS, f"pair/{nxt['pair']}/left")
    assert c.get(nxt["left"]).headers["content-type"] == "video/mp4"
    r = c.post("/api/rate", data=form(nxt["pair"], overall="right", prompt_adherence="tie"))
    assert r.status_code == 200 and r.json()["rated"] == 1
    row = read_ratings(state.ws).iloc[0]
    left_is = "base" if row.base_side == "left" else "checkpoint"
    right_is = "checkpoint" if left_is == "base" else "base"
    assert (row.rater, row.run, row.motion_accuracy, row.prompt_adherence, row.overall) == (
        "ann",
        "slap-run",
        left_is,
        "tie",
        right_is,
    )
    assert c.get("/api/next", params={"rater": "ann"}).json()["pair"] != nxt["pair"]
    assert c.get("/api/next", params={"rater": "bob"}).json()["pair"] == nxt["pair"]
    summary = c.get("/summary").text
    for r in win_rates(read_ratings(state.ws)).itertuples():
        assert f"<td>{r.win_rate:.2f}</td>" in summary


@pytest.mark.parametrize(
    "change, status, message",
    [
        ({"pair": "nope"}, 404, "unknown pair"),
        ({"rater": "  "}, 400, "rater"),
        ({"overall": "up"}, 400, "overall: 'up' is not left, right or tie"),
        ({"overall": None}, 400, "overall: missing"),
        ({"pair": None}, 400, "pair: missing"),
    ],
)
def test_a_malformed_judgment_is_a_4xx_with_its_reason(client, change, status, message):
    c, state = client
    data = form(next(iter(state.pairs))) | change
    r = c.post("/api/rate", data={k: v for k, v in data.items() if v is not None})
    assert r.status_code == status and message in r.json()["detail"]
    assert read_ratings(state.ws).empty


def test_videos_outside_evaluate_or_of_unknown_pairs_are_404(client, tmp_path):
    c, state = client
    pair = next(iter(state.pairs.values()))
    assert c.get(f"/pair/{pair.id}/middle").status_code == 404
    assert c.get("/pair/nope/left").status_code == 404
    secret = tmp_path / "workspace" / "secret.mp4"
    secret.write_bytes(b"not for raters")
    sneaky = tmp_path / "workspace" / "evaluate" / ".." / "secret.mp4"  # resolves outside
    state.pairs[pair.id] = replace(pair, files={"left": sneaky, "right": sneaky})
    r = c.get(f"/pair/{pair.id}/left")
    assert r.status_code == 404 and "inside evaluate/" in r.json()["detail"]


def test_rate_refuses_without_an_evaluation(tmp_path, capsys):
    config = fake_evaluation(tmp_path, checkpoints=[])
    assert main(["rate", str(config), "--port", "0"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["rate", str(config), "--run", "other"]) == 2
    err = capsys.readouterr().err
    assert "run `cogpipe evaluate CONFIG` first" in err and "slap-run" in err


# --------------------------------------------------------------------------- acceptance


@pytest.fixture
def browsers():
    """A factory of headless Chromium sessions, each with its own profile; all quit after."""
    found = find_chromium()
    opened = []

    def open_one():
        opened.append(open_chromium(found, page_load_timeout=30))
        return opened[-1]

    yield open_one
    for b in opened:
        b.quit()


@pytest.fixture
def rate_server(tmp_path):
    """`cogpipe rate` as a real process on a free port; (url, config). SIGINT stops it."""
    config = fake_evaluation(tmp_path)
    proc = subprocess.Popen(
        cogpipe_command("rate", str(config), "--port", "0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    url, seen = None, []
    while url is None:
        try:
            seen.append(lines.get(timeout=30))
        except queue.Empty:
            proc.kill()
            pytest.fail(f"no URL from cogpipe rate within 30 s: {seen}")
        url = seen[-1].split()[-1] if seen[-1].startswith("rate: http://") else None
    yield url, config, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)


def join(driver, url: str, name: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    field = driver.find_element(By.ID, "rater")
    field.clear()
    field.send_keys(name, Keys.ENTER)  # Enter leaves the field: the keys now rate
    WebDriverWait(driver, 20).until(
        lambda d: f"by {name}" in d.find_element(By.ID, "progress").text
    )


def rate_by_keyboard(driver, keys: str) -> str:
    """Answer the four questions with `keys`, press Enter; wait for the next pair."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    body = lambda d, k: d.execute_script(f"return document.body.dataset.{k}")  # noqa: E731
    pair, saved = body(driver, "pair"), int(body(driver, "saved"))
    ActionChains(driver).send_keys(keys + Keys.ENTER).perform()
    WebDriverWait(driver, 20).until(
        lambda d: int(body(d, "saved")) == saved + 1 and body(d, "pair") != pair
    )
    return pair


def screenshot(driver, path: Path) -> None:
    """The page with a pair loaded and two questions answered, copied to $COGPIPE_SCREENSHOTS."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import WebDriverWait

    ready = "return [...document.querySelectorAll('video')].every(v => v.readyState >= 2)"
    WebDriverWait(driver, 10).until(lambda d: d.execute_script(ready))
    ActionChains(driver).send_keys("as").perform()
    save_screenshot(driver, path)


def test_two_raters_rate_by_keyboard_at_once_and_the_summary_shows_win_rates(
    rate_server, browsers, tmp_path
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, config, proc = rate_server
    ann, bob = browsers(), browsers()
    join(ann, url, "ann")
    join(bob, url, "bob")
    assert "checkpoint-0" not in ann.page_source  # blind: nothing names a model
    screenshot(ann, tmp_path / "rate.png")
    ann.refresh()  # the rater's name is remembered; the half-answered pair is unrated
    WebDriverWait(ann, 20).until(lambda d: "by ann" in d.find_element(By.ID, "progress").text)
    assert ann.find_element(By.ID, "rater").get_attribute("value") == "ann"

    rated = {"ann": [], "bob": []}
    for i in range(6):  # interleaved: ann A A S D (left, left, tie, right), bob 3 3 1 2
        rated["ann"].append(rate_by_keyboard(ann, "aasd"))
        if i < 4:
            rated["bob"].append(rate_by_keyboard(bob, "3312"))
    assert len(set(rated["ann"])) == 6 and len(set(rated["bob"])) == 4  # unrated pairs first

    ws, ekey, _ = run_folder(load_config(config))
    df = read_ratings(ws, ekey, "slap-run")
    assert len(df) == 10 and (df.rater == "ann").sum() == 6 and (df.rater == "bob").sum() == 4
    assert len(list(ratings_dir(ws).glob("part-*.parquet"))) == 10
    left = np.where(df.base_side == "left", "base", "checkpoint")
    right = np.where(df.base_side == "right", "base", "checkpoint")
    ann_rows, bob_rows = df.rater == "ann", df.rater == "bob"
    assert (df.motion_accuracy[ann_rows] == left[ann_rows]).all()
    assert (df.prompt_adherence[ann_rows] == "tie").all()
    assert (df.overall[ann_rows] == right[ann_rows]).all()
    assert (df.motion_accuracy[bob_rows] == right[bob_rows]).all()
    assert (df.prompt_adherence[bob_rows] == left[bob_rows]).all()

    table = win_rates(df)
    assert (
        set(table.checkpoint) <= set(CHECKPOINTS) and table.groupby("question").n.sum().eq(10).all()
    )
    ann.get(url + "summary")
    text = ann.find_element(By.TAG_NAME, "body").text
    for r in table.itertuples():
        assert f"{r.win_rate:.2f}" in text and f"{r.ci_low:.2f}–{r.ci_high:.2f}" in text
    report = (ws.root / "evaluate" / ekey / "slap-run" / "report.md").read_text()
    assert ratings_markdown(table) in report  # the evaluation report shows the win rates
    assert report.startswith("# Evaluation") and report.rstrip().endswith("Prompts:")

    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=15) == 0
