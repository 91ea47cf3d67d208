"""Recipes: phases -> YAML/JSON -> phases, and every way a recipe file can be wrong."""

import json
import os
import stat

import pytest
import yaml

import keras_colopt as colopt
from keras_colopt import Cluster, Prune, Quantize, Train, export, recipe
from keras_colopt.recipe import RecipeError

from test_phases import PHASE_SETTINGS

NON_DEFAULT = [cls(**kwargs) for cls, kwargs in PHASE_SETTINGS]


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
@pytest.mark.parametrize("phase", NON_DEFAULT, ids=lambda p: type(p).__name__)
def test_every_phase_round_trips_with_non_default_arguments(tmp_path, suffix, phase):
    # A Quantize that preserves sparsity and clusters needs the phases that made them.
    before = [Prune(sparsity=0.5, epochs=1), Cluster(clusters=8, epochs=1)] \
        if phase.kind == "quantize" else []
    path = recipe.dump(before + [phase], tmp_path / f"r{suffix}")
    r = recipe.load(path)
    assert r.phases == before + [phase]
    assert r.phases[-1].get_config() == phase.get_config()
    assert r.source == os.fspath(path)
    # The file is plain data of the format its suffix names.
    text = (tmp_path / f"r{suffix}").read_text()
    data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    assert list(data["phases"][-1]) == [phase.kind]


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_full_recipe_round_trips_with_sections(tmp_path, suffix):
    phases = [Train(epochs=15, learning_rate=1e-5), Prune(sparsity=0.75, epochs=4),
              Cluster(clusters=8, epochs=3, per_channel=True), Quantize(epochs=3)]
    path = recipe.dump(phases, tmp_path / f"full{suffix}", fit={"batch_size": 64, "shuffle": False,
                                                               "invariant_guard": "warn"},
                       export={"quantization": "dynamic"})
    r = recipe.load(path)
    assert r.phases == phases
    assert r.fit == {"batch_size": 64, "shuffle": False, "invariant_guard": "warn"}
    assert r.quantization == "dynamic"
    assert [p.label for p in r.plan] == ["Train", "Prune",
                                         "Cluster (sparsity-preserving) per channel", "PCQAT"]
    assert r.to_dict() == recipe.to_recipe(phases, fit=r.fit, export=r.export)


def test_yaml_reads_like_the_documented_format(tmp_path):
    text = recipe.dumps([Train(epochs=15), Prune(sparsity=0.5, epochs=4)],
                        export={"quantization": "int8"})
    assert text.splitlines()[:2] == ["phases:", "- train: {epochs: 15}"]
    assert "sparsity: 0.5" in text and text.rstrip().endswith("export: {quantization: int8}")
    # `None` means "not set" and is left out; other defaults are written.
    assert "null" not in text and "schedule: polynomial" in text


def test_hand_written_recipe_with_defaults_left_out(tmp_path):
    path = _write(tmp_path, "r.yml", "phases:\n  - train: {epochs: 2}\n"
                  "  - cluster: {clusters: 4, epochs: 1}   # a comment\n"
                  "  - quantize: {epochs: 1}\n")
    r = recipe.load(path)
    assert r.phases == [Train(epochs=2), Cluster(clusters=4, epochs=1), Quantize(epochs=1)]
    assert (r.fit, r.export, r.quantization) == ({}, {}, "int8")


def test_empty_sections_read_as_absent(tmp_path):
    path = _write(tmp_path, "r.yaml", "phases: [{train: {epochs: 1}}]\nfit:\nexport:\n")
    r = recipe.load(path)
    assert (r.fit, r.export, r.quantization) == ({}, {}, "int8")


def test_recipe_is_exported_and_shares_the_export_quantizations():
    assert recipe.QUANTIZATIONS is export.QUANTIZATIONS
    assert colopt.recipe is recipe


