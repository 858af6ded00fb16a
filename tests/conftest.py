"Fixtures shared by the test files."
import os, functools, threading, http.server
from pathlib import Path
import pytest

MIRROR = Path(__file__).resolve().parents[2] / "shared" / "hf-mirror"  # the offline dataset mirror beside the repo


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


@pytest.fixture(scope="session", autouse=True)
def _report_copies_stay_out_of_the_repo(tmp_path_factory):
    "Runs that generate a report card copy it to $NANOCHAT_REPORT_COPY: a test folder, never the user's ./report.md."
    os.environ.setdefault("NANOCHAT_REPORT_COPY", str(tmp_path_factory.mktemp("report_copies")))


@pytest.fixture(scope="session")
def endpoint():
    "HF_ENDPOINT if the environment sets one, else the offline mirror served on loopback for the session."
    if os.environ.get("HF_ENDPOINT"):
        yield os.environ["HF_ENDPOINT"]
        return
    if not MIRROR.is_dir(): pytest.skip(f"no HF_ENDPOINT and no offline mirror at {MIRROR}")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(MIRROR)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
