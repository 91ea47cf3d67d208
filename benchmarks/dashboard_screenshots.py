"""The README's dashboard screenshots: `docs/dashboard_demo.png` and `docs/dashboard_explore.png`.

Runs `keras-colopt demo` and `keras-colopt report` (explore on the embedded dataset) as a user
would (`python -m keras_colopt ...`, their output checked for the dashboard's command line),
then starts `python -m tensorboard.main` on each one's logs and saves TensorBoard's page with
the keras_colopt tab open in headless Chromium, 1400 px wide and as tall as the dashboard.

The explore targets decide which leaves are built and which is chosen: a size target that only
the pruned-and-clustered leaves meet makes the walk build all eight (the default, 13,000 B, was
picked from a first run: PCQAT and SparseClustered+PTQ gzip to ~12,500 B, the clustered leaves
to ~14,500 B, the pruned ones to ~19,700 B; see the report printed).

Needs the package installed (the plugin's entry point), chromium and chromium-driver.

Run: python benchmarks/dashboard_screenshots.py [--reuse] [--max-size-bytes N]
"""

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))  # dashboard_browser

import dashboard_browser as browser  # noqa: E402


def command(args, out_dir) -> str:
    """Runs `python -m keras_colopt ARGS --out OUT_DIR`; returns its output, after checking
    that its last line is the dashboard's command for OUT_DIR/logs."""
    run = subprocess.run([sys.executable, "-m", "keras_colopt", *args, "--out", out_dir],
                         capture_output=True, text=True, cwd=os.path.dirname(out_dir))
    if run.returncode != 0:
        raise SystemExit(f"keras-colopt {' '.join(args)} failed:\n{run.stdout}\n{run.stderr}")
    last = run.stdout.strip().splitlines()[-1]
    expected = f"tensorboard --logdir {os.path.basename(out_dir)}/logs"
    assert last.startswith("Dashboard: ") and expected in last, last
    return run.stdout


def screenshot(logs, path, run_label=None) -> None:
    with browser.tensorboard(logs) as server:
        driver = browser.chromium(1400, 1000)
        try:
            browser.open_dashboard(driver, server.url)
            if run_label is not None:
                runs = driver.execute_script(
                    "return [...document.querySelectorAll('#colopt-run option')]"
                    ".map((o) => [o.value, o.textContent])")
                (value,) = [v for v, label in runs if label == run_label]
                browser.select_run(driver, value)
            browser.full_screenshot(driver, path)
            assert browser.plugin_errors(driver) == []
        finally:
            driver.quit()
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(HERE, "out", "screenshots"))
    p.add_argument("--docs", default=os.path.join(REPO, "docs"))
    p.add_argument("--reuse", action="store_true",
                   help="keep a run an earlier call left in --out (each run made when missing)")
    p.add_argument("--max-size-bytes", type=int, default=13000)
    p.add_argument("--max-accuracy-drop", type=float, default=0.03)
    args = p.parse_args(argv)
    browser.check_prerequisites()
    demo, report = (os.path.join(args.out, "colopt-demo"), os.path.join(args.out, "colopt-report"))
    os.makedirs(args.out, exist_ok=True)
    if not (args.reuse and os.path.exists(os.path.join(demo, "summary.json"))):
        print(command(["demo", "--quiet"], demo))
    if not (args.reuse and os.path.exists(os.path.join(report, "report.json"))):
        print(command(["report", "--quiet", "--max-size-bytes", str(args.max_size_bytes),
                       "--max-accuracy-drop", str(args.max_accuracy_drop)], report))
    os.makedirs(args.docs, exist_ok=True)
    screenshot(os.path.join(demo, "logs"), os.path.join(args.docs, "dashboard_demo.png"))
    screenshot(os.path.join(report, "logs"), os.path.join(args.docs, "dashboard_explore.png"),
               run_label="report")


if __name__ == "__main__":
    main()
