"""NNI adapter: our low-rank compressors as an NNI 3.0 compressor (extra ``[nni]``).

An NNI user keeps the workflow they know::

    from hsc_plugin.adapters.nni import LowRankCompressor, finetune, speedup

    config_list = [{"op_types": ["Conv2d"], "exclude_op_names": ["stem"],
                    "method": "global_svd", "macs_ratio": 3.0, "data_aware": True}]
    model_c, report = LowRankCompressor(model, config_list, evaluator).compress(max_steps=200)

    # then NNI's own pruners on the factorised model
    pruner = L1NormPruner(model_c, [{"op_types": ["Conv2d"], "sparse_ratio": 0.3, ...}])
    _, masks = pruner.compress(); pruner.unwrap_model()
    speedup(model_c, dummy_input, masks)          # ModelSpeedup with the torch.fx workaround
    finetune(model_c, evaluator, max_steps=200)   # every parameter of the new model is trained

**config_list.** NNI's selection keys (``op_types``, ``op_names``, ``op_names_re``,
``exclude_op_names``, ``exclude_op_types``, ``exclude_op_names_re``) are parsed and matched by NNI's
own functions (``trans_legacy_config_list``, ``select_modules_by_config``), so they mean exactly
what they mean for ``L1NormPruner``. Our keys: ``method`` (``hsc`` | ``global_svd`` | ``tucker2``, or
any compressor registered by a plugin; default ``hsc``), ``macs_ratio`` or ``params_ratio`` (a :class:`~hsc_plugin.Budget`: ``3.0`` = 3×
fewer), ``budget_scope`` (``model`` | ``targets``), ``tolerance``, and every option of the chosen
compressor (``energy``, ``rank_ratio``, ``rank``, ``data_aware``; for HSC ``partition``, ``grid``,
``clusterer``, ``n_clusters``, ``channel_side`` …). Any other key is rejected, as NNI rejects
unknown keys. ``rank_ratio`` without a budget or ``rank`` selects the ``fixed`` rank selector.
Only ``nn.Conv2d``/``nn.Linear`` layers are factorised; other module types matched by
``op_types``/``op_names_re`` (containers, BatchNorm …) are ignored, while a non-factorisable layer
named in ``op_names`` is an error.

**Several entries.** NNI lets a later entry override an earlier one for the same module; so do
we: each layer belongs to the last entry that selects it. Entries whose settings (everything but
the selection keys) are equal form one group and are compressed by one call (a budget is then
shared across their layers); groups run in the order they first appear, each on the output of the
previous one (so data-aware statistics of a later group see the already-compressed layers). With
more than one group a ratio applies to the group's own layers (``budget_scope="targets"``);
dividing the whole model's cost needs a single group.

**Calibration and fine-tuning.** Calibration data come from ``calib=`` or, with an NNI evaluator,
from its training data: for a ``TorchEvaluator`` the first ``calib_batches`` batches that its
``training_func`` feeds to ``training_step`` (the step is replaced by a no-op while they are
collected, on a throw-away copy of the model); for a ``LightningEvaluator`` its data module's
``train_dataloader()`` (not tested here: pytorch-lightning is not installed in CI). NNI rebuilds
the optimizer *by the old parameter names*, so after layers are replaced the new factor parameters
would silently not be trained; :func:`finetune` gives each new parameter the optimizer group of
the parameters of the module it replaced (the nearest ancestor module), then restores the
evaluator. The user's model is never modified; the evaluator is left as it was. (This
:func:`finetune` is not ``hsc_plugin.finetune``: that one is a training loop of its own, with
distillation from the original model, for users outside NNI; this one keeps NNI's workflow, where
the evaluator's ``training_func`` is the loop, and only decides which optimizer group each new
parameter joins. The two cannot share a loop, and the group remapping is about NNI's
name-based optimizer rebuild, which the core loop does not have.)

**Composition with NNI pruners.** Ours first, then NNI's (e.g. ``L1NormPruner`` + ``ModelSpeedup``)
works for Global SVD and Tucker-2 models: their modules are plain ``Conv2d``/``Linear``. On torch
≥ 2.4 NNI's own concrete tracer fails (it looks for the removed ``torch._C._TensorBase``), so
:func:`speedup` passes ``graph_module=torch.fx.symbolic_trace(model)``. HSC's
``SpatioChannelConv2d`` gathers input channels per cluster and crops spatial regions whose bounds
depend on the input size; ``ModelSpeedup`` cannot propagate masks through that, so
:func:`speedup` (and :func:`check_speedup_compatible`) raise :class:`SpeedupIncompatibleError`
naming the modules, instead of a ``TypeError`` from inside NNI. Prune-then-HSC (NNI first, on the
dense model) works.
"""

