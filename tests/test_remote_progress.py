"""A long remote transfer shows a progress bar on stderr when asked (or on a terminal), and is silent otherwise."""
from __future__ import annotations

import http.server
import io
import json
import os
import re
import sys
import threading
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import ckptfit
from ckptfit import _remote
from ckptfit.cli import main

DELAY_S = 0.25  # per request: eight batches of range requests make the transfer last about 2 s, past the bar's 1 s


class _SlowServer:
    """http.server on 127.0.0.1 with Range support, each GET answered after DELAY_S (a slow link)."""

    def __init__(self, root: str):
        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _path(self):
                path = os.path.join(root, self.path.lstrip("/"))
                if not os.path.isfile(path):
                    self.send_error(404)
                    return None
                return path

            def _headers(self, status, length, size, extra=()):
                self.send_response(status)
                self.send_header("Content-Length", str(length))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", f'"{size}"')
                for k, v in extra:
                    self.send_header(k, v)
                self.end_headers()

            def do_HEAD(self):
                if (path := self._path()) is not None:
                    size = os.path.getsize(path)
                    self._headers(200, size, size)

            def do_GET(self):
                if (path := self._path()) is None:
                    return
                size = os.path.getsize(path)
                start, end = 0, size
                m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if m:
                    start, end = int(m.group(1)), min(size, int(m.group(2)) + 1 if m.group(2) else size)
                    self._headers(206, end - start, size, [("Content-Range", f"bytes {start}-{end - 1}/{size}")])
                else:
                    self._headers(200, size, size)
                time.sleep(DELAY_S)
                with open(path, "rb") as f:
                    f.seek(start)
                    self.wfile.write(f.read(end - start))
                self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def slow(tmp_path, monkeypatch):
    """A 64 KiB safetensors file behind a slow server, fetched in 8 batches of 2 pieces of 4 KiB."""
    monkeypatch.setenv("CKPTFIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(_remote, "PIECE", 4096)
    monkeypatch.setattr(_remote, "BATCH", 2)
    (tmp_path / "www").mkdir()
    torch.manual_seed(0)
    sd = {"weight": torch.randn(128, 128)}
    save_file(sd, tmp_path / "www" / "big.safetensors")
    server = _SlowServer(str(tmp_path / "www"))
    yield server, sd
    server.close()


class _One(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(128, 128))


def test_a_long_transfer_shows_a_bar_on_stderr_when_asked(slow, monkeypatch, capsys):
    server, sd = slow
    monkeypatch.setenv("CKPTFIT_PROGRESS", "1")  # pytest's stderr is no terminal: the bar is forced on
    model = _One()
    ckptfit.load(model, f"{server.url}/big.safetensors")
    out, err = capsys.readouterr()
    assert torch.equal(model.weight, sd["weight"])
    assert "fetching big.safetensors" in err and re.search(r"\d+(\.\d+)?/\d+(\.\d+)? kB", err), err[-500:]
    assert "fetching" not in out  # stdout stays clean (--json)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_on_a_terminal_the_bar_shows_without_being_asked(slow, monkeypatch):
    server, sd = slow
    monkeypatch.delenv("CKPTFIT_PROGRESS", raising=False)
    monkeypatch.setattr(sys, "stderr", _Terminal())
    model = _One()
    ckptfit.load(model, f"{server.url}/big.safetensors")
    assert torch.equal(model.weight, sd["weight"])
    assert "fetching big.safetensors" in sys.stderr.getvalue()


@pytest.mark.parametrize("setting", [None, "0"])
def test_the_same_transfer_is_silent_unless_asked(slow, monkeypatch, capfd, setting):
    server, sd = slow
    if setting is None:
        monkeypatch.delenv("CKPTFIT_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("CKPTFIT_PROGRESS", setting)
    model = _One()
    ckptfit.load(model, f"{server.url}/big.safetensors")
    out, err = capfd.readouterr()
    assert torch.equal(model.weight, sd["weight"])
    assert out == "" and err == ""


@pytest.mark.parametrize("forced", [False, True])
def test_the_cli_bar_goes_to_stderr_only_when_asked(slow, tmp_path, monkeypatch, forced):
    server, sd = slow
    if forced:
        monkeypatch.setenv("CKPTFIT_PROGRESS", "1")
    else:
        monkeypatch.delenv("CKPTFIT_PROGRESS", raising=False)
    out = tmp_path / "copy.safetensors"
    r = CliRunner().invoke(main, ["convert", f"{server.url}/big.safetensors", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["num_tensors"] == 1  # stdout is the JSON alone, bar or not
    assert ("fetching big.safetensors" in r.stderr) is forced, r.stderr[-500:]
    assert torch.equal(load_file(out)["weight"], sd["weight"])
