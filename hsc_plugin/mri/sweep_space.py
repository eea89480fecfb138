"""``hsc sweep``'s search space and results, without NNI: a point of the search space becomes
compressor arguments (:func:`trial_spec`), finished trials become Pareto rows and a table
(:func:`collect_rows`, :func:`pareto_table`). Plain functions, so they are tested and reusable
without an experiment running.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

__all__ = [
    "DEFAULT_SEARCH_SPACE",
    "TrialSpec",
    "collect_rows",
    "grid_size",
    "load_search_space",
    "pareto_table",
    "trial_spec",
]

_BASELINES = ("global_svd", "tucker2")
_HSC_KEYS = {"grid", "partition", "n_clusters", "channel_side", "clusterer", "balanced"}
_SHARED_KEYS = {"ratio", "energy", "data_aware"}

# NNI's nested-choice format: the baselines come first so a ``max_trial_number`` cut keeps them.
DEFAULT_SEARCH_SPACE: dict[str, Any] = {
    "method": {"_type": "choice", "_value": [
        {"_name": "global_svd"},
        {"_name": "tucker2"},
        {"_name": "hsc",
         "grid": {"_type": "choice", "_value": [1, 2]},
         "n_clusters": {"_type": "choice", "_value": [1, 2, 4]},
         "channel_side": {"_type": "choice", "_value": ["input", "output"]}},
    ]},
    "ratio": {"_type": "choice", "_value": [3.0, 6.0]},
}
"""2 baselines + 12 HSC settings, each at 3× and 6× fewer MACs: 28 trials with grid search."""


# ----------------------------------------------------------------------------- search space


@dataclasses.dataclass(frozen=True)
class TrialSpec:
    """What one trial compresses with: ``compress(model, method, budget=Budget(ratio), **options)``."""

    method: str
    ratio: float | None
    options: dict[str, Any]
    label: str


def _flatten(params: Mapping[str, Any]) -> dict[str, Any]:
    """NNI gives nested choices as ``{"method": {"_name": "hsc", "grid": 2}, ...}``: flatten them."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, Mapping) and "_name" in value:
            flat[key] = value["_name"]
            for k, v in value.items():
                if k != "_name":
                    flat[k] = v
        else:
            flat[key] = value
    return flat


def trial_spec(params: Mapping[str, Any]) -> TrialSpec:
    """Turn one point of the search space (as ``nni.get_next_parameter()`` returns it) into
    compressor arguments; unknown keys or HSC keys on a baseline are errors, not silently dropped."""
    p = _flatten(params)
    method = str(p.pop("method", "hsc"))
    if method not in ("hsc",) + _BASELINES:
        raise ValueError(f"unknown method {method!r}; use hsc, global_svd or tucker2")
    unknown = set(p) - _HSC_KEYS - _SHARED_KEYS
    if unknown:
        raise ValueError(f"unknown search-space keys {sorted(unknown)}; known: {sorted(_HSC_KEYS | _SHARED_KEYS | {'method'})}")
    ratio = p.pop("ratio", None)
    energy = p.pop("energy", None)
    if ratio is None and energy is None:
        raise ValueError("a trial needs a budget 'ratio' (e.g. 3.0) or an 'energy' τ")
    options: dict[str, Any] = {}
    if energy is not None:
        options["energy"] = float(energy)
    if method in _BASELINES:
        extra = set(p) & _HSC_KEYS
        if extra:
            raise ValueError(f"{method} takes no HSC options, got {sorted(extra)}")
        options["data_aware"] = bool(p.pop("data_aware", True))
        label = f"{method} ({'data-aware' if options['data_aware'] else 'data-free'})"
    else:
        p.pop("data_aware", None)  # HSC is always data-aware
        grid = p.pop("grid", None)
        if grid is not None:
            grid = (int(grid), int(grid)) if isinstance(grid, (int, float)) else tuple(int(g) for g in grid)
        partition = p.pop("partition", None)
        if partition is None and grid is not None:
            partition = "none" if grid == (1, 1) else "grid"
        if partition is not None:
            options["partition"] = partition
        if partition == "grid" and grid is not None:
            options["grid"] = grid
        n_clusters = p.pop("n_clusters", None)
        if "clusterer" in p:
            options["clusterer"] = p.pop("clusterer")
        if n_clusters is not None:
            if int(n_clusters) == 1:
                options["clusterer"] = "single"
            else:
                options["n_clusters"] = int(n_clusters)
        for key in ("channel_side", "balanced"):
            if key in p:
                options[key] = p.pop(key)
        regions = {"none": "1x1 regions", "grid": f"{grid[0]}x{grid[1]} regions" if grid else "grid regions"}
        parts = [regions.get(str(partition), f"{partition} regions") if partition else "default regions"]
        if options.get("clusterer") == "single":
            parts.append(f"1 {options['channel_side']} cluster" if "channel_side" in options else "1 cluster")
        elif n_clusters is not None:
            parts.append(f"{int(n_clusters)} {options.get('channel_side', 'input')} clusters")
        elif "channel_side" in options:
            parts.append(f"{options['channel_side']} side")
        label = "hsc " + ", ".join(parts)
    if energy is not None:
        label += f", τ={float(energy):g}"
    return TrialSpec(method, None if ratio is None else float(ratio), options, label)


