"""Fault injection for nanochat.dataset's downloader (lesson 01): a loopback server that fails at random, 404s,
an unreachable endpoint, corrupted bodies, concurrent threads and processes, and the `python -m nanochat.dataset` CLI."""
import collections, hashlib, io, multiprocessing as mp, os, random, socket, subprocess, sys, threading, time
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.dataset import SHARD_REPO, DownloadError, download_file, download_shards, hf_download, shard_filename

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path(__file__).resolve().parents[2] / "shared" / "hf-mirror"
FAULTS = ["500", "503", "stall", "truncate", "close", "corrupt"]
TIMEOUT = 0.25  # client read timeout in these tests; a stall lasts STALL > TIMEOUT
STALL = 1.0
FAST = dict(timeout=TIMEOUT, backoff=0.01, progress=False)


def make_parquet(seed: int, n_docs: int = 600) -> bytes:
    "A small shard-like parquet file (a `text` column, several row groups)."
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(rng.randint(5, 60))) for _ in range(n_docs)]
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": docs}), buf, row_group_size=200)
    return buf.getvalue()


def corrupt_footer(data: bytes) -> bytes:
    "Same length, magic intact, footer (file metadata) zeroed: only the parquet check can notice."
    n = int.from_bytes(data[-8:-4], "little")
    return data[:-8 - n] + bytes(n) + data[-8:]


