"""Recipes: a phase list (and a few run settings) as a small YAML or JSON file.

A recipe is a serialization of the Python objects, never the primary API: it
is built from each phase's `get_config()` and read back with `from_config`, so
every argument is validated by the phase itself. Reading checks everything a
recipe can get wrong (keys, types, ranges, the phase order) before any model
is loaded, and names the key, e.g. `phases[2].cluster.clusters`.

```yaml
phases:
  - train: {epochs: 15}
  - prune: {sparsity: 0.5, epochs: 4}
  - cluster: {clusters: 8, epochs: 3}
  - quantize: {epochs: 3}
fit: {batch_size: 64}          # optional: batch_size, shuffle, invariant_guard
export: {quantization: int8}   # optional: int8 (default), dynamic, float16, none
```

Example:
    >>> import keras_colopt as colopt
    >>> colopt.recipe.dump([colopt.Train(epochs=5), colopt.Prune(sparsity=0.5, epochs=3)],
    ...                    "recipe.yaml", export={"quantization": "int8"})
    >>> r = colopt.recipe.load("recipe.yaml")
    >>> result = colopt.collaborative_fit(model, x, y, phases=r.phases, **r.fit)
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import numbers
import os
import re
from typing import Any

from keras_colopt._files import write_atomic
from keras_colopt.export import QUANTIZATIONS
from keras_colopt.phases import PHASE_CLASSES, Phase
from keras_colopt.plan import Plan, PlanError, resolve

SUFFIXES = (".yaml", ".yml", ".json")
SECTIONS = ("phases", "fit", "export")
DEFAULT_QUANTIZATION = "int8"
_KINDS = {cls.kind: cls for cls in PHASE_CLASSES.values()}
_NUMERIC = ("epochs", "learning_rate", "sparsity", "initial_sparsity", "clusters", "batch_size")
_MAX_BYTES = 1 << 20
_NUMBER_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class RecipeError(ValueError):
    """A recipe that cannot be read or run as written.

    Attributes:
        key: where in the recipe, e.g. `"phases[2].cluster.clusters"`, or None.
        file: the recipe file, or None for a dict.
        line: the 1-based line in the file, when known.
    """

    def __init__(self, message: str, key: str | None = None, file=None,
                 line: int | None = None):
        where = ""
        if file is not None:
            where = os.fspath(file) + (f", line {line}" if line else "") + ": "
        if key:
            where += f"{key}: "
        super().__init__(where + message)
        self.key, self.file, self.line = key, file, line


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A validated recipe.

    Attributes:
        phases: the phase objects, in order.
        fit: `collaborative_fit` keyword arguments the recipe sets (only those
            given): `batch_size`, `shuffle`, `invariant_guard`.
        export: export settings the recipe sets (only those given):
            `quantization`.
        source: the file it was read from, or None.
    """

    phases: list[Phase]
    fit: dict[str, Any] = dataclasses.field(default_factory=dict)
    export: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: str | None = None

    @property
    def quantization(self) -> str:
        """The export quantization. Defaults to `"int8"`."""
        return self.export.get("quantization", DEFAULT_QUANTIZATION)

    @property
    def plan(self) -> Plan:
        """The resolved plan of `phases` (already checked when the recipe was made)."""
        return resolve(self.phases)

    def to_dict(self) -> dict:
        """The recipe as plain data, as `dump` writes it."""
        return to_recipe(self.phases, fit=self.fit, export=self.export)


# --------------------------------------------------------------------------- writing