from __future__ import annotations

import copy
import difflib
from typing import Any

import torch
from torch import nn

try:
    from nni.compression.base.compressor import Compressor as _NNICompressor
    from nni.compression.base.config import select_modules_by_config, trans_legacy_config_list
    from nni.compression.utils import Evaluator
    from schema import Optional as _Opt
    from schema import And, Or, Schema, SchemaError
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("hsc_plugin.adapters.nni needs NNI 3: pip install 'hsc-plugin[nni]'") from exc

from hsc_plugin.adapters.nni_evaluator import evaluator_batches as _evaluator_batches
from hsc_plugin.adapters.nni_evaluator import finetune
from hsc_plugin.adapters.nni_evaluator import finetune as _finetune  # compress() has an argument named finetune
from hsc_plugin.api import compress as _compress
from hsc_plugin.budget import Budget
from hsc_plugin.calibration import CalibrationError
from hsc_plugin.registry import available, lookup
from hsc_plugin.report import LayerReport, Report
from hsc_plugin.targets import SUPPORTED_TYPES

__all__ = [
    "LowRankCompressor",
    "finetune",
    "speedup",
    "check_speedup_compatible",
    "SpeedupIncompatibleError",
    "SELECTION_KEYS",
]

SELECTION_KEYS = ("op_types", "op_names", "op_names_re", "exclude_op_names", "exclude_op_types",
                  "exclude_op_names_re")
_BUDGET_KEYS = ("macs_ratio", "params_ratio", "budget_scope", "tolerance")
# Keys with a type we can check before the compressor sees them; other options pass through to the
# compressor's constructor, which validates their values.
_TYPED: dict[str, Any] = {
    "energy": And(lambda v: isinstance(v, (int, float)) and 0 < v <= 1, error="energy must be in (0, 1]"),
    "rank_ratio": And(lambda v: isinstance(v, (int, float)) and 0 < v <= 1, error="rank_ratio must be in (0, 1]"),
    "data_aware": And(bool, error="data_aware must be True or False"),
}
# NNI pruning settings that mean nothing for a low-rank compressor, and what to use instead.
_NNI_PRUNING_KEYS = ("sparse_ratio", "sparse_threshold", "max_sparse_ratio", "min_sparse_ratio",
                     "global_group_id", "dependency_group_id", "granularity", "target_names",
                     "target_settings", "sparsity", "sparsity_per_layer", "total_sparsity")


