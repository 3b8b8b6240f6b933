import hashlib
import http.server
import socket
import threading

import pytest

from rlgaf_fast.bench import seqgan_data
from rlgaf_fast.bench.oracle import PARAM_SHAPES, load_oracle_params
from rlgaf_fast.bench.seqgan_data import _fetch, seqgan_oracle_path
from tests.bench.conftest import find_seqgan_oracle

FAKE = bytes(range(256)) * 40  # 10,240 bytes standing in for the oracle file
FAKE_SHA256 = hashlib.sha256(FAKE).hexdigest()


@pytest.fixture
def server():
    """A local HTTP server: set ``files[path] = bytes``; ``hits`` lists the paths requested."""
    files: dict[str, bytes] = {}
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            if self.path not in files:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(files[self.path])))
            self.end_headers()
            self.wfile.write(files[self.path])

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", files, hits
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def no_local_copy(monkeypatch, tmp_path):
    """ "seqgan" resolves to an empty cache under tmp_path."""
    monkeypatch.delenv("RLGAF_SEQGAN_ORACLE", raising=False)
    monkeypatch.setenv("RLGAF_FAST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "seqgan" / "target_params_py3.pkl"


def leftovers(dest):
    return sorted(p.name for p in dest.parent.glob("*")) if dest.parent.exists() else []


def test_download_is_verified_cached_and_not_repeated(server, tmp_path, capsys):
    base, files, hits = server
    files["/oracle.pkl"] = FAKE
    dest = tmp_path / "cache" / "oracle.pkl"
    assert _fetch(f"{base}/oracle.pkl", dest, size=len(FAKE), sha256=FAKE_SHA256) == dest
    assert dest.read_bytes() == FAKE
    assert f"downloading {base}/oracle.pkl" in capsys.readouterr().err
    assert _fetch(f"{base}/oracle.pkl", dest, size=len(FAKE), sha256=FAKE_SHA256) == dest
    assert hits == ["/oracle.pkl"]  # the second call found the cached file
    assert leftovers(dest) == ["oracle.pkl"]  # no .partial left behind


def test_a_damaged_cached_file_is_downloaded_again(server, tmp_path):
    base, files, hits = server
    files["/oracle.pkl"] = FAKE
    dest = tmp_path / "oracle.pkl"
    dest.write_bytes(FAKE[:-1] + b"\x00")
    _fetch(f"{base}/oracle.pkl", dest, size=len(FAKE), sha256=FAKE_SHA256)
    assert dest.read_bytes() == FAKE and hits == ["/oracle.pkl"]


@pytest.mark.parametrize(
    "served, match",
    [
        (FAKE[:100] + b"\xff" + FAKE[101:], f"expected SHA-256 {FAKE_SHA256}, got "),
        (FAKE[:-1], f"expected {len(FAKE)} bytes, got {len(FAKE) - 1}"),
        (FAKE + b"\x00", f"expected {len(FAKE)} bytes, got more"),
    ],
    ids=["tampered", "short", "long"],
)
def test_a_file_other_than_the_expected_one_is_refused_and_not_kept(
    server, tmp_path, served, match
):
    base, files, _ = server
    files["/oracle.pkl"] = served
    dest = tmp_path / "cache" / "oracle.pkl"
    with pytest.raises(ValueError, match=match):
        _fetch(f"{base}/oracle.pkl", dest, size=len(FAKE), sha256=FAKE_SHA256)
    assert leftovers(dest) == []


def test_a_missing_url_is_a_clear_error(server, tmp_path):
    base, _, _ = server
    dest = tmp_path / "oracle.pkl"
    with pytest.raises(FileNotFoundError) as raised:
        _fetch(f"{base}/nothing.pkl", dest, size=len(FAKE), sha256=FAKE_SHA256)
    message = str(raised.value)
    assert f"could not download {base}/nothing.pkl: HTTP 404" in message
    assert "--oracle PATH" in message and "RLGAF_SEQGAN_ORACLE" in message
    assert leftovers(dest) == []


def test_offline_is_one_line_through_the_cli(no_local_copy, monkeypatch, tmp_path, capsys):
    from rlgaf_fast.cli import main

    with socket.socket() as s:  # a port on which nothing listens once it is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/target_params_py3.pkl"
    monkeypatch.setenv("RLGAF_SEQGAN_ORACLE_URL", url)
    command = ["oracle", "--oracle", "seqgan", "--mode", "sft", "--out", str(tmp_path / "run")]
    assert main(command) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith(f"rlgaf-fast oracle: error: could not download {url}: ")
    assert error.endswith("pass its path (--oracle PATH) or set RLGAF_SEQGAN_ORACLE")
    assert not no_local_copy.parent.exists() and not (tmp_path / "run").exists()


def test_a_path_passes_through_and_a_missing_one_is_an_error(tmp_path):
    path = tmp_path / "mine.pkl"
    path.write_bytes(FAKE)  # a path is the user's choice: not checked against SeqGAN's hash
    assert seqgan_oracle_path(str(path)) == path
    assert seqgan_oracle_path(path) == path
    with pytest.raises(FileNotFoundError, match=r"oracle parameters .*missing.pkl do not exist"):
        seqgan_oracle_path(tmp_path / "missing.pkl")


def test_rlgaf_seqgan_oracle_is_read_never_downloaded_and_checked(monkeypatch, tmp_path):
    monkeypatch.setenv("RLGAF_SEQGAN_ORACLE_URL", "http://127.0.0.1:9/unused")
    monkeypatch.setenv("RLGAF_SEQGAN_ORACLE", str(tmp_path / "missing.pkl"))
    with pytest.raises(FileNotFoundError, match="not at .*missing.pkl .RLGAF_SEQGAN_ORACLE"):
        seqgan_oracle_path("seqgan")
    other = tmp_path / "other.pkl"
    other.write_bytes(FAKE)
    monkeypatch.setenv("RLGAF_SEQGAN_ORACLE", str(other))
    with pytest.raises(ValueError, match="other.pkl is not SeqGAN's target_params_py3.pkl"):
        seqgan_oracle_path("seqgan")


def test_tests_fail_under_ci_and_skip_elsewhere_when_the_data_is_missing(
    no_local_copy, monkeypatch
):
    monkeypatch.setenv("RLGAF_REQUIRE_DATA", "1")
    with pytest.raises(pytest.fail.Exception, match="RLGAF_REQUIRE_DATA is set"):
        find_seqgan_oracle()
    monkeypatch.delenv("RLGAF_REQUIRE_DATA")
    with pytest.raises(pytest.skip.Exception) as skipped:
        find_seqgan_oracle()
    assert "RLGAF_SEQGAN_ORACLE" in str(skipped.value)
    assert "python -m rlgaf_fast.bench.seqgan_data" in str(skipped.value)
    assert not no_local_copy.exists()  # looking never downloads


def test_seqgan_downloads_the_published_file(seqgan_oracle, server, no_local_copy, monkeypatch):
    base, files, hits = server
    real = seqgan_oracle.read_bytes()
    files["/real.pkl"] = real
    files["/tampered.pkl"] = real[:-1] + bytes([real[-1] ^ 1])
    monkeypatch.setenv("RLGAF_SEQGAN_ORACLE_URL", f"{base}/real.pkl")
    assert seqgan_oracle_path("seqgan") == no_local_copy
    assert seqgan_oracle_path("seqgan") == no_local_copy and hits == ["/real.pkl"]
    params = load_oracle_params(no_local_copy)
    assert [p.shape for p in params] == PARAM_SHAPES
    # What tests look for is now the cached file.
    assert find_seqgan_oracle() == no_local_copy

    no_local_copy.unlink()
    monkeypatch.setenv("RLGAF_SEQGAN_ORACLE_URL", f"{base}/tampered.pkl")
    with pytest.raises(ValueError, match=f"expected SHA-256 {seqgan_data.ORACLE_SHA256}"):
        seqgan_oracle_path("seqgan")
    assert leftovers(no_local_copy) == []
