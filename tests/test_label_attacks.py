"""The labelling server under the attacks of issue 17 (findings 1-6), each made for real against the server
on 127.0.0.1 with raw sockets, http.client or Chromium, in bounded loops: idle and slow connections, request
smuggling, cross-site login and writes, removed annotators, inputs that used to give a 500 traceback,
terminal escapes and tokens in the log, HEAD, the database file's mode and the Secure cookie."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import socket
import stat
import threading
import time

import pytest
from sqlalchemy import select

from alignkit.cli import main as cli_main
from alignkit.errors import AlignkitError, DataError
from alignkit.label.db import assignments as assignments_table
from alignkit.label.server import start_in_thread
from alignkit.label.store import Answer, LabelStore
from conftest import chromium_browser
from test_label_web import Client, make_store

ROWS = [{"prompt": f"Question {i}?", "completions": [f"answer {i}a", f"answer {i}b"]} for i in range(6)]


@pytest.fixture
def store(tmp_path):
    store = make_store(tmp_path, ROWS, m=2)
    yield store
    store.engine.dispose()


@pytest.fixture
def tokens(store):
    return {"ann": store.add_annotator("ann"), "boss": store.add_annotator("boss", admin=True)}


@pytest.fixture
def server(store):
    server = start_in_thread(store)
    yield server
    server.shutdown()


def exchange(server, data: bytes, *, seconds: float = 3.0) -> bytes:
    """Send raw bytes on a fresh connection; everything the server answers until it closes (or `seconds`)."""
    with socket.create_connection(server.server_address, timeout=seconds) as sock:
        sock.sendall(data)
        received = b""
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline and (chunk := sock.recv(65536)):
                received += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return received


def closed_by_server(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(max(seconds, 0.01))
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


# --- 1. denial of service by idle and slow connections ---------------------------------------------------------


def test_idle_connections_do_not_lock_annotators_out(store, tokens):
    # Before: 1,100 idle sockets took a thread each and every fd; a normal request timed out.
    server = start_in_thread(store, max_connections=100, request_seconds=2.0)
    threads_before = threading.active_count()
    attackers: list[socket.socket] = []
    try:
        for i in range(200):
            sock = socket.create_connection(server.server_address, timeout=5)
            if i % 2:  # half send the start of a request head and stop there (slowloris)
                sock.sendall(b"GET /api/me HTTP/1.1\r\nHost: x\r\n")
            attackers.append(sock)
        assert threading.active_count() - threads_before < 10  # no thread per connection

        began = time.monotonic()
        client = Client(server, tokens["ann"])
        status, body = client.request("GET", "/api/me")
        assert status == 200 and body["name"] == "ann" and time.monotonic() - began < 3
        client.close()

        cpu = time.process_time()
        time.sleep(0.5)
        assert time.process_time() - cpu < 0.25  # nothing spins while the attackers sit idle

        # Past `max_connections` the longest idle were closed at once; the rest within `request_seconds`.
        deadline = time.monotonic() + 4
        assert all(closed_by_server(sock, deadline - time.monotonic()) for sock in attackers)
    finally:
        for sock in attackers:
            sock.close()
        server.shutdown()


def test_a_request_sent_a_byte_at_a_time_is_cut_off(store, tokens):
    server = start_in_thread(store, request_seconds=1.0)
    try:
        with socket.create_connection(server.server_address, timeout=5) as sock:
            began = time.monotonic()
            closed = False
            for byte in b"GET /api/me HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 100:  # 10 s at 10 bytes/s
                try:
                    sock.sendall(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                if closed_by_server(sock, 0.1):
                    closed = True
                    break
            assert closed and time.monotonic() - began < 2.5
        assert Client(server, tokens["ann"]).request("GET", "/api/me")[0] == 200
    finally:
        server.shutdown()


# --- 2. request smuggling ---------------------------------------------------------------------------------------


def smuggled(tokens) -> bytes:
    return f"GET /api/me HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tokens['boss']}\r\n\r\n".encode()


def skip_head(tokens, *framing: str) -> bytes:
    lines = ["POST /api/skip HTTP/1.1", "Host: x", f"Authorization: Bearer {tokens['ann']}", "Content-Type: application/json", *framing]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_a_request_hidden_in_a_body_is_never_run(server, tokens):
    # Before: the server read only Content-Length, so a chunked body (or one past a conflicting length)
    # was run as a second request: here an admin's GET /api/me, whose answer came back.
    inner = smuggled(tokens)
    chunked = f"{len(inner):x}\r\n".encode() + inner + b"\r\n0\r\n\r\n"
    attacks = {
        "chunked": skip_head(tokens, "Transfer-Encoding: chunked") + chunked,
        "chunked and a length": skip_head(tokens, "Transfer-Encoding: chunked", f"Content-Length: {len(chunked)}") + chunked,
        "a length of 0 and chunked": skip_head(tokens, "Content-Length: 0", "Transfer-Encoding: chunked") + chunked,
        "two lengths": skip_head(tokens, "Content-Length: 0", f"Content-Length: {len(inner)}") + inner,
    }
    for name, attack in attacks.items():
        answer = exchange(server, attack, seconds=2)
        assert answer.count(b"HTTP/1.1 ") == 1, (name, answer)  # one request, one answer
        assert answer.startswith(b"HTTP/1.1 400 ") and b"boss" not in answer, (name, answer)
    # Framing that is ambiguous closes the connection: nothing after it on the socket is read as a request.
    answer = exchange(server, attacks["chunked and a length"] + smuggled(tokens), seconds=2)
    assert answer.count(b"HTTP/1.1 ") == 1 and b"connection: close" in answer.lower()
    assert b"HTTP/1.1 413 " in exchange(server, skip_head(tokens, f"Content-Length: {10**9}"), seconds=2)
    assert b"HTTP/1.1 400 " in exchange(server, skip_head(tokens, "Content-Length: 1" + "0" * 5000), seconds=2)


# --- 3. cross-site requests (login CSRF) --------------------------------------------------------------------------


def post(server, path: str, body: bytes, headers: dict[str, str]) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection(*server.server_address, timeout=10)
    conn.request("POST", path, body=body, headers=headers)
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def test_cross_site_posts_are_refused(store, server, tokens):
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    login = f"token={tokens['ann']}".encode()
    for foreign in ({"Origin": "https://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}):
        response = post(server, "/login", login, {**form, **foreign})
        assert response.status == 403 and response.getheader("Set-Cookie") is None, foreign
        assert post(server, "/logout", b"", foreign).status == 403

    # The logged-in annotator's cookie, sent by another site's page: nothing is written, nothing is read.
    cookie = {"Cookie": f"alignkit_token={tokens['ann']}", "Origin": "https://evil.example"}
    task = store.next_task(store.authenticate(tokens["ann"]))
    answer = json.dumps({"task_id": task.id, "choice": "1"}).encode()
    assert post(server, "/api/answer", answer, {**cookie, "Content-Type": "application/json"}).status == 403
    assert post(server, "/api/skip", json.dumps({"task_id": task.id}).encode(), {**cookie, "Content-Type": "application/json"}).status == 403
    assert store.labels() == []
    boss = {"Cookie": f"alignkit_token={tokens['boss']}", "Origin": "https://evil.example"}
    for path in ("/api/export", "/api/progress", "/api/next"):
        conn = http.client.HTTPConnection(*server.server_address, timeout=10)
        conn.request("GET", path, headers=boss)
        assert conn.getresponse().status == 403, path
        conn.close()

    # The server's own page (same origin), and clients that are not browsers, are served.
    own = {"Origin": server.url.rstrip("/"), "Sec-Fetch-Site": "same-origin"}
    response = post(server, "/login", login, {**form, **own})
    assert response.status == 303 and "alignkit_token=" in response.getheader("Set-Cookie")
    assert post(server, "/api/answer", answer, {"Authorization": f"Bearer {tokens['ann']}", "Content-Type": "application/json"}).status == 201


def test_another_site_cannot_log_a_browser_in(store, server, tokens):
    # The attack as a browser meets it: a page on another origin (localhost is not 127.0.0.1) submits a
    # login form with the attacker's token as soon as it loads.
    attacker_page = f"""<form id="f" method="post" action="{server.url}login"><input name="token" value="{tokens['boss']}"></form>
    <script>document.getElementById('f').submit()</script>""".encode()

    class Attacker(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(attacker_page)))
            self.end_headers()
            self.wfile.write(attacker_page)

        def log_message(self, *args):
            pass

    site = http.server.HTTPServer(("127.0.0.1", 0), Attacker)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    try:
        with chromium_browser() as browser:
            page = browser.new_page()
            with page.expect_response(f"{server.url}login") as refused:
                page.goto(f"http://localhost:{site.server_address[1]}/")
            assert refused.value.status == 403
            assert page.context.cookies(server.url) == []
            # The server's own forms still pass the check: log in, then out with the page's button.
            page.goto(server.url + "login")
            page.fill("#token", tokens["ann"])
            page.press("#token", "Enter")
            page.wait_for_selector("body[data-state=ready]")
            assert [c["name"] for c in page.context.cookies(server.url)] == ["alignkit_token"]
            page.click('form[action="/logout"] button')
            page.wait_for_url("**/login")
            assert page.context.cookies(server.url) == []
            page.close()
    finally:
        site.shutdown()
        site.server_close()


# --- 4. removing an annotator, and --no-admin ------------------------------------------------------------------


def test_removed_annotators_lose_access_and_their_labels_stop_counting(tmp_path, store, server, tokens, capsys):
    db = str(store.engine.url.database)
    # Before: `--new-token --no-admin` left the admin flag on.
    assert cli_main(["label", "add-annotator", "boss", "--db", db, "--new-token"]) == 0
    kept = capsys.readouterr()
    assert "token for admin 'boss'" in kept.err and store.authenticate(kept.out.strip()).is_admin
    assert cli_main(["label", "add-annotator", "boss", "--db", db, "--new-token", "--no-admin"]) == 0
    demoted = capsys.readouterr().out.strip()
    assert not store.authenticate(demoted).is_admin
    assert Client(server, demoted).request("GET", "/api/progress")[0] == 403
    lead = store.add_annotator("lead", admin=True)

    # Two annotators label the same task (M = 2); then one is removed.
    eve = store.add_annotator("eve")
    for token in (tokens["ann"], eve):
        client = Client(server, token)
        task = client.request("GET", "/api/next")[1]["task"]
        assert client.request("POST", "/api/answer", {"task_id": task["id"], "choice": "1"})[0] == 201
    eve_pending = Client(server, eve).request("GET", "/api/next")[1]["task"]["id"]
    assert cli_main(["label", "remove-annotator", "eve", "--db", db]) == 0
    assert "removed 'eve'" in capsys.readouterr().err

    assert Client(server, eve).request("GET", "/api/me")[0] == 401  # the token no longer works
    names = {label.annotator for label in store.labels()}
    assert names == {"ann"} and {label.annotator for label in store.labels(include_removed=True)} == {"ann", "eve"}
    overview = store.tasks_overview()
    assert overview["labels"] == 1 and overview["annotators_removed"] == 1 and "eve" not in {a["name"] for a in overview["annotators"]}
    boss = Client(server, lead)
    assert boss.request("GET", "/api/progress")[1]["labels"] == 1
    assert [r["annotator"] for r in boss.request("GET", "/api/export?aggregate=all")[1]["rows"]] == ["ann"]

    out = tmp_path / "prefs.jsonl"
    assert cli_main(["label", "export", "--db", db, "--out", str(out), "--aggregate", "all"]) == 0
    assert [json.loads(line)["annotator"] for line in out.read_text().splitlines()] == ["ann"]
    assert cli_main(["label", "export", "--db", db, "--out", str(out), "--aggregate", "all", "--include-removed"]) == 0
    assert sorted(json.loads(line)["annotator"] for line in out.read_text().splitlines()) == ["ann", "eve"]
    capsys.readouterr()

    # Eve's label no longer fills its task (M = 2), and her pending task is free: both go to someone else.
    cat = store.authenticate(store.add_annotator("cat"))
    labelled_by_eve = next(label.task_id for label in store.labels(include_removed=True) if label.annotator == "eve")
    assert store.next_task(cat).id == labelled_by_eve
    store.submit(cat, labelled_by_eve, Answer("tie"))
    assert store.next_task(cat).id == eve_pending
    with pytest.raises(AlignkitError, match="already removed"):
        store.remove_annotator("eve")
    with pytest.raises(AlignkitError, match="was removed"):
        store.add_annotator("eve", new_token=True)


# --- 5. inputs that gave a 500 with a traceback -------------------------------------------------------------------


def test_huge_numbers_and_deep_nesting_are_400_not_500(server, tokens, capsys):
    ann = Client(server, tokens["ann"])
    task_id = ann.request("GET", "/api/next")[1]["task"]["id"]
    cases = {
        "task_id 2^63": json.dumps({"task_id": 2**63, "choice": "1"}).encode(),
        "task_id -1": json.dumps({"task_id": -1, "choice": "1"}).encode(),
        "5,000 digits": b'{"task_id": ' + b"9" * 5000 + b', "choice": "1"}',
        "nested 1,000 deep": b'{"task_id": 1, "reason": ' + b"[" * 1000 + b"]" * 1000 + b"}",
        "nested 30,000 deep": b"[" * 30000 + b"]" * 30000,
    }
    for name, raw in cases.items():
        for path in ("/api/answer", "/api/skip"):
            status, body = ann.request("POST", path, raw=raw)
            assert status == 400 and isinstance(body, dict) and body["error"], (name, path, status, body)
    status, body = ann.request("POST", "/api/answer", raw=b"[" * 70_000)
    assert status == 413 and "at most 65536 bytes" in body["error"]
    ann = Client(server, tokens["ann"])  # that connection was closed: its body was never read
    assert ann.request("POST", "/api/answer", {"task_id": task_id, "choice": "1"})[0] == 201
    assert "Traceback" not in capsys.readouterr().err


def test_import_of_unreadable_rows_names_file_and_line(tmp_path, store):
    deep = {"prompt": "p", "completions": ["a", "b"]}
    path = tmp_path / "deep.jsonl"
    good = json.dumps({"prompt": "fine", "completions": ["x", "y"]})
    path.write_text(good + "\n" + json.dumps(deep)[:-1] + ', "x": ' + "[" * 5000 + "]" * 5000 + "}\n" + '{"n": ' + "9" * 5000 + "}\n")
    with pytest.raises(DataError, match=r"deep.jsonl:2: .*nested too deeply"):
        store.import_samples(str(path), mode="pairwise", max_annotators=1)
    report = store.import_samples(str(path), mode="pairwise", max_annotators=1, skip_invalid=True)
    assert report.tasks_added == 1 and sum(report.skipped.values()) == 2


# --- 6. the log, HEAD, the database file, the cookie ---------------------------------------------------------------


def test_the_log_escapes_control_characters_and_hides_tokens(store, tokens, capsys):
    server = start_in_thread(store, log=True)
    try:
        exchange(server, b"GET /api/me%1b%5b2J%0a?token=SECRET-TOKEN&x=%1b%5b31m HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        exchange(server, b"GET /\x1b[2J\x1b]0;pwned\x07 HTTP/1.1\r\nHost: x\r\n\r\n")  # refused by the parser
        # A trusted proxy's X-Forwarded-For becomes the logged client: bytes 0x9b (CSI) and 0x85 (NEL) included.
        exchange(server, b"GET /api/me HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: \x9b2J\x85evil\r\nConnection: close\r\n\r\n")
    finally:
        server.shutdown()
    log = capsys.readouterr().err
    assert "/api/me%1b%5b2J%0a?token=***" in log and "SECRET-TOKEN" not in log
    assert not any(c in log for c in "\x1b\x07\x9b\x85") and "\\x9b2J\\x85evil" in log
    assert all(line.isprintable() for line in log.splitlines())


def test_head_changes_nothing(store, server, tokens):
    conn = http.client.HTTPConnection(*server.server_address, timeout=10)
    for _ in range(3):
        conn.request("HEAD", "/api/next", headers={"Authorization": f"Bearer {tokens['ann']}"})
        response = conn.getresponse()
        assert response.status == 405 and response.getheader("Allow") == "GET" and response.read() == b""
    conn.request("HEAD", "/login")
    response = conn.getresponse()
    assert response.status == 200 and response.read() == b"" and int(response.getheader("Content-Length")) > 0
    conn.close()
    with store.engine.connect() as db:
        assert db.execute(select(assignments_table)).all() == []  # before: each HEAD handed out a task
    assert Client(server, tokens["ann"]).request("GET", "/api/next")[1]["task"] is not None


def test_the_database_is_created_readable_by_its_owner_only(tmp_path):
    path = tmp_path / "new" / "labels.db"
    store = LabelStore.open(str(path))
    store.add_annotator("ann")
    for file in (path, path.with_name("labels.db-wal"), path.with_name("labels.db-shm")):
        assert stat.S_IMODE(os.stat(file).st_mode) == 0o600, file
    store.engine.dispose()


def test_the_cookie_is_secure_behind_https(store, tokens):
    login = f"token={tokens['ann']}".encode()
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    plain = start_in_thread(store)
    proxied = start_in_thread(store, https_proxy=True)
    try:
        assert "Secure" not in post(plain, "/login", login, form).getheader("Set-Cookie")
        # A proxy on 127.0.0.1 (trusted by default) says the browser spoke HTTPS.
        assert "; Secure" in post(plain, "/login", login, {**form, "X-Forwarded-Proto": "https"}).getheader("Set-Cookie")
        assert "; Secure" in post(proxied, "/login", login, form).getheader("Set-Cookie")
        assert "; Secure" in post(proxied, "/logout", b"", {}).getheader("Set-Cookie")
    finally:
        plain.shutdown()
        proxied.shutdown()
