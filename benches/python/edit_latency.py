#!/usr/bin/env python3
"""The Python SDK's edit-to-Applied latency, beside the Rust SDK's, in one run.

    python benches/python/edit_latency.py --meridian target/release/meridian \
        --sdk-latency target/release/sdk-latency --edits 2000

Starts a `meridian dev` (one node, in a scratch directory), then, alternating rounds so
that both see the same machine state: the Rust SDK (`sdk-latency`) and this process
through the Python SDK each put an integer in a document and wait until it is Applied,
one edit at a time. Then it measures how long a change takes to reach a Python
`on_change` listener: from another Python client's edit, and from the start of a
`meridian doc set` command. Prints a table for benches/README.md. Install the package
with a release library first (benches/README.md).
"""

import argparse
import json
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time

import meridian


def quantile(samples, q):
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def python_round(config, doc_id, edits, warmup):
    with meridian.Client.from_config(config) as client:
        doc = client.open(doc_id)
        doc.wait_synced(30)
        samples = []
        for i in range(warmup + edits):
            started = time.perf_counter()
            doc.put(["n"], i)
            doc.wait_applied(30)
            if i >= warmup:
                samples.append((time.perf_counter() - started) * 1e6)
        doc.wait_durable(30)
    return samples


def rust_round(binary, config, doc_id, edits, warmup):
    out = subprocess.run(
        [binary, "--config", config, "--doc", doc_id, "--edits", str(edits), "--warmup", str(warmup)],
        check=True, capture_output=True, text=True, timeout=600,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def listener_latency(config, meridian_bin, rounds):
    """Edit (Python writer, or a CLI command's start) to a Python listener's callback."""
    with meridian.Client.from_config(config) as reader, meridian.Client.from_config(config) as writer:
        doc_id = f"bench/listen-{time.time_ns()}"
        watched = reader.open(doc_id)
        watched.wait_synced(30)
        written = writer.open(doc_id)
        written.wait_synced(30)
        arrived = threading.Event()
        watched.on_change(lambda heads: arrived.set())
        from_python, from_cli = [], []
        for i in range(rounds):
            arrived.clear()
            started = time.perf_counter()
            written.put(["n"], i)
            if not arrived.wait(30):
                raise SystemExit("a change never reached the listener")
            from_python.append((time.perf_counter() - started) * 1e3)
        for i in range(max(1, rounds // 10)):
            arrived.clear()
            started = time.perf_counter()
            subprocess.run(
                [meridian_bin, "doc", "set", "--config", config, doc_id, "cli", str(i)],
                check=True, capture_output=True, timeout=60,
            )
            if not arrived.wait(30):
                raise SystemExit("a CLI change never reached the listener")
            from_cli.append((time.perf_counter() - started) * 1e3)
    return from_python, from_cli


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meridian", default="target/release/meridian")
    parser.add_argument("--sdk-latency", default="target/release/sdk-latency")
    parser.add_argument("--edits", type=int, default=2000, help="measured edits per SDK")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds")
    parser.add_argument("--listener-rounds", type=int, default=200)
    args = parser.parse_args()

    data = pathlib.Path(tempfile.mkdtemp(prefix="meridian-bench-"))
    log = open(data / "dev.out", "w")
    dev = subprocess.Popen(
        [args.meridian, "dev", "--data-dir", str(data), "--nodes", "1"], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 120
        while "is running" not in (data / "dev.out").read_text():
            if dev.poll() is not None or time.monotonic() > deadline:
                raise SystemExit((data / "dev.out").read_text())
            time.sleep(0.2)
        config = str(data / "client.toml")
        per_round = max(1, args.edits // args.rounds)
        python, rust = [], []
        for r in range(args.rounds):
            rust.append(rust_round(args.sdk_latency, config, f"bench/rust-{r}", per_round, 100))
            python.extend(python_round(config, f"bench/python-{r}", per_round, 100))
        rust_p50 = sorted(x["p50_us"] for x in rust)[len(rust) // 2]
        rust_p99 = max(x["p99_us"] for x in rust)
        py_p50, py_p99 = quantile(python, 0.5), quantile(python, 0.99)
        from_python, from_cli = listener_latency(config, args.meridian, args.listener_rounds)
        print(f"edits per SDK: {per_round * args.rounds} ({args.rounds} alternating rounds)")
        print("| SDK | edit → Applied p50 | p99 |")
        print("|---|---|---|")
        print(f"| Rust (`sdk-latency`) | {rust_p50 / 1000:.2f} ms | {rust_p99 / 1000:.2f} ms (worst round) |")
        print(f"| Python | {py_p50 / 1000:.2f} ms | {py_p99 / 1000:.2f} ms |")
        print(f"| Python overhead | {(py_p50 - rust_p50) / 1000:+.2f} ms ({py_p50 / rust_p50:.2f}×) | |")
        print(f"Python edit → Python listener: p50 {quantile(from_python, 0.5):.2f} ms, "
              f"p99 {quantile(from_python, 0.99):.2f} ms ({len(from_python)} edits)")
        print(f"`meridian doc set` start → Python listener: p50 {quantile(from_cli, 0.5):.0f} ms, "
              f"max {max(from_cli):.0f} ms ({len(from_cli)} commands; includes the CLI's start, "
              "TLS handshake and catch-up)")
    finally:
        dev.send_signal(signal.SIGINT)
        try:
            dev.wait(timeout=30)
        except subprocess.TimeoutExpired:
            dev.kill()
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
