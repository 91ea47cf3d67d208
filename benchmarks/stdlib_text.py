"""Sentences of the Python standard library's docstrings, labelled by package: a small text
classification set that ships with Python (PSF licence), for benchmarks/keras3_models.py.

Run as a script it prints them as JSON: [[sentence, package index], ...]. It imports nothing
but the standard library, so the set does not depend on what else a process has imported.
"""

import importlib
import inspect
import json
import pkgutil
import re

PACKAGES = ("email", "http", "xml", "json", "unittest", "asyncio", "logging", "sqlite3",
            "multiprocessing", "importlib")


def stdlib_sentences():
    """[(sentence, package index)] from the docstrings of PACKAGES (deterministic)."""
    out = []
    for label, name in enumerate(PACKAGES):
        pkg = importlib.import_module(name)
        modules = [pkg] + [importlib.import_module(m.name) for m in pkgutil.walk_packages(
            getattr(pkg, "__path__", []), name + ".")
            if not any(part.startswith("test") for part in m.name.split(".")[1:])
            and not m.name.endswith("__main__") and _importable(m.name)]
        seen = set()
        for module in modules:
            for obj in _documented(module):
                doc = inspect.getdoc(obj) or ""
                if doc in seen:
                    continue
                seen.add(doc)
                for s in re.split(r"(?<=[.!?])\s+|\n\n", doc):
                    words = re.findall(r"[a-z]+", s.lower())
                    if len(words) >= 4:
                        out.append((" ".join(words), label))
    return sorted(set(out))


def _importable(name):
    try:
        importlib.import_module(name)
        return True
    except Exception:  # platform-only modules (e.g. asyncio.windows_events)
        return False


def _documented(module):
    yield module
    for _, obj in sorted(vars(module).items()):
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            yield obj
            yield from (m for _, m in sorted(vars(obj).items()) if inspect.isfunction(m))
        elif inspect.isfunction(obj):
            yield obj


if __name__ == "__main__":
    print(json.dumps(stdlib_sentences()))
