"""search: an Optuna study over the compression settings; its Pareto front, the chosen
point in its own file, shared prefixes, early stops, resume after a kill, and two workers
on one PostgreSQL storage."""

import glob
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import optuna
import pytest

import keras_colopt as colopt
from keras_colopt import study as search_mod
from keras_colopt.study import SearchSpace, compresses_as_hard, dominates

from conftest import tiny_sequential

# A small space: 2 sparsities x 2 cluster counts = 4 points, searched as a grid.
SPACE = dict(sparsity=(0.5, 0.75), structure=("unstructured",), clusters=(4, 8),
             per_channel=(False,), leave_out=("none",), epochs=(1,))
RECIPE = {"search": {"budget": 4, "max_accuracy_drop": 0.2, "target": "ethos-u55-128",
                     "space": {k: list(v) for k, v in SPACE.items()}},
          "fit": {"batch_size": 64}}


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """A trained Keras 3 tiny CNN, saved with its data for the command line."""
    (x, y), (xt, yt) = digits
    model = tiny_sequential(keras=keras)
    model.fit(x, y, epochs=10, batch_size=64, verbose=0)
    folder = tmp_path_factory.mktemp("search_inputs")
    model.save(folder / "model.keras")
    np.savez(folder / "data.npz", x_train=x, y_train=y, x_val=xt, y_val=yt)
    with open(folder / "recipe.json", "w") as f:
        json.dump(RECIPE, f)
    return model, (x, y), (xt, yt), folder


@pytest.fixture(scope="module")
def found(trained, tmp_path_factory):
    model, (x, y), (xt, yt), _ = trained
    before = [w.copy() for w in model.get_weights()]
    out = tmp_path_factory.mktemp("search")
    # Invariants and files, not accuracy: the compiled rate, not the probe (see conformance).
    report = colopt.search(model, x, y, validation_data=(xt, yt), out_dir=out,
                           target=colopt.targets.EthosU("ethos-u55-128"),
                           max_accuracy_drop=0.2, budget=4, space=SearchSpace(**SPACE),
                           batch_size=64, rate_policy="compiled", latency_runs=2)
    return report, out, model, before


def _study(out):
    return optuna.load_study(study_name=None, storage=f"sqlite:///{out}/search.db")


def test_the_front_is_the_non_dominated_set_of_the_finished_trials(found):
    report, out, _, _ = found
    assert report.front
    values = {p.name: p.values() for p in report.front}
    for a in report.front:
        for b in report.front:
            assert not dominates(a.values(), b.values()), (a.name, b.name)
    study = _study(out)
    assert study.metric_names == ["int8_accuracy", "weight_bytes", "latency_ms"]
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    for t in finished:  # every finished trial off the front is beaten by a point on it
        if f"trial {t.number}" not in values:
            assert any(dominates(v, t.values) for v in values.values()), t.number
    # Optuna's own Pareto front of the study's trials agrees; ours also holds the model as
    # given (PTQ), which may beat some of them
    best = {tuple(t.values) for t in study.best_trials}
    ours = {tuple(v) for name, v in values.items() if name != search_mod.REFERENCE}
    assert ours <= best
    ptq = report.baseline["ptq"]
    ref = (ptq["int8_accuracy"], ptq["weight_bytes"], ptq["latency_ms"])
    assert all(dominates(ref, v) for v in best - ours)
    assert search_mod.REFERENCE in values or any(dominates(v, ref) for v in values.values())
    # and Optuna's plots read the study
    ax = optuna.visualization.matplotlib.plot_pareto_front(study, targets=lambda t: t.values[:2],
                                                           target_names=["int8", "bytes"])
    assert len(ax.collections[0].get_offsets()) == len(best)


