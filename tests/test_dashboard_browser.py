"""The keras_colopt dashboard, for real: `python -m tensorboard.main` on a small log directory
(the plugin found through the installed entry point), the tab opened in headless Chromium.

Fails, never skips, when chromium, chromedriver, selenium or the entry point is missing.
Screenshots of each view are saved in the test's tmp folder.
"""

import os
import time

import pytest

from keras_colopt.stats import TensorStats
from keras_colopt.tensorboard import metadata, summary

import dashboard_browser as browser

HOSTILE = '<img src=x onerror="window.__xss=1">&amp; <b>bold</b> </text><script>window.__xss=2</script>'


def _write_hostile_run(log_dir):
    """A run whose layer name and phase label are markup: the page must show them as text."""
    summary.write(log_dir, metadata.PLAN_TAG, {"phases": [
        {"label": f"Prune {HOSTILE}", "start": 0, "end": 1}], "total_epochs": 1}, 0)
    stats = {HOSTILE: TensorStats(name=HOSTILE, shape=(2, 2), sparsity=0.5, zeros=2, size=4,
                                  unique=3, unique_per_channel_max=2)}
    summary.epoch(log_dir, 0, stats)
    summary.close(log_dir)


def _write_growing_run(log_dir, epoch):
    """A run still training: a plan of 3 epochs, and the statistics of `epoch`."""
    if epoch == 0:
        summary.write(log_dir, metadata.PLAN_TAG, {"phases": [
            {"label": "Train", "start": 0, "end": 1},
            {"label": "Prune", "start": 1, "end": 3}], "total_epochs": 3}, 0)
    stats = {"dense": TensorStats(name="dense", shape=(4, 4), sparsity=epoch / 4, zeros=4 * epoch,
                                  size=16, unique=16 - 4 * epoch, unique_per_channel_max=4)}
    summary.epoch(log_dir, epoch, stats)
    summary.close(log_dir)


def _write_search_run(log_dir):
    """A search's report as `search()` writes it: two finished trials (one chosen, both on
    the front), one stopped early (a table row, not a point)."""
    def trial(n, acc, size, ms, settings, **kw):
        return dict(name=f"trial {n}", status="ok", int8_accuracy=acc, fp32_accuracy=acc,
                    target_weight_bytes=size, target_latency_ms=ms, gzip_bytes=size,
                    tflite_bytes=2 * size, latency_ms=ms, sparsity=0.5, settings=settings,
                    on_front=True, accuracy_drop=0.9 - acc, **kw)

    summary.leaves(log_dir, {
        "kind": "search", "target": "ethos-u55-128", "chosen": "trial 1",
        "targets": {"max_accuracy_drop": 0.05}, "baseline": {"fp32_accuracy": 0.9},
        "missed": {}, "epochs_run": 9, "epochs_naive": 24,
        "search": {"study_name": "keras_colopt-abc", "storage": "sqlite:///s.db"},
        "leaves": [
            trial(0, 0.88, 9000, 0.2, "prune 50%, 8 clusters per tensor, every layer"),
            trial(1, 0.86, 5000, 0.15, "prune 75%, 4 clusters per tensor, every layer"),
            {"name": "trial 2", "status": "stopped early", "settings": "prune 90%, 4 clusters",
             "reason": "stopped after pruned: trial 1 compresses at least as hard"}]}, 3)
    summary.close(log_dir)


def _texts(driver, css, attr=None):
    script = ("return [...document.querySelectorAll(arguments[0])].map("
              "(e) => arguments[1] ? e.getAttribute(arguments[1]) : e.textContent)")
    return driver.execute_script(script, css, attr)


def _labels(driver, css):
    """The text an SVG label shows (its first text node; its <title> holds the full name)."""
    return driver.execute_script("return [...document.querySelectorAll(arguments[0])].map("
                                 "(e) => e.firstChild.nodeValue)", css)


def _hover_tooltip(driver, element):
    from selenium.webdriver import ActionChains

    ActionChains(driver).move_to_element(element).perform()
    time.sleep(0.2)
    tip = driver.execute_script("const t = document.getElementById('colopt-tip');"
                                "return t && t.style.display === 'block' ? t.textContent : null")
    assert tip, "no tooltip on hover"
    return tip