def grid_size(space: Mapping[str, Any]) -> int | None:
    """Points of a search space made only of (nested) choices, as NNI's grid search walks it;
    ``None`` when a parameter is continuous (a grid search would refine it without end)."""
    total = 1
    for entry in space.values():
        if not isinstance(entry, Mapping) or entry.get("_type") != "choice":
            return None
        n = 0
        for v in entry["_value"]:
            if isinstance(v, Mapping) and "_name" in v:
                sub = grid_size({k: x for k, x in v.items() if k != "_name"})
                if sub is None:
                    return None
                n += sub
            else:
                n += 1
        total *= n
    return total


def load_search_space(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """NNI search space from a JSON or YAML file (YAML is a superset of JSON), or the default."""
    if path is None:
        return json.loads(json.dumps(DEFAULT_SEARCH_SPACE))
    text = Path(path).read_text(encoding="utf8")
    try:
        space = json.loads(text)
    except json.JSONDecodeError:
        import yaml

        space = yaml.safe_load(text)
    if not isinstance(space, dict) or not space:
        raise ValueError(f"{path}: a search space is a non-empty mapping of NNI '_type'/'_value' entries")
    return space


# ------------------------------------------------------------------------------ collection


def collect_rows(trials: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Pareto rows (the format of :mod:`hsc_plugin.mri.report`) from finished trials.

    Each trial is ``{"trial_id", "status", "parameter", "value"}``; ``value`` is the dict the
    trial reported (``None`` when it reported nothing, e.g. it failed or hit its time limit).
    """
    rows = []
    for t in trials:
        spec = trial_spec(t["parameter"])
        base = {"method": spec.method, "setting": spec.label, "ratio": spec.ratio or float("nan"),
                "options": spec.options, "trial_id": t.get("trial_id", ""), "parameter": dict(t["parameter"])}
        value = t.get("value")
        if isinstance(value, Mapping) and "accuracy" in value:
            rows.append({**base, "stage": "compress-only", **{k: v for k, v in value.items() if k != "default"}})
        else:
            rows.append({**base, "stage": "failed", "error": f"trial {t.get('status', 'FAILED').lower()}"})
    rows.sort(key=lambda r: (r["stage"] == "failed", r["ratio"], r["method"] != "hsc", r["setting"]))
    return rows


def pareto_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of every row with its place on the Pareto fronts (accuracy vs MACs, and vs
    latency when measured); ``*`` marks a point no other point beats on both axes. A timing whose
    spread says the machine was busy is shown as "disturbed" and kept off the latency front; the
    speed-up is against the uncompressed model timed interleaved with it, in the same trial."""
    from hsc_plugin.mri.report import pareto_front, speedup_cell

    ok = [i for i, r in enumerate(rows) if r.get("stage") != "failed"]
    fronts: dict[str, set[int]] = {}
    for key in ("macs", "latency_b1_ms"):
        idx = [i for i in ok if key in rows[i] and not rows[i].get(key[: -len("_ms")] + "_disturbed")]
        if idx:
            front = pareto_front([(rows[i][key], rows[i]["accuracy"]) for i in idx])
            fronts[key] = {idx[j] for j in front}
    lat = any("latency_b1_ms" in rows[i] for i in ok)
    base = next((dict(r) for r in rows if r.get("method") == "original"), {})
    head = ["trial", "setting", "budget", "accuracy %", "macro-F1 %", "MMACs", "M params"]
    head += ["ms b1", "speed-up b1"] if lat else []
    head += ["front (MACs)"] + (["front (latency)"] if lat else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows):
        budget = "-" if r.get("ratio", 1.0) != r.get("ratio") else f"{r['ratio']:g}x"
        if r.get("stage") == "failed":
            cells = [r.get("trial_id", ""), r["setting"], budget, r.get("error", "failed")] + ["-"] * (len(head) - 4)
        else:
            cells = [r.get("trial_id", "") or "-", r["setting"], budget,
                     f"{100 * r['accuracy']:.2f} ± {100 * r.get('accuracy_se', 0.0):.2f}",
                     f"{100 * r['macro_f1']:.2f}", f"{r['macs'] / 1e6:.2f}", f"{r['params'] / 1e6:.3f}"]
            if lat:
                ms = "-" if "latency_b1_ms" not in r else "disturbed" if r.get("latency_b1_disturbed") \
                    else f"{r['latency_b1_ms']:.2f}"
                cells += [ms, speedup_cell(dict(r), base, "latency_b1_ms")]
            cells += ["*" if i in fronts.get("macs", ()) else ""]
            cells += ["*" if i in fronts.get("latency_b1_ms", ()) else ""] if lat else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
