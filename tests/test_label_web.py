"""The labelling server over real HTTP on 127.0.0.1: the API's auth and errors, a load test with concurrent
annotators (nothing lost, nothing counted twice), and the page in a real headless Chromium driven by an
annotator's keyboard, including completions that try to inject HTML and script."""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from collections import Counter

import pytest
from sqlalchemy import func, select

from alignkit.label.db import labels as labels_table
from alignkit.label.server import start_in_thread
from alignkit.label.store import Answer, LabelStore
from conftest import chromium_browser, write_jsonl
from test_label import db  # noqa: F401  (the fixture: a fresh SQLite, or PostgreSQL database)

XSS_SCRIPT = "<script>window.pwned = 1</script> and **bold**"
XSS_IMG = 'Look: <img src=x onerror="window.pwned = 2"> done\n```python\nprint("<b>code</b>")\n```'


class Client:
    """A tiny JSON client on one keep-alive connection (what another tool integrating the API would do)."""

    def __init__(self, server, token: str | None = None):
        self.host, self.port = server.server_address[:2]
        self.token = token
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)

    def request(self, method: str, path: str, body=None, *, raw: bytes | None = None, content_type: str = "application/json", token=None):
        headers = {}
        token = token if token is not None else self.token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if data is not None:
            headers["Content-Type"] = content_type
        self.conn.request(method, path, body=data, headers=headers)
        response = self.conn.getresponse()
        payload = response.read()
        if response.getheader("Connection", "").lower() == "close":
            self.conn.close()
        kind = response.getheader("Content-Type", "")
        return response.status, json.loads(payload) if kind.startswith("application/json") else payload.decode()

    def close(self) -> None:
        self.conn.close()


def make_store(tmp_path, rows, *, mode="pairwise", m=3, db=None):
    store = LabelStore.open(db or str(tmp_path / "labels.db"))
    store.import_samples(str(write_jsonl(tmp_path / f"samples-{mode}.jsonl", rows)), mode=mode, max_annotators=m)
    return store


@pytest.fixture
def served(tmp_path):
    """A store with a few pairwise tasks, an annotator, an admin, and the server on an ephemeral port."""
    rows = [{"prompt": f"Question {i}?", "completions": [f"answer {i}a", f"answer {i}b"]} for i in range(4)]
    store = make_store(tmp_path, rows)
    tokens = {"ann": store.add_annotator("ann"), "boss": store.add_annotator("boss", admin=True)}
    server = start_in_thread(store)
    yield store, server, tokens
    server.shutdown()
    store.engine.dispose()


# --- the API: authentication, malformed bodies, conflicts ---------------------------------------------------


def test_api_requires_a_valid_token_and_admin_for_progress(served):
    store, server, tokens = served
    anonymous = Client(server)
    for method, path in [("GET", "/api/me"), ("GET", "/api/next"), ("POST", "/api/answer"), ("GET", "/api/progress"), ("GET", "/api/export")]:
        status, body = anonymous.request(method, path, {} if method == "POST" else None)
        assert status == 401 and "token" in body["error"], (method, path)
        assert anonymous.request(method, path, {} if method == "POST" else None, token="wrong-token")[0] == 401
    ann = Client(server, tokens["ann"])
    assert ann.request("GET", "/api/me") == (200, {"name": "ann", "admin": False, "labelled": 0})
    for path in ("/api/progress", "/api/export"):
        status, body = ann.request("GET", path)
        assert status == 403 and "admin" in body["error"]
    boss = Client(server, tokens["boss"])
    status, progress = boss.request("GET", "/api/progress")
    assert status == 200 and progress["tasks"] == 4 and progress["labels"] == 0
    assert progress["agreement"]["percent_agreement"] is None  # NaN is not JSON: undefined numbers are null
    # Pages: no token → the login page; an annotator may not open the admin page.
    status, page = anonymous.request("GET", "/")
    assert status == 303
    status, page = anonymous.request("GET", "/login")
    assert status == 200 and 'name="token"' in page
    assert ann.request("GET", "/admin")[0] == 403 and boss.request("GET", "/admin")[0] == 200
    assert ann.request("GET", "/api/nothing")[0] == 404 and ann.request("DELETE", "/api/next")[0] == 405
    for c in (anonymous, ann, boss):
        c.close()


