"""How long the keras_colopt dashboard takes to show a 50-layer run.

Trains a 50-layer model (49 hidden Dense layers and the logits, Keras 3, on the embedded
digits) through Train -> Prune 50% -> Cluster 8 -> PCQAT with `collaborative_fit(log_dir=...)`
and exports it with `to_tflite(..., log_dir=...)`, so the run holds what a real one holds
(50 layers x every epoch, the invariant checks, the .tflite table). Then starts
`python -m tensorboard.main` on it (TensorBoard's default data loading) and opens the
keras_colopt tab in headless Chromium, `--reps` times, each a fresh page load:

- navigation -> heatmap drawn: from the start of TensorBoard's page navigation
  (`performance.timeOrigin` of the top page) to the moment the dashboard has drawn its
  heatmaps (`window.coloptHeatmapDrawnAt` in the plugin's iframe), both browser clocks;
- of which the plugin's `/data` request (server time to assemble the run, and its size)
  and the drawing (from the data's arrival to the drawn page).

TensorBoard has read the run before the first load; the first load is the browser's with
an empty cache (TensorBoard's own page and scripts fetched), later ones are warm.
Writes benchmarks/results/dashboard_load.{md,json}.

Needs the package installed (the plugin's entry point), chromium and chromium-driver.

Run: python benchmarks/dashboard_load.py [--layers 50] [--epochs-per-phase 3] [--reps 5]
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's keras_colopt
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # dashboard_browser

import dashboard_browser as browser  # noqa: E402


def make_run(log_dir, layers: int, epochs: int, seed: int = 0) -> dict:
    """A collaborative_fit run of a `layers`-layer model into `log_dir`, and its .tflite."""
    import keras

    import keras_colopt as colopt
    from keras_colopt import data

    (x, y), (xt, yt) = data.load_digits(seed=seed)
    x, xt = x.reshape(len(x), -1), xt.reshape(len(xt), -1)
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((64,))]
        + [keras.layers.Dense(32, activation="relu", name=f"dense_{i:02d}")
           for i in range(layers - 1)]
        + [keras.layers.Dense(10, name="logits")], name=f"deep{layers}")
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    t0 = time.time()
    result = colopt.collaborative_fit(
        model, x[:512], y[:512],
        phases=[colopt.Train(epochs=epochs), colopt.Prune(sparsity=0.5, epochs=epochs),
                colopt.Cluster(clusters=8, epochs=epochs), colopt.Quantize(epochs=epochs)],
        validation_data=(xt, yt), batch_size=64, log_dir=log_dir, verbose=0)
    train = time.time() - t0
    colopt.export.to_tflite(result.model, os.path.join(os.path.dirname(log_dir),
                                                       "deep_int8.tflite"), log_dir=log_dir)
    return {"layers": layers, "epochs": result.plan.total_epochs, "train_seconds": train}


MEASURE = """
const f = [...window.parent.document.querySelectorAll('iframe')].find(
  (e) => (e.src || '').includes('keras_colopt'));
