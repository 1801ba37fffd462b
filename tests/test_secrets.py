"""No URL secret leaves the process: a password in a URI's user info and a presigned query
string are planted in the input and weights URIs of a real run over HTTP (a loopback server),
then looked for in everything the run printed, logged and wrote (issue 21)."""

from __future__ import annotations

import functools
import http.server
import io
import shutil
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.demo.synthetic import write_sample_archive
from pipeline.io.storage import RedactingFilter, redact, redact_values

PASSWORD, SIGNATURE, CREDENTIAL = "PLANTEDpw42", "PLANTEDsig42", "PLANTEDcred42"
SECRETS = (PASSWORD, SIGNATURE, CREDENTIAL)


def test_redact_masks_passwords_and_query_strings_anywhere_in_text():
    text = (f"failed on http://me:{PASSWORD}@h:8080/a.tar and "
            f"https://b.s3.amazonaws.com/m.pt?X-Amz-Signature={SIGNATURE}&X-Amz-Credential="
            f"{CREDENTIAL} (s3://bucket/plain/key, /local/path?x=1)")
    assert redact(text) == ("failed on http://me:<redacted>@h:8080/a.tar and "
                            "https://b.s3.amazonaws.com/m.pt?<redacted> (s3://bucket/plain/key, "
                            "/local/path?x=1)")
    assert redact_values({"a": [f"http://u:{PASSWORD}@h/x"], "n": 3}) == {
        "a": ["http://u:<redacted>@h/x"], "n": 3}
    assert redact("s3://bucket/prefix/") == "s3://bucket/prefix/"


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Files with ``Range: bytes=a-b`` requests, as object stores serve them (a model file is
    read by ranges: its zip index, then its header); quiet: it logs no request line."""

    def log_message(self, *args):
        pass

    def send_head(self):
        header = self.headers.get("Range", "")
        path = Path(self.translate_path(self.path))
        if not header.startswith("bytes=") or not path.is_file():
            return super().send_head()
        data = path.read_bytes()
        first, _, last = header[len("bytes="):].partition("-")
        start = int(first) if first else len(data) - int(last)
        stop = min(int(last) + 1, len(data)) if first and last else len(data)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
        self.send_header("Content-Length", str(stop - start))
        self.end_headers()
        return io.BytesIO(data[start:stop])


@pytest.fixture
def http_root(tmp_path):
    """A loopback HTTP server over tmp_path/www (it ignores credentials and query strings)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(RangeHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_no_planted_secret_reaches_logs_files_rows_or_errors(ray_session, weights_file,
                                                             http_root, tmp_path, capfd,
                                                             caplog):
    from pipeline.cli.main import main

    root, host = http_root
    write_sample_archive(str(root / "in"), num_shards=1, samples_per_shard=2, seed=5,
                         image_size=(64, 64))
    shutil.copy(weights_file[0], root / "model.pt")
    source = f"http://reader:{PASSWORD}@{host}/in/faces-00000.tar"
    weights = (f"http://reader:{PASSWORD}@{host}/model.pt?X-Amz-Signature={SIGNATURE}"
               f"&X-Amz-Credential={CREDENTIAL}")
    out = tmp_path / "out"
    assert main(["infer", "--input", source, "--output", str(out), "--weights", weights,
                 "--batch-size", "2"]) == 0
    # A failing run names its input in its error.
    assert main(["infer", "--input", source.replace("faces-00000", "missing"), "--output",
                 str(tmp_path / "out2"), "--weights", weights]) == 2

    table = pq.read_table(out / "part-faces-00000.parquet")
    assert table.num_rows == 2 and table.column("error").null_count == 2  # it did run
    assert set(table.column("shard").to_pylist()) == {
        f"http://reader:<redacted>@{host}/in/faces-00000.tar"}
    printed = capfd.readouterr()
    seen = {"stdout": printed.out, "stderr": printed.err, "log": caplog.text}
    seen.update({str(p.relative_to(tmp_path)): p.read_bytes().decode("latin-1")
                 for p in tmp_path.rglob("*") if p.is_file() and "www" not in p.parts})
    assert "_config.yaml" in " ".join(seen) and "_manifest.json" in " ".join(seen)
    assert any(name.startswith("out/_done/") for name in seen)
    assert any(name.startswith("out/_report/") for name in seen)
    assert "input not found: http://reader:<redacted>@" in printed.err
    leaks = {name: [s for s in SECRETS if s in text] for name, text in seen.items()}
    assert {name: found for name, found in leaks.items() if found} == {}
    assert any(isinstance(f, RedactingFilter) for h in __import__("logging").getLogger()
               .handlers for f in h.filters)