def test_api_rejects_malformed_bodies_with_a_message(served):
    store, server, tokens = served
    ann = Client(server, tokens["ann"])
    status, body = ann.request("GET", "/api/next")
    task = body["task"]
    assert status == 200 and len(task["responses"]) == 2 and task["mode"] == "pairwise"
    cases = [
        (dict(raw=b"{not json"), "not valid JSON"),
        (dict(raw=b"[1, 2]"), "JSON object"),
        (dict(raw=b'{"task_id": 1, "choice": "1"}', content_type="text/plain"), "Content-Type: application/json"),
        (dict(body={"choice": "1"}), "'task_id' must be an integer"),
        (dict(body={"task_id": "1", "choice": "1"}), "'task_id' must be an integer"),
        (dict(body={"task_id": task["id"], "choice": "3"}), "'choice' must be"),
        (dict(body={"task_id": task["id"]}), "either 'choice'"),
        (dict(body={"task_id": task["id"], "choice": "1", "ranking": [1, 2]}), "either 'choice'"),
        (dict(body={"task_id": task["id"], "ranking": [1, 1]}), "each of the 2 shown answers once"),
        (dict(body={"task_id": task["id"], "ranking": "12"}), "'ranking' must be a list"),
        (dict(body={"task_id": task["id"], "choice": "1", "reason": 5}), "'reason' must be a string"),
        (dict(body={"task_id": task["id"], "choice": "1", "reason": "x" * 2001}), "longer than 2000"),
        (dict(body={"task_id": task["id"], "choise": "1"}), "unknown field 'choise'"),
    ]
    for kwargs, needle in cases:
        status, body = ann.request("POST", "/api/answer", **kwargs)
        assert status == 400 and needle in body["error"], (kwargs, body)
    status, body = ann.request("POST", "/api/answer", raw=b"x" * 70_000)
    assert status == 413
    ann = Client(server, tokens["ann"])  # the server closed that connection: its body was never read
    assert ann.request("POST", "/api/answer", {"task_id": 999, "choice": "1"})[0] == 404
    status, body = ann.request("POST", "/api/answer", {"task_id": task["id"], "choice": 2, "reason": "clearer"})
    assert status == 201 and body["ok"] and body["task_id"] == task["id"]
    status, body = ann.request("POST", "/api/answer", {"task_id": task["id"], "choice": "1"})
    assert status == 409 and "already answered" in body["error"]
    assert ann.request("GET", "/api/me")[1]["labelled"] == 1
    # Skipping: the next task is another one, and the skipped one is not offered again.
    second = ann.request("GET", "/api/next")[1]["task"]
    assert ann.request("POST", "/api/skip", {"task_id": second["id"]}) == (200, {"ok": True, "task_id": second["id"]})
    assert ann.request("POST", "/api/skip", {"task_id": second["id"]})[0] == 409
    assert ann.request("GET", "/api/next")[1]["task"]["id"] not in (task["id"], second["id"])
    boss = Client(server, tokens["boss"])
    status, exported = boss.request("GET", "/api/export")
    assert status == 200 and exported["rows"][0]["chosen"] == store.labels()[0].responses[store.labels()[0].ranking[0]]
    status, text = boss.request("GET", "/api/export?format=jsonl&aggregate=all")
    assert status == 200 and json.loads(text.splitlines()[0])["reason"] == "clearer"
    assert boss.request("GET", "/api/export?aggregate=some")[0] == 400


# --- load: concurrent annotators -------------------------------------------------------------------------------