class FaultyServer:
    """Serves files under `root` on 127.0.0.1. Each GET of an existing file is answered in a mode: `plan[path]` is
    consumed first, then a seeded random choice (a fault with probability `p_fault`). Counts GETs per path."""

    def __init__(self, root, seed=0, p_fault=0.0, plan=None, slow=0.0):
        self.root, self.rng, self.p_fault, self.slow = Path(root), random.Random(seed), p_fault, slow
        self.plan = {k: list(v) for k, v in (plan or {}).items()}
        self.gets, self.modes, self.lock = collections.Counter(), collections.Counter(), threading.Lock()
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args): pass

            def do_GET(self):
                try: srv.handle(self)
                except (BrokenPipeError, ConnectionResetError): pass  # the client gave up (timeout): fine

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda *args: None
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def mode(self, path):
        with self.lock:
            self.gets[path] += 1
            if self.plan.get(path): m = self.plan[path].pop(0)
            else: m = self.rng.choice(FAULTS) if self.rng.random() < self.p_fault else "ok"
            self.modes[m] += 1
            return m

    def handle(self, h):
        path = unquote(h.path.split("?")[0]).lstrip("/")
        f = self.root / path
        if not f.is_file():
            with self.lock: self.gets[path] += 1
            return h.send_error(404)
        mode, data = self.mode(path), f.read_bytes()
        if mode in ("500", "503"): return h.send_error(int(mode))
        if mode == "close": h.close_connection = True; return  # hang up without a response
        if mode == "corrupt": data = corrupt_footer(data)
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if mode == "truncate": h.wfile.write(data[:len(data) // 2]); return  # promised more; hang up
        if mode == "stall": h.wfile.write(data[:len(data) // 3]); h.wfile.flush(); time.sleep(STALL); return
        if self.slow:  # dribble the body out so concurrent clients overlap
            for i in range(10): h.wfile.write(data[i * len(data) // 10:(i + 1) * len(data) // 10]); h.wfile.flush(); time.sleep(self.slow / 10)
        else: h.wfile.write(data)

    def close(self):
        self.httpd.shutdown(); self.httpd.server_close()


@pytest.fixture
def files(tmp_path):
    "Server root with 8 shard-like parquet files at the real shard paths; returns (root, {path: bytes})."
    root = tmp_path / "srv"
    out = {}
    for i in range(8):
        p = f"{SHARD_REPO}/{shard_filename(i)}"
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        (root / p).write_bytes(data := make_parquet(i))
        out[p] = data
    return root, out


@pytest.fixture
def serve(monkeypatch):
    "Start a FaultyServer and point HF_ENDPOINT at it (trailing slash on purpose: hf_endpoint() must strip it)."
    servers = []
    def start(root, **kw):
        s = FaultyServer(root, **kw)
        servers.append(s)
        monkeypatch.setenv("HF_ENDPOINT", s.url + "/")
        return s
    yield start
    for s in servers: s.close()


def leftovers(folder, expected):
    "Files in `folder` other than the expected ones and their hidden `.name.lock` files (temp files would show here)."
    locks = {f".{n}.lock" for n in expected}
    return sorted(p.name for p in Path(folder).iterdir() if p.name not in expected and p.name not in locks)


def test_random_faults_give_identical_files(files, serve, tmp_path):
    root, data = files
    # each file's first request is a fault (so every kind is exercised), later ones are faults half the time
    plan = {p: [FAULTS[i % len(FAULTS)]] for i, p in enumerate(data)}
    srv = serve(root, seed=0, p_fault=0.5, plan=plan)
    out = tmp_path / "out"
    for p, want in data.items():
        got = hf_download(p, out / Path(p).name, retries=12, **FAST)  # parquet check applied automatically
        assert got.read_bytes() == want
    assert set(FAULTS) <= set(srv.modes), srv.modes
    assert sum(srv.modes[f] for f in FAULTS) >= len(data)
    assert leftovers(out, {Path(p).name for p in data}) == []
    # a second pass finds everything in place and asks the server nothing
    before = sum(srv.gets.values())
    for p in data: hf_download(p, out / Path(p).name, retries=0, **FAST)
    assert sum(srv.gets.values()) == before


def test_404_fails_at_once(files, serve, tmp_path):
    root, _ = files
    srv = serve(root)
    path = f"{SHARD_REPO}/shard_99999.parquet"
    t0 = time.time()
    with pytest.raises(DownloadError) as e: hf_download(path, tmp_path / "x.parquet", **FAST)
    assert time.time() - t0 < 1
    assert e.value.status == 404 and f"{srv.url}/{path}" in str(e.value) and "HF_ENDPOINT" in str(e.value)
    assert srv.gets[path] == 1  # not retried
    assert leftovers(tmp_path, ["x.parquet", "srv"]) == [] and not (tmp_path / "x.parquet").exists()


def test_missing_shard_mentions_num_shards(files, serve, tmp_path, monkeypatch, capsys):
    root, _ = files
    serve(root)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.setenv("NANOCHAT_NUM_SHARDS", "20")  # the server has 8: the val shard (19) is missing
    with pytest.raises(DownloadError, match="NANOCHAT_NUM_SHARDS"): download_shards(2)
    monkeypatch.setenv("NANOCHAT_NUM_SHARDS", "3")  # asking for more train shards than exist clips, with a note
    got = download_shards(10)
    assert [p.name for p in got] == [shard_filename(i) for i in (0, 1, 2)]
    assert "only 2 train shards" in capsys.readouterr().out


def test_unreachable_endpoint(tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]  # closed once we leave: connection refused
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    path = "datasets/openai/gsm8k/resolve/main/main/test-00000-of-00001.parquet"
    with pytest.raises(DownloadError) as e: hf_download(path, tmp_path / "t.parquet", retries=2, **FAST)
    msg = str(e.value)
    assert f"http://127.0.0.1:{port}/{path}" in msg and "HF_ENDPOINT" in msg and "3 attempts" in msg
    assert list(tmp_path.iterdir()) == [tmp_path / ".t.parquet.lock"]


def test_corrupt_body_is_retried(files, serve, tmp_path):
    root, data = files
    p = next(iter(data))
    srv = serve(root, plan={p: ["corrupt"]})
    dest = tmp_path / "s.parquet"
    assert hf_download(p, dest, **FAST).read_bytes() == data[p]
    assert srv.gets[p] == 2
    # a damaged file already in place fails the check and is fetched again
    dest.write_bytes(corrupt_footer(data[p]))
    assert hf_download(p, dest, **FAST).read_bytes() == data[p]
    assert srv.gets[p] == 3
    # without a check a full-length corrupt body would be accepted: the check is what catches it
    srv.plan[p] = ["corrupt"]
    assert download_file(f"{srv.url}/{p}", tmp_path / "u.parquet", **FAST).read_bytes() != data[p]


def test_failed_download_leaves_nothing(files, serve, tmp_path):
    root, data = files
    p = next(iter(data))
    srv = serve(root, plan={p: ["truncate", "stall"]})
    with pytest.raises(DownloadError, match="2 attempts"): hf_download(p, tmp_path / "s.parquet", retries=1, **FAST)
    assert srv.gets[p] == 2
    assert leftovers(tmp_path, ["srv"]) == [".s.parquet.lock"]  # no partial file, under its name or a temp name


def test_threads_fetch_once(files, serve, tmp_path):
    root, data = files
    p = next(iter(data))
    srv = serve(root, slow=0.5)
    dest = tmp_path / "s.parquet"
    results = []
    def worker(): results.append(hf_download(p, dest, **FAST).read_bytes())
    ts = [threading.Thread(target=worker) for _ in range(8)]
    for t in ts: t.start()
    for t in ts: t.join()
    assert srv.gets[p] == 1
    assert results == [data[p]] * 8


def _proc_download(url, dest, barrier, queue):
    barrier.wait()  # both processes start downloading at the same moment
    path = download_file(url, dest, timeout=5, backoff=0.01, progress=False)
    queue.put(hashlib.sha256(Path(path).read_bytes()).hexdigest())


def test_processes_fetch_once(files, serve, tmp_path):
    root, data = files
    p = next(iter(data))
    srv = serve(root, slow=1.0)
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_proc_download, args=(f"{srv.url}/{p}", tmp_path / "s.parquet", barrier, queue)) for _ in range(2)]
    for pr in procs: pr.start()
    digests = [queue.get(timeout=60) for _ in procs]
    for pr in procs: pr.join(timeout=30)
    assert [pr.exitcode for pr in procs] == [0, 0]
    assert srv.gets[p] == 1
    assert digests == [hashlib.sha256(data[p]).hexdigest()] * 2


def test_cli_downloads_train_and_val_shards(tmp_path):
    if not MIRROR.is_dir(): pytest.skip(f"no offline mirror at {MIRROR}")
    requested = []
    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args): pass
        def do_GET(self): requested.append(self.path); super().do_GET()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(MIRROR)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{httpd.server_port}", NANOCHAT_NUM_SHARDS="4",
                   NANOCHAT_BASE_DIR=str(tmp_path / "base"), PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        r = subprocess.run([sys.executable, "-m", "nanochat.dataset", "-n", "2"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    finally:
        httpd.shutdown(); httpd.server_close()
    assert r.returncode == 0, r.stderr
    names = [shard_filename(i) for i in (0, 1, 3)]
    got = tmp_path / "base" / "base_data"
    assert sorted(p.name for p in got.iterdir() if not p.name.startswith(".")) == names
    assert leftovers(got, names) == []
    for n in names: assert (got / n).read_bytes() == (MIRROR / SHARD_REPO / n).read_bytes()
    assert sorted(requested) == [f"/{SHARD_REPO}/{n}" for n in names]
    assert "2 train shards + 1 validation shard" in r.stdout
