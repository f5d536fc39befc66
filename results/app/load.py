"""Load test of the web demo: app.py served on loopback, several gradio_client clients asking at once.

    python results/app/load.py --ckpt runs/main/best.pt --data-dir ./data --clients 4 --seconds 60

First the start: seconds until the page answers and until the test set is scored for the
misclassified tab. Then every request is asked alone (the reference answer); then `clients` threads
ask requests drawn at random for `seconds`, and every answer must equal the reference for its
request (the top classes, the caption and the overlay's pixels). Writes --json (default
results/app/load.json): the machine, the start's times, the counts, wrong answers and errors, the
latency's p50 and p95, and app.py's peak memory. Only 127.0.0.1 is ever asked.
"""
import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)

import common  # noqa: E402  (the project's modules, from the repository root)
import torch  # noqa: E402

REQUESTS = [("/explain_test", (index, layer, alpha, 3)) for index in (0, 7, 42) for layer, alpha in
            (("layer3", 0.5), ("layer2", 0.3))] + [("/explain_upload", ("upload", "layer3", 0.5, 3)),
                                                   ("/explain_upload", ("upload", "layer4", 0.8, 2))]


def serve(ckpt, data_dir, log):
    """app.py on a free loopback port; returns (process, url) once the page answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "app.py", "--ckpt", ckpt, "--data-dir", data_dir, "--device", "cpu",
                             "--port", str(port)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url, deadline = f"http://127.0.0.1:{port}/", time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            return proc, url
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise SystemExit("app.py did not start")
            time.sleep(1)


def scored(log_path, proc, timeout=1200):
    """Wait for app.py's log line that says the test set is scored."""
    deadline = time.time() + timeout
    while "Test set scored in" not in read(log_path):
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit("app.py did not score the test set")
        time.sleep(0.5)


def read(path):
    with open(path) as f:
        return f.read()


def peak_memory_gb(pid):
    """The process's peak resident memory (Linux's VmHWM), in GB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1e6


def answer(client, request, upload):
    """One request's answer in comparable form: top classes, caption, the overlay's pixels."""
    from gradio_client import handle_file
    from PIL import Image

    api, args = request
    args = (handle_file(upload), *args[1:]) if api == "/explain_upload" else args
    label, _, heat, caption = client.predict(*args, api_name=api)
    return label, caption, np.asarray(Image.open(heat))


def same(a, b):
    return a[0] == b[0] and a[1] == b[1] and np.array_equal(a[2], b[2])


def load(url, upload, clients=4, seconds=60, seed=0):
    """Reference answers one at a time, then `clients` threads for `seconds`: a dict of counts and
    latencies (seconds)."""
    from gradio_client import Client

    alone = Client(url, verbose=False)
    reference = [answer(alone, request, upload) for request in REQUESTS]
    latencies, wrong, errors, lock = [], [], [], threading.Lock()
    stop_at = time.time() + seconds

    def ask(n):
        client, draw = Client(url, verbose=False), random.Random(seed + n)
        while time.time() < stop_at:
            i = draw.randrange(len(REQUESTS))
            started = time.perf_counter()
            try:
                got = answer(client, REQUESTS[i], upload)
            except Exception as e:  # noqa: BLE001  (counted and reported, the run goes on)
                with lock:
                    errors.append(f"{REQUESTS[i]}: {type(e).__name__}: {e}")
                continue
            with lock:
                latencies.append(time.perf_counter() - started)
                if not same(got, reference[i]):
                    wrong.append(str(REQUESTS[i]))

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ordered = sorted(latencies)
    return {"clients": clients, "seconds": seconds, "answers": len(latencies), "wrong": wrong, "errors": errors,
            "p50_s": statistics.median(ordered) if ordered else None,
            "p95_s": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else None}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint app.py serves")
    parser.add_argument("--data-dir", default="./data", help="root holding cifar-10-batches-py/")
    parser.add_argument("--clients", type=common.positive_int, default=4, help="clients at once (default 4)")
    parser.add_argument("--seconds", type=common.positive_float, default=60, help="how long they ask (default 60)")
    parser.add_argument("--json", default=os.path.join(HERE, "load.json"), help="where the results go")
    args = parser.parse_args()
    from PIL import Image

    downloads = tempfile.TemporaryDirectory(prefix="load-gradio-")  # removed at exit
    os.environ["GRADIO_TEMP_DIR"] = downloads.name  # gradio_client's copies of the answers, not /tmp/gradio

    upload = os.path.join(HERE, ".load-upload.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(upload)
    log_path, started = os.path.join(HERE, ".load-app.log"), time.perf_counter()
    with open(log_path, "w") as log:
        proc, url = serve(args.ckpt, args.data_dir, log)
        try:
            start = {"page_s": time.perf_counter() - started}
            scored(log_path, proc)
            start["scored_s"] = time.perf_counter() - started
            result = {**start, **load(url, upload, args.clients, args.seconds), "peak_gb": peak_memory_gb(proc.pid)}
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            os.unlink(upload)
    result.update(machine=common.device_name(torch.device("cpu")), date=time.strftime("%Y-%m-%d"),
                  command=" ".join(sys.argv))
    common.save_json(args.json, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("wrong", "errors")}),
          f"{len(result['wrong'])} wrong, {len(result['errors'])} errors")


if __name__ == "__main__":
    main()