const data = performance.getEntriesByType('resource').find((e) => e.name.includes('/data?run='));
return {
  top_origin: window.parent.performance.timeOrigin,
  frame_origin: performance.timeOrigin,
  drawn_at: window.coloptHeatmapDrawnAt,
  data_start: data ? data.startTime : null,
  data_response_start: data ? data.responseStart : null,
  data_end: data ? data.responseEnd : null,
  data_bytes: data ? data.encodedBodySize : null,
  data_json_bytes: data ? data.decodedBodySize : null,
  cells: document.querySelectorAll('rect.cell').length,
};
"""


def load_once(driver, url: str) -> dict:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.switch_to.default_content()
    driver.get("about:blank")
    t0 = time.perf_counter()
    browser.open_dashboard(driver, url)
    WebDriverWait(driver, 120, poll_frequency=0.02).until(
        lambda d: d.execute_script("return window.coloptHeatmapDrawnAt !== undefined"))
    wall = time.perf_counter() - t0
    m = driver.execute_script(MEASURE)
    frame0 = m["frame_origin"] - m["top_origin"]  # the iframe's clock starts later
    return {
        "navigation_to_heatmap_ms": frame0 + m["drawn_at"],
        "iframe_start_ms": frame0,
        "data_request_ms": m["data_end"] - m["data_start"],
        "data_server_ms": m["data_response_start"] - m["data_start"],
        "data_bytes": m["data_bytes"],
        "data_json_bytes": m["data_json_bytes"],
        "draw_ms": m["drawn_at"] - m["data_end"],
        "selenium_wall_ms": 1000 * wall,
        "cells": m["cells"],
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=50)
    p.add_argument("--epochs-per-phase", type=int, default=3)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=os.path.join(HERE, "out", "dashboard_load"))
    p.add_argument("--reuse", action="store_true",
                   help="measure the run an earlier call left in --out (no training)")
    args = p.parse_args(argv)
    browser.check_prerequisites()

    log_dir = os.path.join(args.out, "logs", "deep")
    if args.reuse:
        with open(os.path.join(args.out, "run.json")) as f:
            run = json.load(f)
    else:
        shutil.rmtree(args.out, ignore_errors=True)
        run = make_run(log_dir, args.layers, args.epochs_per_phase)
        with open(os.path.join(args.out, "run.json"), "w") as f:
            json.dump(run, f)
    print(f"run: {run}", flush=True)

    loads = []
    with browser.tensorboard(os.path.join(args.out, "logs")) as server:
        driver = browser.chromium()
        try:
            for i in range(args.reps):
                loads.append(load_once(driver, server.url))
                print(f"load {i + 1}: {json.dumps(loads[-1])}", flush=True)
            browser.full_screenshot(driver, os.path.join(args.out, "deep.png"))
        finally:
            driver.quit()

    import tensorboard
    import selenium

    key = "navigation_to_heatmap_ms"
    if not argv and sys.argv[1:]:
        argv = sys.argv[1:]
    warm = loads[1:] or loads
    result = {
        "command": "python benchmarks/dashboard_load.py " + " ".join(argv or sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "tensorboard": tensorboard.__version__,
                    "selenium": selenium.__version__},
        "run": run, "loads": loads,
        "cold_ms": loads[0][key], "warm_median_ms": statistics.median(l[key] for l in warm),
    }
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "dashboard_load.json"), "w") as f:
        json.dump(result, f, indent=2)
    rows = ["| load | navigation → heatmap drawn | iframe starts | /data request (server) "
            "| /data gzip (JSON) | drawing | cells |", "|---|---:|---:|---:|---:|---:|---:|"]
    for i, l in enumerate(loads):
        rows.append(f"| {i + 1}{' (cold)' if i == 0 else ''} | {l[key]:.0f} ms "
                    f"| {l['iframe_start_ms']:.0f} ms | {l['data_request_ms']:.0f} ms "
                    f"({l['data_server_ms']:.0f} ms) | {l['data_bytes'] / 1024:.0f} KiB "
                    f"({l['data_json_bytes'] / 1024:.0f} KiB) "
                    f"| {l['draw_ms']:.0f} ms | {l['cells']} |")
    text = "\n".join([
        f"# Dashboard load time: a {run['layers']}-layer run",
        "",
        f"Command: `{result['command']}`; {os.cpu_count()} CPUs (shared), TensorBoard "
        f"{tensorboard.__version__} (default data loading), headless Chromium via selenium "
        f"{selenium.__version__}. The run: {run['layers']} Dense layers, Train → Prune 50% → "
        f"Cluster 8 → PCQAT, {run['epochs']} epochs (collaborative_fit with log_dir), and its "
        "int8 .tflite table.",
        "",
        "Navigation → heatmap drawn: from the start of TensorBoard's page navigation to the "
        "dashboard's heatmaps drawn in its iframe (both browser clocks). Each load is a fresh "
        "page; the first with the browser's cache empty (TensorBoard's own scripts fetched).",
        "",
        *rows,
        "",
        f"First load: {result['cold_ms']:.0f} ms. Later loads, median: "
        f"{result['warm_median_ms']:.0f} ms. Training the run took {run['train_seconds']:.0f} s "
        "(not part of the load).",
        "",
    ])
    with open(os.path.join(HERE, "results", "dashboard_load.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