def _phase_entry(i: int, phase) -> dict:
    if not isinstance(phase, Phase):
        raise RecipeError(
            "not a phase. Expected an instance of Train, Prune, Cluster or Quantize. "
            f"Received: {phase!r}", key=f"phases[{i}]")
    cls = type(phase)
    args = {}
    for key, value in phase.get_config().items():
        if key == "layers" and callable(value):
            raise RecipeError(
                f"{cls.__name__}(layers=...) is a callable ({getattr(value, '__name__', value)}), "
                "which a recipe cannot store. Expected a list of layer names. Select the names "
                "in Python first, e.g. layers=[l.name for l in model.layers if predicate(l)], "
                f"then dump. Received: layers={value!r}", key=f"phases[{i}].{cls.kind}.layers")
        if key == "quantize_configs" and value is not None:
            kinds = ", ".join(f"{n!r}: {type(c).__name__}" for n, c in value.items())
            raise RecipeError(
                f"{cls.__name__}(quantize_configs=...) holds QuantizeConfig objects, which a "
                "recipe cannot store. Expected plain values only. Dump the phase without it, "
                f"and give it back in Python after loading: r = recipe.load(path); "
                f"r.phases[{i}] = {cls.__name__}.from_config({{**r.phases[{i}].get_config(), "
                f"'quantize_configs': {{...}}}}). Received: quantize_configs={{{kinds}}}",
                key=f"phases[{i}].{cls.kind}.quantize_configs")
        if value is None:
            continue  # not set (the phase's default): from_config restores it
        if isinstance(value, tuple):
            value = list(value)
        if key == "layers":
            value = [str(n) for n in value]
        args[key] = value
    return {cls.kind: args}


def to_recipe(phases, **sections) -> dict:
    """The recipe of a phase list as plain data (what `dump` writes).

    Arguments that are `None` (not set) are omitted; every other argument is
    written, defaults included, so the file reads the same whatever later
    versions choose as defaults. The result is checked as
    `from_dict` would read it, so a recipe that could not be loaded back is
    never produced.

    Args:
        phases: a list of `Train`, `Prune`, `Cluster`, `Quantize`.
        **sections: optional `fit={...}` and `export={...}` (see `Recipe`).

    Returns:
        `{"phases": [{kind: {args}}, ...], "fit": {...}, "export": {...}}`.

    Raises:
        RecipeError: a phase uses a callable `layers=` selector or holds
            `quantize_configs` (objects, not plain values), a section
            is unknown or invalid, or the phase order is refused by the plan.
    """
    if isinstance(phases, Phase) or not isinstance(phases, (list, tuple)):
        raise RecipeError(
            "`phases` must be a list of phases. Expected e.g. [Train(epochs=5), "
            f"Prune(sparsity=0.5, epochs=3)]. Received: phases={phases!r}")
    data = {"phases": [_phase_entry(i, p) for i, p in enumerate(phases)]}
    for name, value in sections.items():
        data[name] = dict(value) if isinstance(value, dict) else value
    from_dict(data)
    order = {name: i for i, name in enumerate(SECTIONS)}
    return {k: data[k] for k in sorted(data, key=order.get) if k == "phases" or data[k]}


def _format_of(path) -> str:
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in SUFFIXES:
        raise RecipeError(
            f"unknown recipe file suffix {suffix or '(none)'!r}. Expected one of {SUFFIXES}: "
            "the suffix picks YAML or JSON. Rename the file. "
            f"Received: path={os.fspath(path)!r}", file=path)
    return "json" if suffix == ".json" else "yaml"


def _check_fmt(fmt) -> None:
    if fmt not in ("yaml", "json"):
        raise RecipeError(f"unknown format. Expected 'yaml' or 'json'. Received: fmt={fmt!r}")


def dumps(phases, fmt: str = "yaml", **sections) -> str:
    """The recipe of a phase list as YAML or JSON text (see `to_recipe`).

    Args:
        phases: a list of `Train`, `Prune`, `Cluster`, `Quantize`.
        fmt: `"yaml"` or `"json"`. Defaults to `"yaml"`.
        **sections: optional `fit={...}` and `export={...}`.
    """
    _check_fmt(fmt)
    data = to_recipe(phases, **sections)
    if fmt == "json":
        return json.dumps(data, indent=2, allow_nan=False) + "\n"
    import yaml

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, allow_unicode=True)


