"""A scripted OpenAI-compatible chat-completions server for the judge tests and benchmark.

It listens on 127.0.0.1 (a free port) in a background thread and answers ``POST .../chat/completions``
from a table of rules matched against the request's message text: a rule gives the first-token
probabilities to return as ``top_logprobs`` or the reply texts to return in turn, and a queue of
faults served before the normal reply::

    with FakeOpenAIServer(api_key="sk-test", latency_s=0.2) as srv:
        srv.add("ANSWER-1", "COHERENCE RATING", probs={"80": 0.5, "90": 0.3, "foo": 0.2},
                faults=["429:1", "500", "timeout", "malformed"])
        ... srv.base_url ...

A rule may instead give ``numbers`` (``{85: 0.6, 20: 0.4}``): the judge answers with those numbers written digit by
digit, as a tokenizer without multi-digit tokens does. The first token's candidates are then the first digits; a
request whose last message is the assistant's start of a number (``continue_final_message``, as vLLM takes it)
gets the next digit's candidates and ``<|im_end|>`` for the end of the number. ``continuation=False`` makes the
server refuse such requests with a 400, as OpenAI's API does.

Faults: ``"<status>"`` or ``"<status>:<retry-after seconds>"`` (an error reply), ``"timeout"``
(sleep ``timeout_sleep_s`` before replying, past the client's timeout), ``"malformed"`` (a 200 whose
body is cut-off JSON), ``"bad_shape"`` (a 200 with JSON lacking ``choices``), ``"empty_choices"`` (a 200 whose
``choices`` is empty), ``"no_logprobs"`` (a 200 without the logprobs asked for), ``"echo_auth:<status>"``
(an error whose body repeats the request's Authorization header). With ``hang_after = n`` the
server answers n requests, then holds every later one without replying until :meth:`release`
or shutdown, and counts it as dropped: a client killed meanwhile has nothing in flight that the
server answered.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Rule:
    contains: tuple[str, ...]
    probs: dict[str, float] | None = None
    replies: list[str] | None = None
    numbers: dict[int, float] | None = None
    faults: deque = field(default_factory=deque)
    times: list[float] = field(default_factory=list)   # arrival time of every request it matched
    served_replies: int = 0

    @property
    def received(self) -> int:
        return len(self.times)


class FakeOpenAIServer:
    def __init__(self, api_key: str | None = None, latency_s: float = 0.0, timeout_sleep_s: float = 1.5,
                 default_probs: dict[str, float] | None = None, continuation: bool = True):
        self.api_key = api_key
        self.continuation = continuation
        self.latency_s = latency_s
        self.timeout_sleep_s = timeout_sleep_s
        self.default_probs = default_probs
        self.rules: list[Rule] = []
        self.hang_after: int | None = None
        self.received = 0       # every chat-completions request that arrived
        self.answered = 0       # 200 replies with a well-formed completion, fully sent
        self.dropped = 0        # held by hang_after and never answered
        self.statuses: Counter = Counter()   # status (or "timeout") -> count
        self.bodies: list[dict[str, Any]] = []
        self._admitted = 0
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._httpd: _Server | None = None

    # ---- scripting --------------------------------------------------------------------------------
    def add(self, *contains: str, probs: dict[str, float] | None = None, replies: list[str] | None = None,
            numbers: dict[int, float] | None = None, faults: list[str] | None = None) -> Rule:
        """A rule for requests whose message text contains every string in ``contains``; the
        first matching rule wins."""
        if sum(x is not None for x in (probs, replies, numbers)) != 1:
            raise ValueError("give exactly one of probs, replies or numbers")
        rule = Rule(tuple(contains), probs=probs, replies=replies, numbers=numbers, faults=deque(faults or []))
        self.rules.append(rule)
        return rule

    def release(self) -> None:
        self._release.set()

    # ---- lifecycle --------------------------------------------------------------------------------
    def start(self) -> "FakeOpenAIServer":
        handler = type("Handler", (_Handler,), {"fake": self})
        self._httpd = _Server(("127.0.0.1", 0), handler)
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self._release.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- replies ----------------------------------------------------------------------------------
    def _match(self, text: str) -> Rule | None:
        for rule in self.rules:
            if all(s in text for s in rule.contains):
                return rule
        return None

    @staticmethod
    def next_digit_probs(numbers: dict[int, float], prefix: str) -> dict[str, float]:
        """The candidates of the token after ``prefix`` when ``numbers`` are written digit by digit."""
        written = {str(v): p for v, p in numbers.items() if str(v).startswith(prefix)}
        total = sum(written.values())
        out: dict[str, float] = {}
        for text, p in written.items():
            nxt = text[len(prefix)] if len(text) > len(prefix) else "<|im_end|>"
            out[nxt] = out.get(nxt, 0.0) + p / total
        return out

    @staticmethod
    def completion(model: str, prompt: str, probs: dict[str, float] | None, reply: str | None) -> dict[str, Any]:
        logprobs = None
        if probs is not None:
            top = sorted(probs.items(), key=lambda kv: -kv[1])
            reply = top[0][0]
            cands = [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())} for t, p in top]
            logprobs = {"content": [{**cands[0], "top_logprobs": cands}]}
        return {
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                         "logprobs": logprobs, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(reply.split()) or 1,
                      "total_tokens": len(prompt.split()) + (len(reply.split()) or 1)},
        }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # http.server's default listen backlog of 5 resets connections when dozens open at once;
    # real endpoints accept far more.
    request_queue_size = 256


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real endpoints do
    fake: FakeOpenAIServer

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes; without this, Nagle's algorithm meets the client's
        # delayed ACK and adds ~40 ms to every reply on a kept-alive connection.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> bool:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps({"error": {"message": message, "type": "fake"}}).encode(), headers)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        """``GET /models``: a model list (behind the key, when the server has one); ``GET /stats``: the request
        counts, for a client in another process (the judge benchmark)."""
        if self.path.rstrip("/").endswith("/models"):  # what a client lists (emlab's judge preflight asks it)
            fake = self.fake
            if fake.api_key is not None and self.headers.get("Authorization") != f"Bearer {fake.api_key}":
                self._error(401, "invalid api key")
            else:
                self._send(200, json.dumps({"object": "list", "data": [{"id": "fake", "object": "model"}]}).encode())
        elif self.path.rstrip("/").endswith("/stats"):
            fake = self.fake
            with fake._lock:
                stats = {"received": fake.received, "answered": fake.answered, "dropped": fake.dropped}
            self._send(200, json.dumps(stats).encode())
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        fake = self.fake
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        arrived = time.monotonic()
        if not self.path.endswith("/chat/completions"):
            self._error(404, f"no route {self.path}")
            return
        with fake._lock:
            fake.received += 1
            fake.bodies.append(body)
            hang = fake.hang_after is not None and fake._admitted >= fake.hang_after
            if hang:
                fake.dropped += 1
            else:
                fake._admitted += 1
        if hang:
            fake._release.wait(timeout=60)
            self.close_connection = True
            return
        if fake.api_key is not None and self.headers.get("Authorization") != f"Bearer {fake.api_key}":
            self._error(401, "invalid api key")
            return
        messages = body.get("messages", [])
        prefix = None
        if body.get("continue_final_message"):
            if not fake.continuation:
                self._error(400, "Unrecognized request argument supplied: continue_final_message")
                return
            prefix = str(messages[-1].get("content", ""))
            messages = messages[:-1]
        prompt = "\n".join(str(m.get("content", "")) for m in messages)
        rule = fake._match(prompt)
        with fake._lock:
            if rule is not None:
                rule.times.append(arrived)
            fault = rule.faults.popleft() if rule is not None and rule.faults else None
        if fake.latency_s:
            time.sleep(fake.latency_s)
        if fault is not None:
            self._fault(fault)
            return
        if rule is None and fake.default_probs is None:
            with fake._lock:
                fake.statuses[400] += 1
            self._error(400, "no scripted reply for this request")
            return
        if rule is None:
            probs, reply = fake.default_probs, None
        elif rule.probs is not None:
            probs, reply = rule.probs, None
        elif rule.numbers is not None:
            probs, reply = FakeOpenAIServer.next_digit_probs(rule.numbers, prefix or ""), None
        else:
            with fake._lock:
                reply = rule.replies[min(rule.served_replies, len(rule.replies) - 1)]
                rule.served_replies += 1
            probs = None
        out = FakeOpenAIServer.completion(body.get("model", ""), prompt, probs, reply)
        sent = self._send(200, json.dumps(out).encode())
        with fake._lock:
            fake.statuses[200] += 1
            fake.answered += sent

    def _fault(self, fault: str) -> None:
        fake = self.fake
        kind, _, arg = fault.partition(":")
        with fake._lock:
            fake.statuses[kind if not kind.isdigit() else int(kind)] += 1
        if kind == "timeout":
            time.sleep(fake.timeout_sleep_s)
            self._send(200, json.dumps(FakeOpenAIServer.completion("", "", {"0": 1.0}, None)).encode())
        elif kind == "malformed":
            self._send(200, b'{"id": "chatcmpl-fake", "choices": [{"index": 0, "mess')
        elif kind == "bad_shape":
            self._send(200, b'{"id": "chatcmpl-fake", "object": "chat.completion"}')
        elif kind == "empty_choices":
            self._send(200, b'{"id": "chatcmpl-fake", "object": "chat.completion", "choices": []}')
        elif kind == "no_logprobs":
            body = FakeOpenAIServer.completion("", "", {"0": 1.0}, None)
            body["choices"][0]["logprobs"] = None
            self._send(200, json.dumps(body).encode())
        elif kind == "echo_auth":
            self._error(int(arg), f"rejected request with header {self.headers.get('Authorization')}")
        elif kind.isdigit():
            self._error(int(kind), f"scripted {kind}", {"Retry-After": arg} if arg else None)
        else:
            raise ValueError(f"unknown fault {fault!r}")


def main() -> None:
    """Serve in a process of its own (prints the base URL, then serves until killed): a client measured against
    it then shares no interpreter lock with the server, as with a real endpoint."""
    import argparse
    import signal

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--latency", type=float, default=0.0, help="seconds before each reply")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--default-probs", type=json.loads, default={"42": 1.0},
                    help="first-token probabilities of every reply, as JSON")
    args = ap.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with FakeOpenAIServer(api_key=args.api_key, latency_s=args.latency, default_probs=args.default_probs) as srv:
        print(srv.base_url, flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
