"""Cost of the sandbox's kernel boundary (lesson 11): HumanEval's 164 canonical solutions run through `execute_code`
with namespaces (the default: read-only filesystem, no network, own PID namespace, unprivileged user) and, in the same
run, with the guard only (`isolate=False`, the sandbox before the boundary existed). Rounds alternate between the two
so that load on the machine hits both alike; the last line prints the median time of each and the ratio.

    python benchmarks/sandbox.py                 # 5 rounds of 164 programs each, one at a time
    python benchmarks/sandbox.py --rounds 3 --workers 2

Needs the HumanEval parquet: from $HF_ENDPOINT, or the offline mirror beside the repo (served on loopback here).
"""
import argparse, functools, http.server, os, statistics, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MIRROR = Path(__file__).resolve().parents[2] / "shared" / "hf-mirror"


def serve_mirror():
    "HF_ENDPOINT, or the offline mirror on a loopback port."
    if os.environ.get("HF_ENDPOINT") or not MIRROR.is_dir(): return
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(MIRROR))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{server.server_port}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="rounds of each mode, interleaved")
    ap.add_argument("--workers", type=int, default=1, help="programs run at the same time")
    args = ap.parse_args()
    serve_mirror()
    from nanochat.execution import execute_code
    from nanochat.tasks import HumanEval, humaneval_program
    task = HumanEval()
    rows = task.table.to_pylist()
    programs = [humaneval_program(r["prompt"], r["canonical_solution"], r["test"], r["entry_point"]) for r in rows]

    def one_round(isolate):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.workers) as ex:
            results = list(ex.map(lambda p: execute_code(p, timeout=5.0, isolate=isolate), programs))
        dt = time.perf_counter() - t0
        assert all(r.success for r in results), [i for i, r in enumerate(results) if not r.success]
        return dt, results[0].isolation

    times = {True: [], False: []}
    for k in range(args.rounds):
        for isolate in ((True, False) if k % 2 == 0 else (False, True)):
            dt, how = one_round(isolate)
            times[isolate].append(dt)
            print(f"round {k + 1} {'namespaces' if isolate else 'guard only':>10}: {dt:6.2f}s for {len(programs)} programs "
                  f"({1000 * dt / len(programs):.0f} ms each) | {how}", flush=True)
    ns, guard = statistics.median(times[True]), statistics.median(times[False])
    print(f"median: namespaces {ns:.2f}s, guard only {guard:.2f}s, all {len(programs)} canonical solutions pass; "
          f"namespaces / guard only = {ns / guard:.3f}x")


if __name__ == "__main__": main()