def dump(phases, path, **sections) -> str:
    """Writes the recipe of a phase list to `path` (YAML or JSON by its suffix).

    The file is written atomically (a temporary file, then a rename).

    Args:
        phases: a list of `Train`, `Prune`, `Cluster`, `Quantize`.
        path: a `.yaml`, `.yml` or `.json` file; its folder must exist.
        **sections: optional `fit={...}` and `export={...}`.

    Returns:
        `path`.

    Example:
        >>> dump([Train(epochs=5), Quantize(epochs=2)], "qat.yaml",
        ...      export={"quantization": "int8"})
    """
    text = dumps(phases, _format_of(path), **sections)
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(folder):
        raise RecipeError(f"cannot write {os.fspath(path)!r}: directory {folder!r} does not "
                          "exist. Expected an existing directory. Create it first. "
                          f"Received: path={os.fspath(path)!r}")
    return write_atomic(path, text)


# --------------------------------------------------------------------------- reading

def _fail(message: str, key: str, file, /, **received):
    got = ", ".join(f"{k}={v!r}" for k, v in received.items())
    raise RecipeError(f"{message} Received: {got}", key=key, file=file)


def _check_keys(d: dict, allowed, key: str, file, what: str) -> None:
    for k, v in d.items():
        if k not in allowed:
            close = difflib.get_close_matches(str(k), [str(a) for a in allowed], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            where = f"{key}.{k}" if key else str(k)
            _fail(f"unknown {what} {k!r}. Expected one of {list(allowed)}.{hint}",
                  where, file, **{str(k): v})


def _check_not_yaml_text(args: dict, key: str, file) -> None:
    """YAML 1.1 (PyYAML) reads `1e-4` as text: say so instead of 'must be a number'."""
    for k, v in args.items():
        if k in _NUMERIC and isinstance(v, str) and _NUMBER_TEXT.fullmatch(v.strip()):
            why, fix = "quoted numbers are text", f"Remove the quotes: {k}: {v.strip()}."
            if "e" in v.lower():
                why = "YAML 1.1 reads an exponent without a dot in the mantissa as text"
                fix = f"Write it as {float(v)!r} (or 1.0e-4 rather than 1e-4)."
            _fail(f"{k!r} is the text {v!r}, not a number: {why}. Expected a number. {fix}",
                  f"{key}.{k}", file, **{k: v})


def _phase_from(i: int, entry, file) -> Phase:
    key = f"phases[{i}]"
    kinds = list(_KINDS)
    if not isinstance(entry, dict) or len(entry) != 1:
        _fail(f"each phase must be a mapping with one key, the phase kind, e.g. "
              f"`- prune: {{sparsity: 0.5, epochs: 2}}`. Expected one of {kinds} as the key.",
              key, file, **{key: entry})
    ((kind, args),) = entry.items()
    if kind not in _KINDS:
        close = difflib.get_close_matches(str(kind), kinds, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        _fail(f"unknown phase kind {kind!r}. Expected one of {kinds}.{hint}", key, file,
              kind=kind)
    cls = _KINDS[kind]
    key = f"{key}.{kind}"
    if not isinstance(args, dict):
        _fail(f"the arguments of a {kind} phase must be a mapping, e.g. `{kind}: {{epochs: 2}}`. "
              "Expected a mapping of argument names to values.", key, file, **{kind: args})
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    _check_keys(args, allowed, key, file, f"{cls.__name__} argument")
    _check_not_yaml_text(args, key, file)
    if "epochs" not in args:
        _fail(f"a {kind} phase needs `epochs`. Expected a positive integer, e.g. "
              f"`{kind}: {{epochs: 2}}`.", f"{key}.epochs", file, epochs=None)
    try:
        return cls.from_config(dict(args))
    except (ValueError, TypeError) as e:
        # The phase's own message names what, expected, fix and `Received: name=value`.
        named = re.findall(r"Received: (\w+)=", str(e))
        sub = f"{key}.{named[-1]}" if named and named[-1] in args else key
        raise RecipeError(str(e), key=sub, file=file) from e


def _check_fit(fit, file) -> dict:
    key = "fit"
    if not isinstance(fit, dict):
        _fail("`fit` must be a mapping, e.g. `fit: {batch_size: 64}`.", key, file, fit=fit)
    _check_keys(fit, ("batch_size", "shuffle", "invariant_guard"), key, file, "fit setting")
    _check_not_yaml_text(fit, key, file)
    bs = fit.get("batch_size")
    if bs is not None and (isinstance(bs, bool) or not isinstance(bs, numbers.Integral)
                           or bs < 1):
        _fail("`batch_size` must be a positive integer. Expected an int >= 1 (or leave it out "
              "for Keras' 32).", "fit.batch_size", file, batch_size=bs)
    if "shuffle" in fit and not isinstance(fit["shuffle"], bool):
        _fail("`shuffle` must be true or false. Expected a bool.", "fit.shuffle", file,
              shuffle=fit["shuffle"])
    guard = fit.get("invariant_guard", True)
    if not (guard is True or guard is False or guard == "warn"):
        _fail("`invariant_guard` must be true, false or 'warn'. Expected one of [true, false, "
              "'warn']: true raises at the first broken invariant, 'warn' only warns.",
              "fit.invariant_guard", file, invariant_guard=guard)
    return dict(fit)


def _check_export(export, file) -> dict:
    if not isinstance(export, dict):
        _fail("`export` must be a mapping, e.g. `export: {quantization: int8}`.", "export",
              file, export=export)
    _check_keys(export, ("quantization",), "export", file, "export setting")
    q = export.get("quantization", DEFAULT_QUANTIZATION)
    if q not in QUANTIZATIONS:
        _fail(f"unknown `quantization`. Expected one of {list(QUANTIZATIONS)}: int8 for "
              "integer-only deployment (the default), dynamic for int8 weights with float "
              "activations, float16, or none.", "export.quantization", file, quantization=q)
    return dict(export)


def from_dict(data, *, source=None) -> Recipe:
    """Validates plain recipe data (as read from YAML/JSON) and builds a `Recipe`.

    Args:
        data: `{"phases": [...], "fit": {...}, "export": {...}}`.
        source: the file the data came from, named in errors. Defaults to
            `None`.

    Returns:
        A `Recipe` whose phase order has been checked with `plan.resolve`.

    Raises:
        RecipeError: naming the key (e.g. `phases[2].cluster.clusters`), what
            was expected and the value received.
    """
    if not isinstance(data, dict):
        shown = repr(data) if len(repr(data)) <= 80 else repr(data)[:77] + "..."
        raise RecipeError(
            "a recipe must be a mapping with a `phases` list at the top level, e.g. "
            "`phases: [{train: {epochs: 5}}]`. Expected a mapping. Received: a "
            f"{type(data).__name__}: {shown}", file=source)
    _check_keys(data, SECTIONS, "", source, "top-level key")
    phases = data.get("phases")
    if not isinstance(phases, list) or not phases:
        _fail("`phases` must be a non-empty list of phases, e.g. "
              "`phases: [{train: {epochs: 5}}, {prune: {sparsity: 0.5, epochs: 3}}]`. "
              f"Expected a list whose items have one key out of {list(_KINDS)}.",
              "phases", source, phases=phases)
    objects = [_phase_from(i, entry, source) for i, entry in enumerate(phases)]
    # An empty section (`fit:` with nothing after it) reads as None: the same as leaving it out.
    fit = _check_fit({} if data.get("fit") is None else data["fit"], source)
    export = _check_export({} if data.get("export") is None else data["export"], source)
    try:
        resolve(objects)
    except PlanError as e:
        raise RecipeError(str(e), key="phases", file=source) from e
    return Recipe(phases=objects, fit=fit, export=export,
                  source=None if source is None else os.fspath(source))


def _read_text(path) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "does not exist"
        raise RecipeError(f"the recipe file {what}. Expected a .yaml, .yml or .json file. "
                          f"Received: path={path!r}", file=path)
    size = os.path.getsize(path)
    if size > _MAX_BYTES:
        raise RecipeError(f"the file is {size} bytes, too large for a recipe (a few lines of "
                          f"text). Expected a YAML or JSON file under {_MAX_BYTES} bytes. "
                          f"Check the path. Received: path={path!r}", file=path)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise RecipeError(f"not a UTF-8 text file (byte 0x{raw[e.start]:02x} at offset "
                          f"{e.start}). Expected a YAML or JSON recipe. Check that the path "
                          "names the recipe, not a model or data file.", file=path,
                          line=line) from None
    if "\x00" in text:
        raise RecipeError("a binary file (it contains NUL bytes). Expected a YAML or JSON "
                          "recipe. Check that the path names the recipe, not a model or data "
                          "file.", file=path, line=text[:text.index("\x00")].count("\n") + 1)
    return text


def _yaml_duplicate_key(text: str):
    """(key, line) of the first key repeated in one YAML mapping, or None: safe_load keeps
    the last value silently, which would drop half of `{epochs: 2, epochs: 4}`."""
    import yaml

    stack = [yaml.compose(text, Loader=yaml.SafeLoader)]
    visited = set()  # an alias shares its node: walk it once (no exponential walk)
    while stack:
        node = stack.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    if k.value in seen:
                        return k.value, k.start_mark.line + 1
                    seen.add(k.value)
                stack.append(v)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return None


def loads(text: str, fmt: str = "yaml", source=None) -> Recipe:
    """Reads a recipe from YAML or JSON text (YAML with `yaml.safe_load` only).

    Args:
        text: the recipe's text.
        fmt: `"yaml"` or `"json"`. Defaults to `"yaml"`.
        source: a file name for the messages. Defaults to `None`.

    Returns:
        A validated `Recipe`.
    """
    return from_dict(_parse(text, fmt, source), source=source)


def _parse(text: str, fmt: str, source):
    """The plain data of YAML or JSON text (duplicate keys refused), not yet validated."""
    _check_fmt(fmt)
    if fmt == "json":
        def no_duplicates(pairs):
            keys = [k for k, _ in pairs]
            for k in keys:
                if keys.count(k) > 1:
                    raise RecipeError(f"the key {k!r} appears twice in one object; only one "
                                      "value can count. Expected each key once. Remove one. "
                                      f"Received: {k!r} twice", file=source)
            return dict(pairs)

        try:
            data = json.loads(text, object_pairs_hook=no_duplicates)
        except json.JSONDecodeError as e:
            raise RecipeError(f"not valid JSON: {e.msg} (column {e.colno}). Expected a JSON "
                              "object with a `phases` list. Fix the syntax, or use a .yaml "
                              "suffix for YAML.", file=source, line=e.lineno) from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
            dup = _yaml_duplicate_key(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            problem = ", ".join(p for p in (getattr(e, "context", None),
                                            getattr(e, "problem", None)) if p)
            problem = problem or str(e).splitlines()[0]
            bad_line = text.splitlines()[mark.line] if (
                mark is not None and mark.line < len(text.splitlines())) else ""
            tabs = " (YAML does not allow tabs for indentation: use spaces)" if (
                "\t" in bad_line) else ""
            raise RecipeError(
                f"not valid YAML: {problem}{tabs}. Expected a mapping with a `phases` list, "
                "e.g. `phases: [{train: {epochs: 5}}]`. Fix the syntax at that line.",
                file=source, line=mark.line + 1 if mark is not None else None) from None
        if dup is not None:
            raise RecipeError(f"the key {dup[0]!r} appears twice in one mapping; only the last "
                              "value would count. Expected each key once. Remove one. "
                              f"Received: {dup[0]!r} twice", file=source, line=dup[1])
    if data is None:
        raise RecipeError("the recipe is empty. Expected a mapping with a `phases` list, e.g. "
                          "`phases: [{train: {epochs: 5}}]`. Received: an empty document",
                          file=source)
    return data


def load(path) -> Recipe:
    """Reads and validates a recipe file (YAML or JSON by its suffix).

    Everything is checked here, before any model is loaded: keys, types,
    ranges (by the phases' own constructors) and the phase order
    (`plan.resolve`).

    Args:
        path: a `.yaml`, `.yml` or `.json` file.

    Returns:
        A `Recipe` with `.phases`, `.fit`, `.export`, `.quantization`, `.plan`.

    Raises:
        RecipeError: naming the file, the line when known, and the key.

    Example:
        >>> r = load("recipe.yaml")
        >>> result = collaborative_fit(model, x, y, phases=r.phases, **r.fit)
    """
    fmt = _format_of(path)
    return loads(_read_text(path), fmt, source=os.fspath(path))


# --------------------------------------------------------------------------- search recipes

SEARCH_KEYS = ("budget", "max_accuracy_drop", "max_size_bytes", "max_latency_ms", "target",
               "storage", "study_name", "space")


@dataclasses.dataclass(frozen=True)
class SearchRecipe:
    """A validated search recipe (`keras-colopt search`).

    ```yaml
    search:
      budget: 24
      max_accuracy_drop: 0.01       # targets: any of max_accuracy_drop, max_size_bytes,
      target: ethos-u55-128         #   max_latency_ms; the target as --target names it
      space: {sparsity: [0.5, 0.75, 0.9], clusters: [4, 8], leave_out: [none, first]}
      storage: postgresql://user:password@db-host/colopt   # optional: several workers
    fit: {batch_size: 64}
    ```

    Attributes:
        search: `colopt.search` keyword arguments (`space` a `SearchSpace`; `target` its
            name, for `targets.get`).
        fit: as in a phase recipe.
        source: the file it was read from, or None.
    """

    search: dict
    fit: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: str | None = None


def search_from_dict(data, *, source=None) -> SearchRecipe:
    """Validates plain search-recipe data; `RecipeError` naming the key otherwise."""
    from keras_colopt.study import SearchSpace

    if not isinstance(data, dict) or not isinstance(data.get("search"), dict):
        raise RecipeError("a search recipe must be a mapping with a `search` mapping at the top "
                          "level, e.g. `search: {budget: 24, max_accuracy_drop: 0.01}`. "
                          f"Received: {str(data)[:80]}", file=source)
    _check_keys(data, ("search", "fit"), "", source, "top-level key")
    cfg = dict(data["search"])
    _check_keys(cfg, SEARCH_KEYS, "search", source, "search setting")
    _check_not_yaml_text({k: v for k, v in cfg.items() if k != "space"}, "search", source)
    for key in ("max_accuracy_drop", "max_size_bytes", "max_latency_ms", "budget"):
        v = cfg.get(key)
        if isinstance(v, str) and _NUMBER_TEXT.fullmatch(v.strip()):
            _fail(f"{key!r} is the text {v!r}, not a number. Expected a number. Remove the "
                  "quotes (write 1.0e-2, not 1e-2, in YAML).", f"search.{key}", source,
                  **{key: v})
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or v <= 0):
            _fail(f"`{key}` must be a positive number.", f"search.{key}", source, **{key: v})
    for key in ("target", "storage", "study_name"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            _fail(f"`{key}` must be text.", f"search.{key}", source, **{key: cfg[key]})
    space = cfg.get("space") or {}
    if not isinstance(space, dict):
        _fail("`space` must be a mapping of choices, e.g. `space: {sparsity: [0.5, 0.75]}`.",
              "search.space", source, space=space)
    names = [f.name for f in dataclasses.fields(SearchSpace)]
    _check_keys(space, names, "search.space", source, "space setting")
    try:
        cfg["space"] = SearchSpace(**{k: tuple(v) if isinstance(v, list) else v
                                      for k, v in space.items()})
    except ValueError as e:
        named = re.findall(r"`(\w+)`", str(e))
        raise RecipeError(str(e), key="search.space" + (f".{named[0]}" if named else ""),
                          file=source) from e
    fit = _check_fit({} if data.get("fit") is None else data["fit"], source)
    return SearchRecipe(search=cfg, fit=fit, source=None if source is None else os.fspath(source))


def load_search(path) -> SearchRecipe:
    """Reads and validates a search recipe file (YAML or JSON), before any model is loaded."""
    fmt = _format_of(path)
    return search_from_dict(_parse(_read_text(path), fmt, os.fspath(path)),
                            source=os.fspath(path))