def test_dump_is_atomic_and_keeps_a_good_file_on_failure(tmp_path):
    path = tmp_path / "r.yaml"
    recipe.dump([Train(epochs=1)], path)
    before = path.read_bytes()
    with pytest.raises(RecipeError):
        recipe.dump([Train(epochs=1), Prune(sparsity=0.5, epochs=1, layers=callable)], path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["r.yaml"]  # no temporary file left behind
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_callable_layers_are_refused_on_dump_with_the_fix(tmp_path):
    def dense_only(layer):
        return layer.name.startswith("dense")

    with pytest.raises(RecipeError) as info:
        recipe.dump([Train(epochs=1), Cluster(clusters=8, epochs=1, layers=dense_only)],
                    tmp_path / "r.yaml")
    msg = str(info.value)
    assert msg.startswith("phases[1].cluster.layers: ")
    assert "dense_only" in msg and "list of layer names" in msg and "Received: layers=" in msg
    assert not (tmp_path / "r.yaml").exists()


@pytest.mark.parametrize("phases,sections,words", [
    ([Cluster(clusters=8, epochs=1), Prune(sparsity=0.5, epochs=1)], {},
     ["phases: phases[1] Prune comes after phases[0] Cluster", "Train -> Prune"]),
    ([Train(epochs=1)], {"export": {"quantization": "int4"}},
     ["export.quantization", "'int8', 'dynamic', 'float16', 'none'",
      "Received: quantization='int4'"]),
    ([Train(epochs=1)], {"fitt": {}},
     ["fitt: unknown top-level key", "['phases', 'fit', 'export']"]),
    (Train(epochs=1), {}, ["must be a list of phases"]),
])
def test_dump_refuses_what_load_would_refuse(tmp_path, phases, sections, words):
    with pytest.raises(RecipeError) as info:
        recipe.dump(phases, tmp_path / "r.yaml", **sections)
    for w in words:
        assert w in str(info.value)
    assert not (tmp_path / "r.yaml").exists()


@pytest.mark.parametrize("text,key,words", [
    # Unknown keys: at the top level, in a phase, an unknown phase kind; each with the allowed ones.
    ("phases: [{train: {epochs: 1}}]\nexprt: {quantization: int8}\n", "exprt",
     ["unknown top-level key 'exprt'", "['phases', 'fit', 'export']", "Did you mean 'export'?"]),
    ("phases:\n  - cluster: {clusterz: 8, epochs: 1}\n", "phases[0].cluster.clusterz",
     ["unknown Cluster argument 'clusterz'", "'clusters', 'epochs', 'init'",
      "Did you mean 'clusters'?", "Received: clusterz=8"]),
    ("phases:\n  - train: {epochs: 1}\n  - pruning: {epochs: 1}\n", "phases[1]",
     ["unknown phase kind 'pruning'", "['train', 'prune', 'cluster', 'quantize']"]),
    ("phases: [{train: {epochs: 1}}]\nfit: {batch: 3}\n", "fit.batch",
     ["unknown fit setting 'batch'", "'batch_size', 'shuffle', 'invariant_guard'"]),
    ("phases: [{train: {epochs: 1}}]\nexport: {quant: int8}\n", "export.quant",
     ["unknown export setting", "['quantization']"]),
    # Wrong types.
    ("phases:\n  - train: {epochs: 1}\n  - cluster: {clusters: eight, epochs: 1}\n",
     "phases[1].cluster.clusters", ["must be an integer >= 2", "Received: clusters='eight'"]),
    ("phases:\n  - cluster: {clusters: 8, epochs: 1, per_channel: 1}\n",
     "phases[0].cluster.per_channel", ["True or False", "Received: per_channel=1"]),
    ("phases:\n  - prune: {epochs: 1, layers: conv}\n", "phases[0].prune.layers",
     ["a list of layer names", "layers=['conv']"]),
    ("phases:\n  - train: {epochs: 1, learning_rate: 1e-4}\n", "phases[0].train.learning_rate",
     ["is the text '1e-4', not a number", "0.0001", "Received: learning_rate='1e-4'"]),
    ("phases:\n  - train: {epochs: '3'}\n", "phases[0].train.epochs",
     ["quoted numbers are text", "Remove the quotes"]),
    ("phases:\n  - train: 3\n", "phases[0].train", ["must be a mapping", "Received: train=3"]),
    ("phases:\n  - train\n", "phases[0]",
     ["one key, the phase kind", "Received: phases[0]='train'"]),
    ("phases: {train: {epochs: 1}}\n", "phases", ["non-empty list of phases"]),
    ("phases: []\n", "phases", ["non-empty list of phases", "Received: phases=[]"]),
    ("phases: [{train: {epochs: 1}}]\nfit: {batch_size: 0}\n", "fit.batch_size",
     ["an int >= 1", "Received: batch_size=0"]),
    ("phases: [{train: {epochs: 1}}]\nfit: {invariant_guard: maybe}\n", "fit.invariant_guard",
     ["[true, false, 'warn']", "Received: invariant_guard='maybe'"]),
    ("phases: [{train: {epochs: 1}}]\nfit: [1]\n", "fit", ["must be a mapping"]),
    ("phases: [{train: {epochs: 1}}]\nexport: []\n", "export", ["must be a mapping"]),
    # Out of range: the phase's own message, prefixed with the path.
    ("phases:\n  - train: {epochs: 2}\n  - prune: {sparsity: 0.5, epochs: 1}\n"
     + "  - cluster: {clusters: 1, epochs: 3}\n", "phases[2].cluster.clusters",
     ["Cluster: `clusters` must be an integer >= 2", "an int >= 2", "Received: clusters=1"]),
    ("phases:\n  - prune: {sparsity: 1.5, epochs: 1}\n", "phases[0].prune.sparsity",
     ["0 <= sparsity < 1", "Received: sparsity=1.5"]),
    ("phases:\n  - prune: {sparsity: 0.5, epochs: 0}\n", "phases[0].prune.epochs",
     ["an int >= 1", "Received: epochs=0"]),
    ("phases:\n  - prune: {sparsity: 0.5}\n", "phases[0].prune.epochs",
     ["needs `epochs`", "Received: epochs=None"]),
    ("phases:\n  - cluster: {clusters: 8, epochs: 1, init: kmeans}\n", "phases[0].cluster.init",
     ["('kmeans++', 'linear', 'density', 'random')", "Received: init='kmeans'"]),
    ("phases:\n  - quantize: {epochs: 1, preserve: all}\n", "phases[0].quantize.preserve",
     ["'sparsity+clusters'", "Received: preserve='all'"]),
    ("phases:\n  - train: {epochs: 1, learning_rate: .inf}\n", "phases[0].train.learning_rate",
     ["finite", "Received: learning_rate=inf"]),
    # Bad order / combination: PlanError's message, naming the phases and the fix.
    ("phases:\n  - quantize: {epochs: 1}\n  - train: {epochs: 1}\n", "phases",
     ["phases[1] Train comes after phases[0] Quantize", "Train -> Prune -> Cluster -> Quantize"]),
    ("phases:\n  - prune: {sparsity: 0.5, epochs: 1}\n  - prune: {sparsity: 0.5, epochs: 1}\n",
     "phases", ["repeats", "Merge them"]),
    ("phases:\n  - prune: {sparsity: 0.5, epochs: 1}\n  - cluster: {clusters: 2, epochs: 1}\n",
     "phases", ["clusters >= 3", "preserve_sparsity=False"]),
])
def test_bad_recipes_name_the_key_and_the_allowed_values(tmp_path, text, key, words):
    path = _write(tmp_path, "bad.yaml", text)
    with pytest.raises(RecipeError) as info:
        recipe.load(path)
    err = info.value
    assert isinstance(err, ValueError) and err.key == key
    assert str(err).startswith(f"{path}: {key}: "), str(err)
    for w in words:
        assert w in str(err), (w, str(err))
    assert "Received:" in str(err)


def test_json_errors_name_the_same_keys(tmp_path):
    path = _write(tmp_path, "bad.json", json.dumps(
        {"phases": [{"train": {"epochs": 1}}, {"cluster": {"clusters": 1, "epochs": 1}}]}))
    with pytest.raises(RecipeError, match=r"phases\[1\]\.cluster\.clusters: .*Received: "
                                          r"clusters=1"):
        recipe.load(path)


def test_plan_error_is_the_cause_of_an_order_error(tmp_path):
    path = _write(tmp_path, "r.yaml", "phases: [{quantize: {epochs: 1}}, {cluster: {epochs: 1}}]")
    with pytest.raises(RecipeError) as info:
        recipe.load(path)
    assert isinstance(info.value.__cause__, colopt.PlanError)


@pytest.mark.parametrize("name,content,line,words", [
    ("garbage.yaml", bytes(range(256)) * 4, 2, ["not a UTF-8 text file", "byte 0x80"]),  # \n at 10
    ("nul.yaml", b"phases:\n\x00\x01\x02", 2, ["binary file"]),
    ("tabs.yaml", "phases:\n\t- train: {epochs: 1}\n", 2,
     ["not valid YAML", "found character '\\t'", "use spaces"]),
    ("mess.yaml", "phases:\n  - train: {epochs: 1}\n\t  - prune: {epochs: 1\n", 3,
     ["not valid YAML"]),
    ("list.yaml", "- train: {epochs: 1}\n- prune: {epochs: 1}\n", None,
     ["must be a mapping with a `phases` list", "Received: a list"]),
    ("scalar.yaml", "just some words\n", None, ["Received: a str: 'just some words'"]),
    ("empty.yaml", "", None, ["the recipe is empty"]),
    ("two.yaml", "phases: []\n---\nphases: []\n", 2,
     ["not valid YAML: expected a single document in the stream, but found another document"]),
    ("dup.yaml", "phases:\n  - prune: {sparsity: 0.5, epochs: 2,\n      epochs: 4}\n", 3,
     ["'epochs' appears twice", "Remove one"]),
    ("bad.json", '{"phases": [{"train": {"epochs": 1}},]}', 1, ["not valid JSON", "column"]),
    ("dup.json", '{"phases": [{"train": {"epochs": 1, "epochs": 2}}]}', None,
     ["'epochs' appears twice"]),
    ("recipe.toml", "phases = []", None, ["unknown recipe file suffix '.toml'", "'.yaml'"]),
])
def test_files_that_are_not_recipes_name_the_file_and_line(tmp_path, name, content, line, words):
    path = _write(tmp_path, name, content)
    with pytest.raises(RecipeError) as info:
        recipe.load(path)
    msg = str(info.value)
    assert info.value.line == line
    assert msg.startswith(str(path) + (f", line {line}: " if line else ": ")), msg
    for w in words:
        assert w in msg, (w, msg)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        recipe.load(tmp_path / "nope.yaml")
    (tmp_path / "d.yaml").mkdir()
    with pytest.raises(RecipeError, match="is a directory"):
        recipe.load(tmp_path / "d.yaml")


def test_yaml_aliases_are_walked_once(tmp_path):
    # A "billion laughs" shape: nine levels of nine aliases. safe_load shares the nodes; the
    # duplicate-key walk must too, or this takes 9**9 steps.
    lines = ["a0: &a0 [x]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]"
                               for i in range(1, 10)]
    path = _write(tmp_path, "laughs.yaml", "\n".join(lines) + "\n")
    with pytest.raises(RecipeError, match="unknown top-level key 'a0'"):
        recipe.load(path)


def test_load_never_modifies_the_file(tmp_path):
    path = recipe.dump([Train(epochs=1), Quantize(epochs=1)], tmp_path / "r.yaml")
    before = (os.stat(path).st_mtime_ns, (tmp_path / "r.yaml").read_bytes())
    recipe.load(path)
    assert (os.stat(path).st_mtime_ns, (tmp_path / "r.yaml").read_bytes()) == before


def test_from_dict_does_not_modify_its_input():
    data = {"phases": [{"prune": {"sparsity": 0.5, "epochs": 2, "m_by_n": [2, 4]}}],
            "fit": {"batch_size": 8}}
    snapshot = json.dumps(data, sort_keys=True)
    r = recipe.from_dict(data)
    assert json.dumps(data, sort_keys=True) == snapshot
    assert r.phases[0].m_by_n == (2, 4)