def test_the_chosen_point_meets_the_targets_in_its_own_file(found, trained):
    report, _, _, _ = found
    _, _, (xt, yt), _ = trained
    c = report.chosen
    assert c is not None, report.missed
    assert os.path.isfile(c.tflite)
    accuracy = colopt.export.evaluate_tflite(c.tflite, xt, yt)
    assert report.baseline["fp32_accuracy"] - accuracy <= 0.2
    assert accuracy == pytest.approx(c.int8_accuracy)
    on_npu = colopt.targets.EthosU("ethos-u55-128").measure(c.tflite)  # compiled again
    assert on_npu.weight_bytes == c.deployed["weight_bytes"]
    meeting = [p for p in report.front
               if report.baseline["fp32_accuracy"] - p.int8_accuracy <= 0.2]
    assert c.deployed["weight_bytes"] == min(p.deployed["weight_bytes"] for p in meeting)
    assert colopt.export.inspect_tflite(c.tflite)  # the weights really are in the file
    assert c.settings["pruning"] in ("50%", "75%") and c.settings["clusters"] in (4, 8)


def test_prefixes_are_shared_and_the_users_model_is_untouched(found):
    report, out, model, before = found
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    trials = report.trials
    assert report.trials_run == sum(t["duplicate_of"] is None and t["state"] != "FAIL"
                                    for t in trials) == 4
    started = [t for t in trials if t["settings"]]
    # A node is trained once: one Prune epoch per sparsity, one Cluster epoch per
    # (sparsity, clusters) reached, one Quantize epoch per trial that was not stopped.
    pruned = {t["settings"]["pruning"] for t in started}
    clustered = {(t["settings"]["pruning"], t["settings"]["clusters"]) for t in started
                 if t["rungs"][1] is not None}
    quantized = [t for t in started if t["state"] == "COMPLETE"]
    assert report.epochs_run == len(pruned) + len(clustered) + len(quantized)
    assert report.epochs_run < report.epochs_grid == 4 * 3
    assert report.epochs_study == report.epochs_run  # one call: the study's are this call's
    # 75 % continues from the 50 % node when that was trained first
    order = [t["settings"]["pruning"] for t in sorted(started, key=lambda t: t["number"])]
    high = next(t for t in started if t["settings"]["pruning"] == "75%")
    assert high["settings"]["continued_from"] == ("50%" if order.index("50%")
                                                  < order.index("75%") else None)
    files = json.load(open(os.path.join(out, "search.json")))
    assert files["trials_run"] == 4 and len(files["front"]) == len(report.front)
    assert "Pareto front" in open(os.path.join(out, "search.md")).read()


def test_the_dashboard_shows_every_trial_with_its_settings(found):
    from test_dashboard import dashboard_client, run_data

    report, out, _, _ = found
    board = run_data(dashboard_client(os.path.join(out, "logs")), "report/colopt")["leaves"]
    assert board["kind"] == "search"
    names = {r["name"] for r in board["leaves"]}
    assert names == {f"trial {t['number']}" for t in report.trials if t["settings"]} | {
        search_mod.REFERENCE}
    assert all(r["settings"] for r in board["leaves"])
    assert board["chosen"] == report.chosen.name
    assert {r["name"] for r in board["leaves"] if r.get("on_front")} == \
        {p.name for p in report.front}


def test_an_equal_call_reuses_the_study_and_trains_nothing(found, trained):
    report, out, _, _ = found
    model, (x, y), (xt, yt), _ = trained
    again = colopt.search(model, x, y, validation_data=(xt, yt), out_dir=out,
                          target=colopt.targets.EthosU("ethos-u55-128"),
                          max_accuracy_drop=0.2, budget=4, space=SearchSpace(**SPACE),
                          batch_size=64, rate_policy="compiled", latency_runs=2)
    assert again.trials_run == 0 and again.epochs_run == 0
    assert [p.name for p in again.front] == [p.name for p in report.front]
    with pytest.raises(colopt.StateMismatch, match="search"):  # another space: refused
        colopt.search(model, x, y, validation_data=(xt, yt), out_dir=out, budget=4,
                      space=SearchSpace(**dict(SPACE, clusters=(4,))), batch_size=64,
                      rate_policy="compiled")