def test_the_dashboard_in_chromium(dashboard_logs, tmp_path):
    from selenium.webdriver.common.by import By

    browser.check_prerequisites()
    logs = tmp_path / "logs"
    browser.copy_runs([(dashboard_logs.run1, "run1"), (dashboard_logs.violation, "violation"),
                       (dashboard_logs.explore / "logs", "explore")], logs)
    _write_hostile_run(logs / "hostile")
    _write_growing_run(logs / "growing", 0)
    _write_search_run(logs / "search")

    with browser.tensorboard(logs) as server:
        driver = browser.chromium()
        try:
            browser.open_dashboard(driver, server.url)
            runs = _texts(driver, "#colopt-run option", "value")
            assert sorted(runs) == sorted([
                "run1/colopt", "violation/colopt", "hostile/colopt", "growing/colopt",
                "explore/report/colopt", "explore/QAT/colopt", "explore/Baseline/colopt",
                "search/colopt"])

            # A compression run: its layers in model order, its phases on the epoch axis.
            browser.select_run(driver, "run1/colopt")
            for kind in ("sparsity", "unique", "unique_per_channel", "invariants"):
                grid = f'svg[data-kind="{kind}"]'
                assert _labels(driver, f"{grid} .layer-name") == ["conv", "hidden", "logits"]
                assert _texts(driver, f"{grid} .band", "data-phase") == [
                    "Train", "Prune", "Cluster (sparsity-preserving)", "PCQAT"]
                assert len(driver.find_elements(By.CSS_SELECTOR, f"{grid} rect.cell")) == 12
            chips = driver.find_element(By.ID, "colopt-phases").text
            for label in ("Train · epochs 0–0", "Prune · epochs 1–1",
                          "Cluster (sparsity-preserving) · epochs 2–2", "PCQAT · epochs 3–3"):
                assert label in chips
            # Cells carry the values written; a hover names layer, epoch, phase and value.
            values = _texts(driver, 'svg[data-kind="sparsity"] rect.cell', "data-value")
            assert float(values[1]) >= 0.49  # conv at epoch 1, pruned
            cell = driver.find_element(
                By.CSS_SELECTOR, 'svg[data-kind="unique"] rect.cell[data-layer="hidden"]'
                                 '[data-epoch="2"]')
            tip = _hover_tooltip(driver, cell)
            assert "hidden · epoch 2 (Cluster (sparsity-preserving))" in tip
            assert "unique values per tensor" in tip
            assert driver.find_element(By.ID, "colopt-violations").text == "no violation"
            assert set(_texts(driver, 'svg[data-kind="invariants"] rect.cell', "data-status")) \
                == {"ok", "none"}
            deployed = driver.find_element(By.ID, "deployed").text
            assert "run1_int8.tflite" in deployed and "hidden" in deployed
            # ... and the same file on the Ethos-U55-128: Vela's figures per layer.
            on = dashboard_logs.run1_on_npu
            box = driver.find_element(By.CSS_SELECTOR, '#deployed .target[data-target="ethos-u55-128"]')
            assert "On ethos-u55-128" in box.text and "1 × Quantize" in box.text
            assert _texts(driver, '#deployed .target-layers tr[data-layer]', "data-layer")[:3] == [
                "conv", "hidden", "logits"]
            hidden = driver.find_element(By.CSS_SELECTOR,
                                         '#deployed .target-layers tr[data-layer="hidden"]').text
            row = next(c for c in on.layers if c.weight_bytes and "hidden" in c.name)
            assert f"{row.cycles:,}" in hidden and f"{row.weight_bytes:,}" in hidden
            browser.full_screenshot(driver, tmp_path / "run1.png")

            # A run whose guard found a violation, with a nested model's full layer names.
            browser.select_run(driver, "violation/colopt")
            assert _labels(driver, 'svg[data-kind="sparsity"] .layer-name') == [
                "backbone/conv", "backbone/hidden", "logits"]
            assert driver.find_element(By.ID, "colopt-violations").text == "2 violations"
            rows = driver.find_elements(By.CSS_SELECTOR, "#colopt-violation-table tr.bad")
            assert len(rows) == 2 and all("logits" in r.text and "sparsity" in r.text
                                          for r in rows)
            assert _texts(driver, 'svg[data-kind="invariants"] rect.cell[data-status="violation"]',
                          "data-layer") == ["logits", "logits"]
            browser.full_screenshot(driver, tmp_path / "violation.png")

            # explore's leaves: the table, the chart, the chosen leaf, a hover.
            browser.select_run(driver, "explore/report/colopt")
            chosen = dashboard_logs.report.chosen
            assert sorted(_texts(driver, "#colopt-leaves-chart g.leaf", "data-leaf")) == [
                "PTQ", "QAT"]
            ring = driver.find_elements(By.CSS_SELECTOR,
                                        f'#colopt-leaves-chart g.leaf[data-leaf="{chosen}"] '
                                        ".chosen-ring")
            assert len(ring) == 1
            assert driver.find_element(By.ID, "colopt-chosen").text == f"chosen: {chosen}"
            assert driver.find_element(By.CSS_SELECTOR, "#colopt-leaves tr.chosen").get_attribute(
                "data-leaf") == chosen
            point = driver.find_element(By.CSS_SELECTOR,
                                        '#colopt-leaves-chart circle.point[data-leaf="QAT"]')
            tip = _hover_tooltip(driver, point)
            assert tip.startswith("QAT") and "gzipped" in tip and "INT8 accuracy" in tip
            assert "on ethos-u55-128" in tip
            browser.full_screenshot(driver, tmp_path / "explore.png")
            # The chart against the target's latency (explore(target=EthosU(...))).
            from selenium.webdriver.support.ui import Select

            Select(driver.find_element(By.ID, "colopt-leaves-axis")).select_by_value("latency")
            assert driver.find_element(By.ID, "colopt-leaves-xlabel").text == \
                "latency on ethos-u55-128 (ms)"
            xs = dict(zip(_texts(driver, "#colopt-leaves-chart circle.point", "data-leaf"),
                          _texts(driver, "#colopt-leaves-chart circle.point", "data-x")))
            assert {k: float(v) for k, v in xs.items()} == {
                r.name: r.target_latency_ms for r in dashboard_logs.report.leaves}
            browser.full_screenshot(driver, tmp_path / "explore_latency.png")

            # search's trials: the finished ones as points, every one as a row with its
            # settings, the chosen point ringed.
            Select(driver.find_element(By.ID, "colopt-leaves-axis")).select_by_value("weights")
            browser.select_run(driver, "search/colopt")
            assert driver.find_element(By.CSS_SELECTOR, "#leaves h2").text.startswith(
                "search: the trials")
            assert sorted(_texts(driver, "#colopt-leaves-chart g.leaf", "data-leaf")) == [
                "trial 0", "trial 1"]
            assert len(driver.find_elements(By.CSS_SELECTOR, '#colopt-leaves-chart '
                                            'g.leaf[data-leaf="trial 1"] .chosen-ring')) == 1
            rows = driver.find_elements(By.CSS_SELECTOR, "#colopt-leaves tr[data-leaf]")
            assert [r.get_attribute("data-leaf") for r in rows] == ["trial 0", "trial 1",
                                                                     "trial 2"]
            assert "prune 75%, 4 clusters" in rows[1].text and "on the front" in rows[1].text
            assert "stopped early" in rows[2].text and "compresses at least" in rows[2].text
            tip = _hover_tooltip(driver, driver.find_element(
                By.CSS_SELECTOR, '#colopt-leaves-chart circle.point[data-leaf="trial 0"]'))
            assert "settings" in tip and "prune 50%" in tip and "Pareto front" in tip
            assert "Study keras_colopt-abc" in driver.find_element(By.ID, "leaves").text

            # Markup in names is shown as text, never run.
            browser.select_run(driver, "hostile/colopt")
            assert _texts(driver, 'svg[data-kind="sparsity"] .layer-name', "data-layer") == [
                HOSTILE]
            assert _labels(driver, 'svg[data-kind="sparsity"] .layer-name') == [HOSTILE]
            assert _texts(driver, 'svg[data-kind="sparsity"] .layer-name title') == [HOSTILE]
            assert f"Prune {HOSTILE}" in _texts(driver, ".phase-chip", "data-phase")
            assert driver.execute_script("return window.__xss") is None
            assert driver.execute_script(
                "return [document.querySelectorAll('img').length,"
                "        document.querySelectorAll('script').length,"  # TensorBoard's loader
                "        document.querySelectorAll('b:not(#colopt-tip b)').length]") == [0, 1, 0]

            # A run still training: new epochs appear on Reload (also polled every 30 s).
            browser.select_run(driver, "growing/colopt")
            status = driver.find_element(By.ID, "colopt-status").text
            assert status.startswith("training: epoch 1 of 3 done"), status
            _write_growing_run(logs / "growing", 1)
            deadline = time.time() + 60
            while "epoch 2 of 3" not in driver.find_element(By.ID, "colopt-status").text:
                assert time.time() < deadline, "the new epoch never showed"
                driver.find_element(By.ID, "colopt-reload").click()
                time.sleep(1)
            values = _texts(driver, 'svg[data-kind="sparsity"] rect.cell', "data-value")
            assert values == ["0", "0.25", ""]  # epoch 2 is planned, not reached
            assert browser.plugin_errors(driver) == []
        finally:
            driver.quit()
    for name in ("run1.png", "violation.png", "explore.png", "explore_latency.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name