def test_concurrent_annotators_lose_nothing_and_count_nothing_twice(tmp_path, db):
    n_tasks, m, n_annotators = 150, 3, 8
    rows = [{"prompt": f"Prompt {i}", "completions": [f"first {i}", f"second {i}"]} for i in range(n_tasks)]
    store = make_store(tmp_path, rows, m=m, db=db)
    tokens = [store.add_annotator(f"annotator-{i}") for i in range(n_annotators)]
    server = start_in_thread(store)
    accepted: Counter = Counter()
    refused: Counter = Counter()
    errors: list[str] = []
    deadline = time.monotonic() + 40
    start = threading.Barrier(n_annotators)

    def annotate(index: int) -> None:
        client = Client(server, tokens[index])
        rng = random.Random(index)
        start.wait()
        try:
            while time.monotonic() < deadline:
                status, body = client.request("GET", "/api/next")
                if status != 200:
                    errors.append(f"next {status} {body}")
                    return
                if body["task"] is None:
                    return
                answer = {"task_id": body["task"]["id"], "choice": rng.choice(["1", "2", "tie", "both_bad"])}
                status, body = client.request("POST", "/api/answer", answer)
                if status == 201:
                    accepted[index] += 1
                else:
                    errors.append(f"answer {status} {body}")
                if rng.random() < 0.1:  # a double click: the second submit must be refused, not counted
                    status, _ = client.request("POST", "/api/answer", answer)
                    refused[status] += 1
        finally:
            client.close()

    threads = [threading.Thread(target=annotate, args=(i,)) for i in range(n_annotators)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    elapsed = time.perf_counter() - began
    server.shutdown()

    assert not errors, errors[:5]
    with store.engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        stored = conn.execute(select(labels_table.c.task_id, labels_table.c.annotator_id)).all()
        per_task = Counter(conn.execute(select(labels_table.c.task_id)).scalars())
        total = conn.execute(select(func.count()).select_from(labels_table)).scalar_one()
    assert total == sum(accepted.values()) == len(stored)  # nothing lost: every 201 is a row, every row a 201
    assert len(set(stored)) == len(stored)  # nobody labelled a task twice
    assert set(refused) <= {409}
    assert max(per_task.values()) <= m
    assert total == n_tasks * m  # everything was labelled, by exactly M annotators each
    rate = total / elapsed
    print(f"\nload test ({store.engine.dialect.name}): {n_annotators} concurrent annotators stored {total} labels in "
          f"{elapsed:.2f} s = {rate:.0f} labels/s (each label = GET /api/next + POST /api/answer)")  # fmt: skip
    store.engine.dispose()


def test_simultaneous_submits_of_one_answer_count_once(served):
    store, server, tokens = served
    ann = Client(server, tokens["ann"])
    task_id = ann.request("GET", "/api/next")[1]["task"]["id"]
    barrier = threading.Barrier(6)
    statuses: list[int] = []

    def submit() -> None:
        client = Client(server, tokens["ann"])
        barrier.wait()
        statuses.append(client.request("POST", "/api/answer", {"task_id": task_id, "choice": "1"})[0])
        client.close()

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(statuses) == [201] + [409] * 5
    assert len(store.labels()) == 1


# --- the page in a real browser -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    with chromium_browser() as launched:
        yield launched


def log_in(page, url: str, token: str) -> None:
    page.goto(url)
    assert page.url.endswith("/login")
    page.fill("#token", token)
    page.press("#token", "Enter")
    page.wait_for_selector("body[data-state=ready], body[data-state=done]")


def wait_for_next(page, previous_task: str) -> None:
    page.wait_for_function(
        "prev => document.body.dataset.state === 'done' || "
        "(document.body.dataset.state === 'ready' && document.body.dataset.taskId !== prev)",
        arg=previous_task,
    )


def test_annotator_labels_with_the_keyboard_in_chromium(tmp_path, browser):
    store = make_store(tmp_path, [
        {"prompt": "Which is better?", "completions": ["Plain answer one", "Plain answer two"]},
        {"prompt": "And here?", "completions": ["Left or right", "Right or left"]},
    ], m=1)  # fmt: skip
    ranking = write_jsonl(tmp_path / "rank.jsonl", [{"prompt": "Rank these", "completions": ["x1", "x2", "x3"]}])
    store.import_samples(str(ranking), mode="ranking", max_annotators=1)
    token = store.add_annotator("ann")
    server = start_in_thread(store)
    page = browser.new_page()
    try:
        # A wrong token is refused on the login page; the right one opens the labelling page.
        page.goto(server.url)
        page.fill("#token", "not-a-token")
        page.press("#token", "Enter")
        assert "not valid" in page.text_content(".error")
        log_in(page, server.url, token)
        assert page.text_content("#who") == "ann"

        # Pairwise, key "2": the answer shown on the right wins.
        first = page.get_attribute("body", "data-task-id")
        shown = [page.text_content(f'.answer[data-position="{i}"] .prose') for i in (1, 2)]
        page.keyboard.press("2")
        wait_for_next(page, first)
        (label,) = store.labels()
        assert label.task_id == int(first) and label.verdict == "ranked"
        assert label.responses[label.ranking[0]] == shown[1] and label.ranking[0] == label.shown_order[1]

        # A reason typed after "r", then Esc, then "t": a tie with its reason.
        second = page.get_attribute("body", "data-task-id")
        page.keyboard.press("r")
        page.keyboard.type("both say the same")  # typing "t" or "b" here must not answer
        page.keyboard.press("Escape")
        page.keyboard.press("t")
        wait_for_next(page, second)
        tie = store.labels()[1]
        assert (tie.task_id, tie.verdict, tie.reason, tie.ranking) == (int(second), "tie", "both say the same", None)

        # Ranking of 3 with the arrows: select answer 3, move it up twice, Enter.
        third = page.get_attribute("body", "data-task-id")
        assert page.is_visible("#ranking-controls") and not page.is_visible("#pairwise-controls")
        page.keyboard.press("3")
        page.keyboard.press("ArrowUp")
        page.keyboard.press("ArrowLeft")
        assert page.text_content("#ranking-text") == "3 > 1 > 2"
        page.keyboard.press("Enter")
        wait_for_next(page, third)
        ranked = store.labels()[2]
        order = ranked.shown_order
        assert ranked.ranking == [order[2], order[0], order[1]]
        assert page.get_attribute("body", "data-state") == "done" and page.is_visible("#done")
        assert page.text_content("#count") == "3 labelled"
    finally:
        page.close()
        server.shutdown()
        store.engine.dispose()


def test_completions_are_shown_as_text_and_never_run(tmp_path, browser):
    store = make_store(tmp_path, [{"prompt": "<b>prompt</b> <script>window.pwned = 3</script>", "completions": [XSS_SCRIPT, XSS_IMG]}], m=1)
    token = store.add_annotator("ann")
    server = start_in_thread(store)
    page = browser.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    try:
        log_in(page, server.url, token)
        page.wait_for_timeout(300)  # give an injected onerror handler the time to fire, if one existed
        assert page.evaluate("window.pwned") is None and not dialogs
        assert page.evaluate("document.querySelectorAll('#answers script, #answers img, #prompt script, #prompt b').length") == 0
        texts = sorted(page.eval_on_selector_all("#answers .answer", "cards => cards.map(c => c.querySelector('.text').textContent)"))
        assert texts == sorted([XSS_SCRIPT, 'Look: <img src=x onerror="window.pwned = 2"> doneprint("<b>code</b>")\n'])
        assert "<script>window.pwned = 3</script>" in page.text_content("#prompt")
        # Code fences are monospace blocks; ordinary text keeps its whitespace.
        code = page.locator("#answers pre.code code")
        assert code.text_content() == 'print("<b>code</b>")\n'
        assert "monospace" in page.evaluate("getComputedStyle(document.querySelector('pre.code')).fontFamily")
        assert page.evaluate("getComputedStyle(document.querySelector('.prose')).whiteSpace") == "pre-wrap"
        page.keyboard.press("1")
        page.wait_for_selector("body[data-state=done]")
        assert len(store.labels()) == 1 and page.evaluate("window.pwned") is None
    finally:
        page.close()
        server.shutdown()
        store.engine.dispose()


def test_admin_page_shows_progress_and_annotators_cannot_open_it(tmp_path, browser):
    store = make_store(tmp_path, [{"prompt": "Q", "completions": ["a", "b"]}], m=2)
    ann, boss = store.add_annotator("ann"), store.add_annotator("boss", admin=True)
    for token in (ann, boss):  # both prefer "a", wherever it was shown to them
        annotator = store.authenticate(token)
        task = store.next_task(annotator)
        a = task.responses.index("a")
        store.submit(annotator, task.id, Answer("ranked", [a, 1 - a]))
    server = start_in_thread(store)
    page = browser.new_page()
    try:
        log_in(page, server.url, ann)
        assert page.is_hidden("#admin-link")
        assert page.goto(server.url + "admin").status == 403
        page.context.clear_cookies()
        log_in(page, server.url, boss)
        assert page.is_visible("#admin-link")
        page.click("#admin-link")
        page.wait_for_selector("#tasks td")
        cells = page.eval_on_selector_all("#tasks td", "tds => tds.map(td => td.textContent)")
        assert cells[:5] == ["1", "1", "0", "0", "2"]  # tasks, complete, started, unlabelled, labels
        assert page.eval_on_selector_all("#agreement td", "tds => tds.map(td => td.textContent)")[2] == "100.0%"
    finally:
        page.close()
        server.shutdown()
        store.engine.dispose()