@pytest.mark.parametrize("kwargs, match", [
    (dict(budget=0), "budget"),
    (dict(space=dict(SPACE)), "SearchSpace"),
    (dict(storage="search.db"), "storage URL"),
    (dict(max_accuracy_drop=-1), "max_accuracy_drop"),
    (dict(target="ethos-u55"), "target"),
    (dict(log_dir="x"), "log_dir"),
])
def test_bad_input_is_refused_before_anything_is_written(trained, tmp_path, kwargs, match):
    model, (x, y), (xt, yt), _ = trained
    out = tmp_path / "s"
    with pytest.raises(ValueError, match=match):
        colopt.search(model, x, y, validation_data=(xt, yt), out_dir=out, **kwargs)
    assert not out.exists()


@pytest.mark.parametrize("space, match", [
    (dict(sparsity=(1.0,)), "sparsity"), (dict(clusters=(2,)), "clusters"),
    (dict(leave_out=("middle",)), "leave_out"), (dict(epochs=()), "epochs"),
    (dict(structure="2:4"), "structure"),
])
def test_a_bad_space_names_the_field(space, match):
    with pytest.raises(ValueError, match=match):
        SearchSpace(**space)


def test_settings_order_and_dominance():
    a = search_mod.settings_of({"pruning": "75%", "clusters": 4, "per_channel": False,
                                "leave_out": "none", "epochs": 1})
    b = dict(a, sparsity=0.5, pruning="50%", clusters=8)
    assert compresses_as_hard(a, b, 1) and not compresses_as_hard(b, a, 1)
    assert compresses_as_hard(b, a, 0) is False  # less sparse
    assert not compresses_as_hard(dict(a, leave_out="first"), a, 0)  # leaves a layer dense
    assert not compresses_as_hard(dict(a, epochs=2), b, 0)  # more fine-tuning
    assert not compresses_as_hard(dict(a, per_channel=True), dict(b, per_channel=False), 1)
    assert dominates((0.9, 10, 1.0), (0.8, 10, 1.0))
    assert not dominates((0.9, 10, 1.0), (0.9, 10, 1.0))
    assert not dominates((0.9, 10, 2.0), (0.8, 5, 1.0))
    assert SearchSpace(**SPACE).grid_points() == 4
    # 6 prunings x 3 cluster counts x 2 x 4 ways to leave layers out, each at 1, 2 and 4
    # epochs of each of the 3 phases
    assert SearchSpace().grid_epochs() == 6 * 3 * 2 * 4 * (3 * 1 + 3 * 2 + 3 * 4)


def _trial(number, settings, rung0, objectives=None, rung1=None):
    from optuna.distributions import CategoricalDistribution

    attrs = {"settings": settings, "rung0": rung0}
    if rung1 is not None:
        attrs["rung1"] = rung1
    if objectives:
        attrs["objectives"] = objectives
    return optuna.trial.create_trial(
        params={"pruning": settings["pruning"]},
        distributions={"pruning": CategoricalDistribution(["50%", "75%", "90%"])},
        values=list(objectives) if objectives else None, user_attrs=attrs,
        state=optuna.trial.TrialState.COMPLETE if objectives else
        optuna.trial.TrialState.PRUNED)