def _is_ratio(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 1


def _schema(method: str) -> Schema:
    """NNI's selection keys (as in ``default_config_schema``) plus ours for ``method``."""
    opts = lookup("compressor", method).option_names()
    spec: dict[Any, Any] = {
        Or("op_types", "op_names", "op_names_re"): [str],
        _Opt("exclude_op_names"): [str],
        _Opt("exclude_op_types"): [str],
        _Opt("exclude_op_names_re"): [str],
        _Opt("method"): Or(*available("compressor")),
        _Opt(Or("macs_ratio", "params_ratio", only_one=True)): And(
            _is_ratio, error="macs_ratio / params_ratio must be a number > 1 (3.0 = 3x fewer)"),
        _Opt("budget_scope"): Or("model", "targets"),
        _Opt("tolerance"): And(lambda v: isinstance(v, float) and 0 < v < 1, error="tolerance must be in (0, 1)"),
    }
    for o in opts:
        spec[_Opt(o)] = _TYPED.get(o, object)
    return Schema(spec)


def _allowed_keys(method: str) -> list[str]:
    return [*SELECTION_KEYS, "method", *_BUDGET_KEYS, *lookup("compressor", method).option_names()]


class SpeedupIncompatibleError(TypeError):
    """The model holds modules that NNI's ``ModelSpeedup`` cannot handle (and why)."""


# -- config groups -------------------------------------------------------------------------------
class _Group:
    """One compress call: a method, its options and budget, and the layers it targets."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.method: str = settings.get("method", "hsc")
        self.options = {k: v for k, v in settings.items() if k not in ("method", *_BUDGET_KEYS)}
        if "rank_ratio" in self.options and "rank" not in self.options and not self.has_budget:
            self.options["rank"] = "fixed"
        self.names: list[str] = []

    @property
    def has_budget(self) -> bool:
        return "macs_ratio" in self.settings or "params_ratio" in self.settings

    def budget(self, n_groups: int) -> Budget | None:
        s = self.settings
        if not self.has_budget:
            return None
        metric = "macs" if "macs_ratio" in s else "params"
        scope = s.get("budget_scope", "model" if n_groups == 1 else "targets")
        if scope == "model" and n_groups > 1:
            raise ValueError(
                "budget_scope='model' needs a single config group: with several groups each ratio "
                "divides the cost of its own layers (budget_scope='targets'). Put the layers in one "
                "entry to divide the whole model's cost."
            )
        kw = {"tolerance": s["tolerance"]} if "tolerance" in s else {}
        return Budget(float(s[f"{metric}_ratio"]), metric=metric, scope=scope, **kw)


def _settings_key(settings: dict[str, Any]) -> str:
    return repr(sorted((k, repr(v)) for k, v in settings.items()))


# -- the compressor ------------------------------------------------------------------------------
class LowRankCompressor(_NNICompressor):
    """HSC / Global SVD / Tucker-2 as an NNI compressor configured by an NNI ``config_list``.

    ``compress()`` returns ``(compressed_model, report)``; the input model is never modified.
    ``calib`` (tensor, iterable or DataLoader) overrides the evaluator's data; ``dummy_input`` is
    enough for data-free methods when there is neither; ``calib_batches`` is how many evaluator
    batches are used. See the module docstring for the config_list schema.
    """

    mode = "pruning"

    def __init__(
        self,
        model: nn.Module,
        config_list: list[dict[str, Any]],
        evaluator: Evaluator | None = None,
        *,
        calib: Any = None,
        dummy_input: torch.Tensor | None = None,
        calib_batches: int = 8,
    ) -> None:
        # Not Compressor.__init__: it wraps the model's modules in place with NNI's masking
        # wrappers, which we neither need (we replace modules) nor may apply to the user's model.
        assert self.mode in ("pruning", "quantization", "distillation")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(config_list, list) or not config_list:
            raise ValueError("config_list must be a non-empty list of dicts")
        if calib_batches < 1:
            raise ValueError(f"calib_batches must be >= 1, got {calib_batches}")
        self.bound_model = model
        self.config_list = trans_legacy_config_list(copy.deepcopy(config_list))
        self._validate_config()
        self.evaluator = evaluator
        if evaluator is not None:
            if not isinstance(evaluator, Evaluator):
                raise TypeError(f"evaluator must be an NNI Evaluator, got {type(evaluator).__name__}")
            if not evaluator._initialization_complete:
                evaluator._init_optimizer_helpers(model)
        self.calib = calib
        self.dummy_input = dummy_input
        self.calib_batches = int(calib_batches)
        self._is_wrapped = False
        self._module_wrappers: dict[str, Any] = {}
        self._target_spaces: dict[str, Any] = {}
        self.fused_compressors = [self]
        self.groups = self._make_groups()
        self.stage_reports: list[Report] = []

    @classmethod
    def from_compressor(cls, compressor: Any, new_config_list: list[dict[str, Any]], *args: Any,
                        **kwargs: Any) -> "LowRankCompressor":
        raise NotImplementedError(
            "LowRankCompressor replaces modules instead of masking them, so it cannot share NNI "
            "wrappers; run it first and give its compressed model to the NNI compressor")

    # -- config ------------------------------------------------------------------------------
    def _validate_config(self) -> None:
        for i, config in enumerate(self.config_list):
            if not isinstance(config, dict):
                raise TypeError(f"config_list[{i}] must be a dict, got {type(config).__name__}")
            method = config.get("method", "hsc")
            methods = list(available("compressor"))
            if method not in methods:
                raise ValueError(f"config_list[{i}]: method must be one of {methods}, got {method!r}")
            allowed = _allowed_keys(method)
            unknown = [k for k in config if k not in allowed]
            pruning = [k for k in unknown if k in _NNI_PRUNING_KEYS]
            if pruning:
                raise ValueError(
                    f"config_list[{i}]: {pruning} are NNI pruning settings; a low-rank compressor takes "
                    "macs_ratio / params_ratio (e.g. 3.0 = 3x fewer), rank_ratio or energy instead"
                )
            if unknown:
                hints = {k: difflib.get_close_matches(k, allowed, n=1) for k in unknown}
                hint = "; ".join(f"{k!r} (did you mean {h[0]!r}?)" if h else repr(k) for k, h in hints.items())
                raise ValueError(
                    f"config_list[{i}]: unknown key(s) {hint} for method {method!r}. Allowed keys: "
                    f"{', '.join(allowed)}"
                )
            try:
                _schema(method).validate(config)
            except SchemaError as exc:
                raise ValueError(f"config_list[{i}] is invalid for method {method!r}: {exc}") from None

    def _select(self, i: int, config: dict[str, Any]) -> list[str]:
        named = dict(self.bound_model.named_modules())
        missing = [n for n in config.get("op_names", []) if n not in named]
        if missing:
            close = {n: difflib.get_close_matches(n, list(named), n=3) for n in missing}
            raise ValueError(f"config_list[{i}]: op_names {missing} match no module of the model "
                             f"(similar names: {close})")
        modules, _, _ = select_modules_by_config(self.bound_model, config)
        explicit = set(config.get("op_names", []))
        order = {n: k for k, n in enumerate(named)}
        names = [n for n, m in modules.items() if n and (n in explicit or type(m) in SUPPORTED_TYPES)]
        return sorted(names, key=order.__getitem__)

    def _make_groups(self) -> list[_Group]:
        owner: dict[str, int] = {}
        selections: list[list[str]] = []
        for i, config in enumerate(self.config_list):
            names = self._select(i, config)
            if not names:
                raise ValueError(f"config_list[{i}] selects no Conv2d/Linear layer of the model: {config}")
            selections.append(names)
            for n in names:
                owner[n] = i  # a later entry overrides an earlier one, as in NNI
        groups: dict[str, _Group] = {}
        for i, config in enumerate(self.config_list):
            settings = {k: v for k, v in config.items() if k not in SELECTION_KEYS}
            key = _settings_key(settings)
            group = groups.setdefault(key, _Group(settings))
            group.names += [n for n in selections[i] if owner[n] == i and n not in group.names]
        out = [g for g in groups.values() if g.names]
        order = {n: k for k, (n, _) in enumerate(self.bound_model.named_modules())}
        for g in out:
            g.names.sort(key=order.__getitem__)
            lookup("compressor", g.method)(**g.options)  # option values are checked now, not later
        for g in out:
            g.budget(len(out))
        return out

    # -- compression -------------------------------------------------------------------------
    def _calibration(self) -> Any:
        if self.calib is not None:
            return self.calib
        if self.evaluator is not None:
            return _evaluator_batches(self.evaluator, self.bound_model, self.calib_batches)
        return None

    def compress(self, max_steps: int | None = None, max_epochs: int | None = None, *,
                 finetune: bool | None = None) -> tuple[nn.Module, Report]:
        """Factorise the selected layers (on a copy) and optionally fine-tune with the evaluator.

        Fine-tuning runs when ``max_steps`` or ``max_epochs`` is given (or ``finetune=True``:
        the evaluator's ``training_func`` with its own defaults).
        """
        do_ft = finetune if finetune is not None else (max_steps is not None or max_epochs is not None)
        if do_ft and self.evaluator is None:
            raise ValueError("Fine-tuning needs an NNI evaluator: LowRankCompressor(model, config_list, evaluator)")
        calib = self._calibration()
        example = self.dummy_input
        if example is None and self.evaluator is not None and calib is None:
            dummy = self.evaluator.get_dummy_input()
            example = dummy if isinstance(dummy, torch.Tensor) else None
        model = self.bound_model
        self.stage_reports = []
        for k, g in enumerate(self.groups):
            try:
                result = _compress(model, g.method, calib=calib, budget=g.budget(len(self.groups)),
                                   targets=list(g.names), inplace=k > 0, example_input=example, **g.options)
            except CalibrationError as exc:
                if calib is not None or example is not None:
                    raise
                raise CalibrationError(
                    f"{exc}. LowRankCompressor takes calibration data from an NNI evaluator (its training "
                    "batches) or calib=...; data-free methods also run with dummy_input=torch.randn(1, C, H, W)"
                ) from exc
            model = result.model
            self.stage_reports.append(result.report)
        report = self.stage_reports[0] if len(self.stage_reports) == 1 else _merge(self.stage_reports)
        if do_ft:
            assert self.evaluator is not None
            _finetune(model, self.evaluator, max_steps, max_epochs)
        return model, report


def _merge(reports: list[Report]) -> Report:
    """One report for several sequential groups: totals from first to last, every layer once."""
    layers: dict[str, LayerReport] = {}
    for r in reports:
        for L in r.layers:
            layers[L.name] = L
    met = [r.budget_met for r in reports if r.budget_met is not None]
    first, last = reports[0], reports[-1]
    return Report(
        method="+".join(r.method for r in reports),
        options={"stages": [{"method": r.method, "options": r.options, "budget": r.budget,
                             "achieved_ratio": r.achieved_ratio, "budget_met": r.budget_met,
                             "layers": [L.name for L in r.layers]} for r in reports]},
        layers=list(layers.values()),
        macs_before=first.macs_before, macs_after=last.macs_after,
        params_before=first.params_before, params_after=last.params_after,
        budget=None, achieved_ratio=None, budget_met=all(met) if met else None,
        calibration_samples=first.calibration_samples, input_shape=first.input_shape,
        seconds=sum(r.seconds for r in reports),
    )


# -- NNI ModelSpeedup ----------------------------------------------------------------------------
def check_speedup_compatible(model: nn.Module) -> None:
    """Raise :class:`SpeedupIncompatibleError` if NNI's ``ModelSpeedup`` cannot handle ``model``."""
    bad: list[tuple[str, type]] = []
    for name, m in model.named_modules():
        if any(name.startswith(b + ".") for b, _ in bad):
            continue
        if getattr(type(m), "speedup_incompatible", None):  # asked of the module type (hsc_plugin.modules)
            bad.append((name, type(m)))
    if bad:
        listed = ", ".join(f"{n!r} ({t.__name__})" for n, t in bad[:5]) + (" …" if len(bad) > 5 else "")
        raise SpeedupIncompatibleError(
            f"NNI ModelSpeedup cannot handle {len(bad)} module(s) of this model: {listed}. "
            f"{bad[0][1].__name__} is {bad[0][1].speedup_incompatible}. Prune with NNI (and speed up) the "
            "dense model before HSC, or compress with method='global_svd' / 'tucker2', whose factors "
            "are plain Conv2d/Linear layers that ModelSpeedup handles."
        )
    wrapped = [n for n, _ in model.named_modules() if n.endswith("_nni_wrapper")]
    if wrapped:
        raise SpeedupIncompatibleError(
            f"The model is still wrapped by an NNI pruner ({wrapped[0]!r} …): call pruner.unwrap_model() "
            "before speedup"
        )


def speedup(model: nn.Module, dummy_input: Any, masks: dict[str, dict[str, torch.Tensor]],
            **kwargs: Any) -> nn.Module:
    """NNI ``ModelSpeedup(model, dummy_input, masks).speedup_model()`` that works here.

    Checks :func:`check_speedup_compatible` first and passes ``graph_module=torch.fx.symbolic_trace``
    (NNI's concrete tracer fails on torch ≥ 2.4). Like ModelSpeedup, it changes ``model`` in place
    and returns it. ``kwargs`` go to ``ModelSpeedup``.
    """
    from nni.compression.speedup import ModelSpeedup

    check_speedup_compatible(model)
    if "graph_module" not in kwargs:
        try:
            kwargs["graph_module"] = torch.fx.symbolic_trace(model)
        except Exception as exc:
            raise SpeedupIncompatibleError(
                f"ModelSpeedup needs a torch.fx-traceable model; torch.fx.symbolic_trace failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    return ModelSpeedup(model, dummy_input, masks, **kwargs).speedup_model()
