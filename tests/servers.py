"""Servers the tests start on loopback: llama-cpp-python's OpenAI-compatible server with a packaged model."""

import contextlib
import socket
import subprocess
import sys
import time

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llama_server(model: str, alias: str, log_dir, *extra: str):
    """Starts ``python -m llama_cpp.server`` with a packaged model (``gemma3-270m``, ``smollm2-135m``); returns the
    process and its /v1 URL once it answers. Its log goes to a file (a pipe fills up and blocks the server)."""
    from spacy_llmner.backends.llamacpp import resolve_model_path

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        resolve_model_path(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model_alias",
        alias,
        *extra,
    ]
    log_path = log_dir / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("llama_cpp.server exited: " + log_path.read_text(errors="ignore")[-2000:])
        try:
            if requests.get(f"{url}/models", timeout=1).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("llama_cpp.server did not start in 120 s")


def stop(proc) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def llama_server(model: str, alias: str, log_dir, *extra: str):
    """``start_llama_server`` as a context: yields the /v1 URL and stops the server afterwards."""
    proc, url = start_llama_server(model, alias, log_dir, *extra)
    try:
        yield url
    finally:
        stop(proc)


def serve(handler_class):
    """A threaded HTTP server of the test's own on a free loopback port: (server, its /v1 URL)."""
    import threading
    from http.server import ThreadingHTTPServer

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
