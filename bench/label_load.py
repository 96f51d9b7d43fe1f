"""Load on the labelling server: N annotators answering at once, and optionally kill -9 mid-burst.

    python bench/label_load.py                      # 20 annotators x 100 answers against `alignkit label serve`
    python bench/label_load.py --kills 3            # the server is killed (SIGKILL) 3 times and restarted
    python bench/label_load.py --annotators 8 --answers 50

The server runs as its own process (`python -m alignkit label serve --quiet`), as in use, so the client
threads here do not share its interpreter. Each annotator is a thread on one keep-alive connection doing
GET /api/next then POST /api/answer, `--answers` times. Reported: labels per second (acknowledged answers
over the wall time of the burst), the latency of each label (both requests) and of each request at the
median and the 99th percentile, and the check that every answer acknowledged with 201 is in the database
(a connection refused or cut while the server is down is retried after the restart; an answer cut before
its 201 may or may not be stored, and either is correct, but an acknowledged one must be there).
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from sqlalchemy import select

from alignkit.label.db import labels as labels_table
from alignkit.label.store import LabelStore


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`alignkit label serve` in a child process, restartable after a kill."""

    def __init__(self, db: str, port: int) -> None:
        self.db, self.port = db, port
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "alignkit", "label", "serve", "--db", self.db, "--port", str(self.port), "--quiet"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the server did not start")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            self.process.wait(timeout=20)


def annotate(port: int, token: str, answers: int, acknowledged: list[int], label_times: list[float], request_times: list[float], errors: list[str]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def request(method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        nonlocal conn
        for _ in range(600):  # while the server is down: retry for up to a minute
            began = time.perf_counter()
            try:
                conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
                response = conn.getresponse()
                payload = json.loads(response.read())
                request_times.append(time.perf_counter() - began)
                return response.status, payload
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                time.sleep(0.1)
        raise RuntimeError(f"{method} {path}: no answer for a minute")

    done = 0
    while done < answers:
        began = time.perf_counter()
        status, body = request("GET", "/api/next")
        if status != 200 or body["task"] is None:
            errors.append(f"next: {status} {body}")
            return
        status, body = request("POST", "/api/answer", {"task_id": body["task"]["id"], "choice": "1"})
        if status == 201:
            acknowledged.append(body["label_id"])
            label_times.append(time.perf_counter() - began)
            done += 1
        elif status != 409:  # 409: an answer cut by a kill was stored, and its retry is refused
            errors.append(f"answer: {status} {body}")
            return
    conn.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotators", type=int, default=20)
    parser.add_argument("--answers", type=int, default=100, help="answers per annotator")
    parser.add_argument("--kills", type=int, default=0, help="kill -9 the server this many times during the burst")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="label-load-") as folder:
        burst(args, str(Path(folder) / "labels.db"), Path(folder) / "samples.jsonl")


def burst(args: argparse.Namespace, db: str, samples: Path) -> None:
    store = LabelStore.open(db)
    n_tasks = args.annotators * args.answers  # M = 3: room for everyone, and tasks shared by annotators
    samples.write_text("".join(json.dumps({"prompt": f"Prompt {i}", "completions": [f"one {i}", f"two {i}"]}) + "\n" for i in range(n_tasks)))
    store.import_samples(str(samples), mode="pairwise", max_annotators=3)
    tokens = [store.add_annotator(f"annotator-{i}") for i in range(args.annotators)]
    store.engine.dispose()

    server = Server(db, free_port())
    server.start()
    acknowledged: list[int] = []
    label_times: list[float] = []
    request_times: list[float] = []
    errors: list[str] = []
    threads = [
        threading.Thread(target=annotate, args=(server.port, t, args.answers, acknowledged, label_times, request_times, errors)) for t in tokens
    ]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    expected = args.annotators * args.answers
    for k in range(args.kills):
        # Spread the kills over the burst: wait until the next share of the answers is acknowledged.
        while len(acknowledged) < expected * (k + 1) / (args.kills + 1) and any(t.is_alive() for t in threads):
            time.sleep(0.01)
        server.kill()
        server.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    server.stop()

    store = LabelStore.open(db)
    with store.engine.connect() as conn:
        ids = set(conn.execute(select(labels_table.c.id)).scalars())
    store.engine.dispose()
    lost = [i for i in acknowledged if i not in ids]
    print(
        f"{args.annotators} annotators x {args.answers} answers, {args.kills} kill -9s: "
        f"{len(acknowledged)} labels acknowledged in {elapsed:.2f} s = {len(acknowledged) / elapsed:.0f} labels/s\n"
        f"  per label (GET /api/next + POST /api/answer): median {1000 * percentile(label_times, 0.5):.1f} ms, "
        f"p99 {1000 * percentile(label_times, 0.99):.1f} ms\n"
        f"  per request: median {1000 * percentile(request_times, 0.5):.1f} ms, p99 {1000 * percentile(request_times, 0.99):.1f} ms\n"
        f"  stored labels {len(ids)}, acknowledged but missing {len(lost)}, errors {len(errors)}"
    )
    if lost or errors:
        print("\n".join(errors[:5]), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
