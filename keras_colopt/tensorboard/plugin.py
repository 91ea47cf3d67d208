"""The keras_colopt dashboard: a TensorBoard plugin.

Registered through the `tensorboard_plugins` entry point (see pyproject.toml), so installing
keras_colopt is all it takes: `tensorboard --logdir LOGS`, tab "keras_colopt". Data reaches the
frontend only through TensorBoard's data provider (`list_tensors` / `read_tensors` filtered on
this plugin's name), never by reading event files by path; the frontend is the static files in
`static/` (no build step, nothing fetched from elsewhere).

Routes, under `/data/plugin/keras_colopt/`:
- `index.js`, `static/<file>`: the frontend;
- `runs`: the runs that hold dashboard data, with what each holds;
- `tags?run=R`: the dashboard tags of one run;
- `data?run=R`: everything the dashboard shows of one run, assembled (`assemble`).
A missing, repeated or unknown parameter, or an unknown run, is a 400.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

from tensorboard import plugin_util
from tensorboard.backend import http_util
from tensorboard.data import provider
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from keras_colopt.tensorboard import metadata

log = logging.getLogger("keras_colopt")

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
_CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css", ".txt": "text/plain"}
_STATIC_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")
_DOWNSAMPLE = 100  # values per tag: one per tag is written, a few more after a resume
METRICS = ("sparsity", "unique", "unique_per_channel")


class ColoptPlugin(base_plugin.TBPlugin):
    """The keras_colopt dashboard (see the module docstring).

    TensorBoard loads it through the `tensorboard_plugins` entry point; tests and scripts
    can hand it to TensorBoard themselves.

    Args:
        context: TensorBoard's `base_plugin.TBContext`; only its `data_provider` is used.

    Example:
        >>> from tensorboard import default, program
        >>> tb = program.TensorBoard(plugins=default.get_plugins() + [ColoptPlugin])
        >>> tb.configure(logdir="colopt-demo/logs"); tb.launch()  # then #keras_colopt
    """

    plugin_name = metadata.PLUGIN_NAME

    def __init__(self, context):
        if context.data_provider is None:
            raise ValueError("ColoptPlugin reads its data through TensorBoard's data provider, "
                             "and the TBContext has none. Expected a context made by "
                             "TensorBoard (or one with data_provider=...). Received: "
                             "data_provider=None")
        self._provider = context.data_provider

    def is_active(self):
        """False: the tab is active when the data provider lists data of this plugin
        (TensorBoard checks `data_plugin_names()` itself, without asking this)."""
        return False

    def frontend_metadata(self):
        return base_plugin.FrontendMetadata(es_module_path="/index.js",
                                            tab_name="keras_colopt")

    def get_plugin_apps(self):
        return {"/index.js": self._serve_index, "/static/*": self._serve_static,
                "/runs": self._serve_runs, "/tags": self._serve_tags,
                "/data": self._serve_data}

    # ------------------------------------------------------------------ frontend files
    @wrappers.Request.application
    def _serve_index(self, request):
        if request.args:
            return _bad(request, f"index.js takes no parameters. Received: {sorted(request.args)}")
        return _file(request, "index.js")

    @wrappers.Request.application
    def _serve_static(self, request):
        name = request.path.split("/static/", 1)[1] if "/static/" in request.path else ""
        if not _STATIC_NAME.match(name) or os.path.splitext(name)[1] not in _CONTENT_TYPES:
            return _bad(request, "Expected the name of a file of the dashboard's static folder "
                                 f"(no path). Received: {name!r}")
        if name not in os.listdir(STATIC_DIR):
            return http_util.Respond(request, f"No static file {name!r}.", "text/plain",
                                     code=404)
        return _file(request, name)

    # ------------------------------------------------------------------ data
    def _list(self, request) -> Dict[str, dict]:
        ctx = plugin_util.context(request.environ)
        eid = plugin_util.experiment_id(request.environ)
        return self._provider.list_tensors(ctx, experiment_id=eid,
                                           plugin_name=metadata.PLUGIN_NAME)

    def _read(self, request, run: str) -> Dict[str, list]:
        ctx = plugin_util.context(request.environ)
        eid = plugin_util.experiment_id(request.environ)
        got = self._provider.read_tensors(
            ctx, experiment_id=eid, plugin_name=metadata.PLUGIN_NAME, downsample=_DOWNSAMPLE,
            run_tag_filter=provider.RunTagFilter(runs=[run]))
        return got.get(run, {})

    def _run_arg(self, request) -> Tuple[Optional[str], Optional[object], dict]:
        """(run, None, listing) or (None, a 400 response, {})."""
        extra = sorted(set(request.args) - {"run"})
        if extra:
            return None, _bad(request, f"Unknown parameter(s) {extra}. Expected only `run`."), {}
        runs = request.args.getlist("run")
        if len(runs) != 1 or not runs[0]:
            return None, _bad(request, "Expected one `run` parameter naming a run (see "
                                       f"`runs`). Received: run={runs!r}"), {}
        listing = self._list(request)
        if runs[0] not in listing:
            return None, _bad(request, f"No keras_colopt data in run {runs[0]!r}. Expected "
                                       f"one of {sorted(listing)}."), {}
        return runs[0], None, listing

    @wrappers.Request.application
    def _serve_runs(self, request):
        if request.args:
            return _bad(request, f"runs takes no parameters. Received: {sorted(request.args)}")
        listing = self._list(request)
        runs = []
        for run, tags in listing.items():
            kinds = defaultdict(int)
            for tag in tags:
                kind = metadata.kind_of(tag)
                if kind is not None:
                    kinds[kind] += 1
            epochs = [ts.max_step for tag, ts in tags.items()
                      if metadata.kind_of(tag) == "epoch"]
            runs.append({"run": run, "label": metadata.run_label(run), "kinds": dict(kinds),
                         "epochs": len(epochs), "last_epoch": max(epochs, default=None),
                         "updated": max((ts.max_wall_time for ts in tags.values()),
                                        default=None)})
        runs.sort(key=lambda r: (r["label"], r["run"]))
        return _json(request, {"runs": runs})

    @wrappers.Request.application
    def _serve_tags(self, request):
        run, error, listing = self._run_arg(request)
        if error is not None:
            return error
        tags = {tag: {"kind": metadata.kind_of(tag), "max_step": ts.max_step,
                      "updated": ts.max_wall_time} for tag, ts in listing[run].items()}
        return _json(request, {"run": run, "label": metadata.run_label(run), "tags": tags})

    @wrappers.Request.application
    def _serve_data(self, request):
        run, error, _ = self._run_arg(request)
        if error is not None:
            return error
        records, unreadable = {}, []
        for tag, data in self._read(request, run).items():
            values = []
            for datum in data:
                value = _decode(datum.numpy)
                if value is None:
                    unreadable.append(tag)
                    continue
                values.append((int(datum.step), float(datum.wall_time), value))
            if values:
                records[tag] = values
        out = assemble(records)
        out.update(run=run, label=metadata.run_label(run), unreadable=sorted(set(unreadable)))
        return _json(request, out)


# ---------------------------------------------------------------------------- responses
def _bad(request, message: str):
    return http_util.Respond(request, message, "text/plain", code=400)


def _json(request, value):
    return http_util.Respond(request, json.dumps(value, allow_nan=False), "application/json")


def _file(request, name: str):
    with open(os.path.join(STATIC_DIR, name), "rb") as f:
        data = f.read()
    return http_util.Respond(request, data, _CONTENT_TYPES[os.path.splitext(name)[1]])


def _decode(array) -> Optional[dict]:
    """The JSON document of one summary value, or None when it is not one."""
    try:
        raw = array.item() if hasattr(array, "item") else array
        value = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw,
                           parse_constant=lambda _: None)  # NaN, Infinity: not JSON
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


# ---------------------------------------------------------------------------- assembly
def _layer_order(lists: List[List[str]]) -> List[str]:
    """Layer names in model order: the newest list's order; a name only earlier lists know is
    placed after the name it followed there."""
    order: List[str] = []
    for names in lists:  # newest first
        prev = None
        for name in names:
            if name not in order:
                order.insert(order.index(prev) + 1 if prev is not None else 0, name)
            prev = name
    return order


def assemble(records: Dict[str, List[Tuple[int, float, dict]]]) -> dict:
    """Everything the dashboard shows of one run, from its summaries.

    Args:
        records: `{tag: [(step, wall time, JSON document)]}`, oldest first; the last value
            of a tag is the one that counts (a resumed run writes an epoch again).

    Returns:
        A dict: `layers` (model order), `epochs` (the axis: every epoch seen or planned),
        `phases` (one band per run of epochs with the same phase: label, start, end
        exclusive, whether reached), `epoch_phase`, `metrics` (`{sparsity, unique,
        unique_per_channel}`: a row per layer, a value or None per epoch), `weights` and
        `per_channel` per layer, `invariants` (per-layer status per epoch, every check,
        the violations), `tflite` (one table per exported file), `leaves` (`explore`'s
        report or None), `plan`, `last_epoch`, `total_epochs`, `updated`, `version`.
    """
    latest = {tag: values[-1] for tag, values in records.items() if values}
    per_epoch: Dict[int, dict] = {}
    checks: Dict[int, List[dict]] = defaultdict(list)
    plan, leaves, tflite = None, None, []
    for tag in sorted(latest):
        step, wall, value = latest[tag]
        kind = metadata.kind_of(tag)
        epoch = value.get("epoch", step)
        if kind in ("epoch", "invariants") and (isinstance(epoch, bool)
                                                or not isinstance(epoch, int)):
            epoch = step  # a document without a usable epoch: its step says which
        if kind == "epoch":
            per_epoch[epoch] = value
        elif kind == "invariants":
            checks[epoch].append(value)
        elif kind == "plan":
            plan = value
        elif kind == "leaves":
            leaves = value
        elif kind == "tflite":
            tflite.append(dict(value, updated=wall))
    tflite.sort(key=lambda t: t["updated"])

    newest_first = [_names(per_epoch[e]) for e in sorted(per_epoch, reverse=True)]
    newest_first += [_names(c) for e in sorted(checks, reverse=True) for c in checks[e]]
    layers = _layer_order(newest_first)
    index = {name: i for i, name in enumerate(layers)}

    planned = [p for p in (plan or {}).get("phases", []) if p.get("end", 0) > p.get("start", 0)]
    seen = set(per_epoch) | set(checks)
    span = seen | {e for p in planned for e in range(p["start"], p["end"])}
    epochs = list(range(min(span), max(span) + 1)) if span else []
    col = {e: j for j, e in enumerate(epochs)}

    def phase_of(e):
        for p in planned:
            if p["start"] <= e < p["end"]:
                return p["label"]
        if e in per_epoch and per_epoch[e].get("wrappers"):
            return _wrappers_label(per_epoch[e]["wrappers"])
        phases = [c.get("phase") for c in checks.get(e, []) if c.get("phase")]
        return phases[0] if phases else "unknown"

    epoch_phase = [phase_of(e) for e in epochs]
    bands = []
    for e, label in zip(epochs, epoch_phase):
        if bands and bands[-1]["label"] == label and bands[-1]["end"] == e:
            bands[-1]["end"] = e + 1
            bands[-1]["reached"] = bands[-1]["reached"] or e in seen
        else:
            bands.append({"label": label, "start": e, "end": e + 1, "reached": e in seen})

    metrics = {m: [[None] * len(epochs) for _ in layers] for m in METRICS}
    weights: List[Optional[int]] = [None] * len(layers)
    per_channel = [False] * len(layers)
    for e in sorted(per_epoch):
        for L in _rows(per_epoch[e]):
            i = index[L["name"]]
            for m in METRICS:
                metrics[m][i][col[e]] = L.get(m)
            weights[i] = L.get("size")
            per_channel[i] = bool(L.get("per_channel"))

    status = [[None] * len(epochs) for _ in layers]
    flat, violations, checked = {}, [], 0
    for e in sorted(checks):
        rows = []
        for c in sorted(checks[e], key=lambda c: str(c.get("source"))):
            for L in _rows(c):
                i = index[L["name"]]
                broken = L.get("violations") or []
                checked += 1
                if status[i][col[e]] != "violation":
                    status[i][col[e]] = "violation" if broken else "ok"
                rows.append({"layer": L["name"], "source": c.get("source"),
                             "phase": c.get("phase"), "expected": L.get("expected", {}),
                             "found": L.get("found", {}), "violations": broken})
                violations += [dict(v, epoch=e, layer=L["name"], phase=c.get("phase"))
                               for v in broken]
        rows.sort(key=lambda r: index[r["layer"]])
        flat[str(e)] = rows

    walls = [v[1] for v in latest.values()]
    last = max(seen) if seen else None
    return {
        "layers": layers, "epochs": epochs, "phases": bands, "epoch_phase": epoch_phase,
        "metrics": metrics, "weights": weights, "per_channel": per_channel,
        "invariants": {"status": status, "checks": flat, "violations": violations,
                       "checked": checked, "epochs": sorted(checks)},
        "tflite": tflite, "leaves": leaves, "plan": plan,
        "last_epoch": last, "total_epochs": (plan or {}).get("total_epochs"),
        "updated": max(walls, default=None),
        "version": f"{len(latest)}:{sum(len(v) for v in records.values())}:{max(walls, default=0)}",
    }


def _rows(doc: dict) -> List[dict]:
    """The per-layer rows of a document, each a dict with a string `name`."""
    rows = doc.get("layers")
    return [L for L in rows if isinstance(L, dict) and isinstance(L.get("name"), str)] \
        if isinstance(rows, list) else []


def _names(doc: dict) -> List[str]:
    return [L["name"] for L in _rows(doc)]


def _wrappers_label(kind: str) -> str:
    """The phase shown for an epoch no plan covers, from what the model's wrappers do."""
    return {"none": "no wrappers"}.get(kind, kind)
