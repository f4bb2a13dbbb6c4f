"""`spear serve` against the official OpenAI Python client (and raw HTTP for the SSE format).

usage: openai_client_test.py SPEAR_BINARY MODEL_DIR
Starts the server on a free port, runs the checks, stops it with SIGTERM and expects a clean exit.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import openai
from openai import OpenAI


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"spear serve exited early with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.2)
    raise RuntimeError("spear serve did not become healthy")


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok:", what)


def main():
    spear, model_dir = sys.argv[1], sys.argv[2]
    port = free_port()
    proc = subprocess.Popen([spear, "serve", "-m", model_dir, "--port", str(port), "--model-name", "ref",
                             "--max-context", "256", "--threads", "2"], stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(port, proc)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)

        check([m.id for m in client.models.list()] == ["ref"], "models.list names the served model")

        c = client.completions.create(model="ref", prompt="Once upon a time", max_tokens=16, temperature=0)
        check(c.object == "text_completion" and len(c.choices) == 1, "completion object")
        check(c.choices[0].finish_reason in ("stop", "length"), "finish_reason")
        check(c.usage.completion_tokens >= 1 and c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens,
              "usage adds up")
        streamed = "".join(ch.choices[0].text for ch in client.completions.create(
            model="ref", prompt="Once upon a time", max_tokens=16, temperature=0, stream=True) if ch.choices)
        check(streamed == c.choices[0].text, "streamed completion equals the whole one (greedy)")

        msgs = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "A short one, please."}]
        chat = client.chat.completions.create(model="ref", messages=msgs, max_tokens=12, temperature=0)
        check(chat.object == "chat.completion" and chat.choices[0].message.role == "assistant", "chat completion")
        parts, usage = [], None
        for ch in client.chat.completions.create(model="ref", messages=msgs, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}):
            if ch.usage:
                usage = ch.usage
            if ch.choices and ch.choices[0].delta.content:
                parts.append(ch.choices[0].delta.content)
        check("".join(parts) == chat.choices[0].message.content, "streamed chat equals the whole one")
        check(usage is not None and usage.completion_tokens == chat.usage.completion_tokens, "stream usage chunk")

        s1 = client.completions.create(model="ref", prompt="The sea", max_tokens=10, temperature=0.9, seed=7)
        s2 = client.completions.create(model="ref", prompt="The sea", max_tokens=10, temperature=0.9, seed=7)
        check(s1.choices[0].text == s2.choices[0].text, "same seed, same sample")

        for kwargs, exc, what in [
            (dict(model="ref", prompt="x", max_tokens=-1), openai.BadRequestError, "negative max_tokens is a 400"),
            (dict(model="nope", prompt="x"), openai.NotFoundError, "unknown model is a 404"),
            (dict(model="ref", prompt="word " * 2000), openai.BadRequestError, "prompt longer than the context is a 400"),
            (dict(model="ref", prompt="x", temperature=5), openai.BadRequestError, "temperature out of range is a 400"),
            (dict(model="ref", prompt="x", logprobs=2), openai.BadRequestError, "unsupported logprobs is a 400"),
        ]:
            try:
                client.completions.create(**kwargs)
                raise AssertionError(what + ": no error")
            except exc as e:
                check(isinstance(e.body, dict) and "message" in e.body, what)

        # Raw SSE: every event is one "data: <json>" line and a blank line, ending with data: [DONE].
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions",
                                     data=json.dumps({"prompt": "Hi", "max_tokens": 5, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req) as r:
            check(r.headers["Content-Type"].startswith("text/event-stream"), "event-stream content type")
            raw = r.read().decode()
        events = raw.split("\n\n")
        check(events[-1] == "" and events[-2] == "data: [DONE]", "stream ends with data: [DONE]")
        for e in events[:-2]:
            check(e.startswith("data: ") and "\n" not in e, "one data line per event")
            json.loads(e[6:])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = -9
        err = proc.stderr.read()
    check(rc == 0, f"clean exit after SIGTERM (rc {rc}; stderr: {err[-400:]})")


if __name__ == "__main__":
    main()