def test_a_weak_trial_is_stopped_and_told_why():
    s = {"pruning": "50%", "sparsity": 0.5, "structure": "unstructured", "clusters": 8,
         "per_channel": False, "leave_out": "none", "epochs": 1}
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    # trial 0 prunes harder and was more accurate after pruning: a 50 % trial at 0.70 stops
    study.add_trial(_trial(0, dict(s, pruning="75%", sparsity=0.75), 0.80, (0.82, 100, 1.0)))
    why = search_mod._weak(study, 5, s, 0, 0.70, 0.90, 0.01, None)
    assert why and "trial 0" in why and "compresses at least as hard" in why
    assert search_mod._weak(study, 5, s, 0, 0.80, 0.90, 0.01, None) is None  # within noise
    # the target, after clustering: trials 1 and 2 gained at most 2 points from there to
    # int8; 20 below with a 5-point target is out of reach, 6 below is not
    study.add_trial(_trial(1, dict(s, pruning="75%", sparsity=0.75), 0.80, (0.81, 90, 1.0),
                           rung1=0.80))
    s90 = dict(s, pruning="90%", sparsity=0.9)
    assert search_mod._weak(study, 5, s90, 1, 0.70, 0.90, 0.01, 0.05) is None  # one finished
    study.add_trial(_trial(2, dict(s, pruning="75%", sparsity=0.75, clusters=16), 0.80,
                           (0.82, 95, 1.0), rung1=0.80))
    # no finished trial meets a 5-point target yet (the best is 8 below): the front is what
    # there is to find, and nothing is stopped for the target
    assert search_mod._weak(study, 5, s90, 1, 0.70, 0.90, 0.01, 0.05) is None
    assert "out of reach" in search_mod._weak(study, 5, s90, 1, 0.70, 0.90, 0.01, 0.10)
    assert search_mod._weak(study, 5, s90, 1, 0.80, 0.90, 0.01, 0.10) is None
    assert search_mod._weak(study, 5, s90, 0, 0.70, 0.90, 0.01, 0.10) is None  # not after
    # pruning: the clustering's fine-tuning may still recover much


def _run_cli(folder, out, *extra, **popen):
    cmd = [sys.executable, "-m", "keras_colopt", "search", str(folder / "recipe.json"),
           "--model", str(folder / "model.keras"), "--data", str(folder / "data.npz"),
           "--out", str(out), "--quiet", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def test_a_killed_search_resumes_from_its_storage(trained, tmp_path, monkeypatch):
    model, (x, y), (xt, yt), folder = trained
    out = tmp_path / "killed"
    proc = _run_cli(folder, out)
    deadline = time.time() + 240
    done = []
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
            if os.path.exists(out / "search.db"):
                try:
                    done = [t.number for t in _study(out).trials
                            if t.state == optuna.trial.TrialState.COMPLETE]
                except Exception:  # noqa: BLE001 - the study is being created
                    continue
                if done:
                    break
    finally:
        proc.send_signal(signal.SIGKILL)
        output = proc.communicate()[0]
    assert done, output[-3000:]
    before = {t.number: t.values for t in _study(out).trials
              if t.state == optuna.trial.TrialState.COMPLETE}
    # The same call, in this process: the killed worker's trial is failed once its heartbeat
    # is older than the grace period, and run again.
    monkeypatch.setattr(search_mod, "GRACE_S", 1)
    monkeypatch.setattr(search_mod, "HEARTBEAT_S", 1)
    time.sleep(2)
    from keras_colopt.runs import load_model

    report = colopt.search(load_model(str(folder / "model.keras")), x, y,
                           validation_data=(xt, yt), out_dir=out, batch_size=64,
                           target=colopt.targets.EthosU("ethos-u55-128"), max_accuracy_drop=0.2,
                           budget=4, space=SearchSpace(**SPACE))
    after = _study(out).trials
    for number, values in before.items():  # finished trials are kept, not trained again
        assert after[number].values == values
    counted = [t for t in after if t.state in (optuna.trial.TrialState.COMPLETE,
                                               optuna.trial.TrialState.PRUNED)
               and t.user_attrs.get("duplicate_of") is None]
    assert len(counted) == 4
    mine = [t for t in counted if t.user_attrs["worker"]["pid"] == os.getpid()]
    assert report.trials_run == len(mine) == 4 - len([t for t in counted
                                                      if t.user_attrs["worker"]["pid"]
                                                      == proc.pid])
    assert not set(before) & {t.number for t in mine}
    assert not [t for t in after if t.state == optuna.trial.TrialState.RUNNING]


def _postgres_bin(name):
    found = shutil.which(name) or next(iter(sorted(glob.glob(
        f"/usr/lib/postgresql/*/bin/{name}"))), None)
    assert found, (f"{name} not found: the two-worker test needs Debian's postgresql "
                   "(`bash .ci/system-deps` installs it)")
    return found


@pytest.fixture
def postgres():
    """A PostgreSQL server on 127.0.0.1 for this test, stopped by its process id. As root,
    it runs as Debian's `postgres` user (PostgreSQL refuses root), in a folder of its own
    under /tmp (pytest's are private to root)."""
    import pathlib
    import tempfile

    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    home = pathlib.Path(tempfile.mkdtemp(prefix="colopt-pg-"))
    data = home / "data"
    data.mkdir(mode=0o700)
    if as_user:
        os.chmod(home, 0o755)
        shutil.chown(data, "postgres")
    init = subprocess.run(as_user + [_postgres_bin("initdb"), "-D", str(data), "-U", "postgres",
                                     "--auth=trust"], capture_output=True, text=True)
    assert init.returncode == 0, init.stdout + init.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(as_user + [_postgres_bin("postgres"), "-D", str(data), "-p",
                                         str(port), "-c", "listen_addresses=127.0.0.1", "-k",
                                         str(data)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        deadline = time.time() + 60
        while True:
            try:
                import sqlalchemy

                sqlalchemy.create_engine(url).connect().close()
                break
            except Exception:  # noqa: BLE001 - not up yet
                assert time.time() < deadline and server.poll() is None, "postgres did not start"
                time.sleep(0.3)
        yield url
    finally:
        server.send_signal(signal.SIGINT)  # fast shutdown
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(home, ignore_errors=True)


def test_two_workers_on_one_postgres_storage_run_distinct_trials(trained, tmp_path, postgres):
    _, _, _, folder = trained
    workers = [_run_cli(folder, tmp_path / f"worker{i}", "--storage", postgres, "--budget", "4")
               for i in range(2)]
    outputs = [w.communicate(timeout=400)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [o[-2000:] for o in outputs]
    names = {json.load(open(tmp_path / f"worker{i}" / "search.json"))["study_name"]
             for i in range(2)}
    assert len(names) == 1  # the same call on each machine joins one study
    study = optuna.load_study(study_name=names.pop(), storage=postgres)
    trained_trials = [t for t in study.trials if t.user_attrs.get("duplicate_of") is None
                      and t.state in (optuna.trial.TrialState.COMPLETE,
                                      optuna.trial.TrialState.PRUNED)]
    assert 4 <= len(trained_trials) <= 5  # the budget, and at most one more racing it
    pids = {t.user_attrs["worker"]["pid"] for t in trained_trials}
    assert len(pids) == 2, pids  # both workers trained trials
    points = [tuple(sorted(t.params.items())) for t in trained_trials]
    assert len(points) == len(set(points)) or len(trained_trials) == 5
    runs = [json.load(open(tmp_path / f"worker{i}" / "search.json"))["trials_run"]
            for i in range(2)]
    assert sum(runs) == len(trained_trials) and min(runs) >= 1
    assert not math.isnan(study.best_trials[0].values[0])


@pytest.mark.parametrize("data, key, match", [
    ({"search": {"space": {"clusters": [2]}}}, "search.space.clusters", "integers >= 3"),
    ({"search": {"budgett": 3}}, "search.budgett", "Did you mean 'budget'"),
    ({"search": {"max_accuracy_drop": "1e-2"}}, "search.max_accuracy_drop", "not a number"),
    ({"search": {"space": {"leave_out": ["middle"]}}}, "search.space.leave_out", "leave_out"),
    ({"phases": []}, None, "`search` mapping"),
])
def test_a_bad_search_recipe_names_its_key(data, key, match):
    from keras_colopt import recipe

    with pytest.raises(recipe.RecipeError, match=match) as e:
        recipe.search_from_dict(data, source="s.yaml")
    assert e.value.key == key


def test_the_command_refuses_a_bad_recipe_before_loading_anything(tmp_path, capsys):
    from keras_colopt import cli

    bad = tmp_path / "s.yaml"
    bad.write_text("search:\n  budget: 4\n  space: {clusters: [2, 4]}\n")
    rc = cli.main(["search", str(bad), "--model", str(tmp_path / "missing.keras"),
                   "--data", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "search.space.clusters" in err and "missing" not in err
    assert not (tmp_path / "o").exists()
