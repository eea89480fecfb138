"""What an NNI evaluator gives the NNI adapter: calibration batches from its training data, and
fine-tuning through its own training function with every new factor in the optimizer.

Kept apart from :mod:`hsc_plugin.adapters.nni` (the compressor and its ``config_list``) because it
drives NNI's evaluator protocol, not compression.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

try:
    from nni.compression.utils import Evaluator, LightningEvaluator, TorchEvaluator
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError("hsc_plugin.adapters.nni needs NNI: pip install 'hsc-plugin[nni]'") from exc

from hsc_plugin.calibration import CalibrationError, _extract

__all__ = ["evaluator_batches", "finetune"]


# -- evaluator data ------------------------------------------------------------------------------
class _Enough(Exception):
    """Raised from the patched training step once enough batches were collected."""


def _input_of(batch: Any) -> torch.Tensor:
    """The input tensor of a training batch, found as calibration items are (``calibration._extract``)."""
    try:
        return _extract(batch)
    except CalibrationError:
        raise CalibrationError(
            f"Cannot find the input tensor in a training batch of type {type(batch).__name__}; "
            "pass calib=... to LowRankCompressor"
        ) from None


def evaluator_batches(evaluator: Evaluator, model: nn.Module, n: int) -> list[torch.Tensor]:
    """The first ``n`` input batches of the evaluator's training data."""
    batches: list[torch.Tensor] = []
    if isinstance(evaluator, TorchEvaluator):
        def capture(*args: Any, **kwargs: Any) -> torch.Tensor:
            batches.append(_input_of(args[0] if args else kwargs["batch"]).detach())
            if len(batches) >= n:
                raise _Enough
            return torch.zeros((), requires_grad=True)  # no gradient: the optimizer changes nothing

        probe = copy.deepcopy(model)  # the training function may call .train(), .to() … on it
        saved = evaluator._training_step
        evaluator.bind_model(probe)
        evaluator._training_step = capture
        try:
            evaluator.train(max_steps=n)
        except _Enough:
            pass
        finally:
            evaluator.unbind_model()
            evaluator._training_step = saved
    elif isinstance(evaluator, LightningEvaluator):
        for batch in evaluator.data_module.train_dataloader():
            batches.append(_input_of(batch).detach())
            if len(batches) >= n:
                break
    else:
        dummy = evaluator.get_dummy_input()
        if dummy is not None:
            batches.append(_input_of(dummy))
    if not batches:
        raise CalibrationError(f"The {type(evaluator).__name__} yielded no training batch; pass calib=...")
    return batches


# -- fine-tuning ---------------------------------------------------------------------------------
def _param_groups_of(helper: Any) -> list[dict[str, Any]]:
    return helper.kwargs["params"] if "params" in helper.kwargs else helper.args[0]


def _set_param_groups(helper: Any, groups: list[dict[str, Any]]) -> None:
    if "params" in helper.kwargs:
        helper.kwargs["params"] = groups
    else:
        helper.args[0] = groups


def _remap(groups: list[dict[str, Any]], new_names: list[str]) -> list[dict[str, Any]]:
    """Add each parameter unknown to the groups to the group of its nearest ancestor module's
    old parameters (``body.3.reduce.weight`` joins the group of ``body.3.weight``)."""
    out = copy.deepcopy(groups)
    known = {n for g in groups for n in g["params"]}
    owners: dict[str, int] = {}
    for gi, g in enumerate(groups):
        for old in g["params"]:
            owners.setdefault(old.rpartition(".")[0], gi)
    for name in new_names:
        if name in known:
            continue
        mod = name.rpartition(".")[0]
        while True:
            if mod in owners:
                out[owners[mod]]["params"].append(name)
                break
            if not mod:
                break
            mod = mod.rpartition(".")[0]
    return out


def finetune(model: nn.Module, evaluator: Evaluator, max_steps: int | None = None,
             max_epochs: int | None = None) -> nn.Module:
    """Train ``model`` (in place) with the evaluator's ``training_func``, every new parameter included.

    For NNI users: the loop, loss and optimizer are the evaluator's. Outside NNI use
    ``hsc_plugin.finetune`` (its own loop, optional distillation).

    NNI re-creates the optimizer from the parameter *names* of the model the evaluator was made
    for; parameters of replaced modules (factors, speedup-shrunk layers keep their names) would be
    missing. Here each one joins the optimizer group of the module it replaced. The evaluator is
    restored afterwards. ``max_steps``/``max_epochs`` are passed to the ``training_func``.
    """
    if not evaluator._initialization_complete:
        raise ValueError("The evaluator has not seen the original model; create the LowRankCompressor "
                         "with it first (NNI names the optimizer's parameters after that model)")
    helpers = list(getattr(evaluator, "_optimizer_helpers", []))
    saved = [copy.deepcopy(_param_groups_of(h)) for h in helpers]
    names = [n for n, _ in model.named_parameters()]
    was_training = model.training
    for h, groups in zip(helpers, saved):
        _set_param_groups(h, _remap(groups, names))
    try:
        evaluator.bind_model(model)
    finally:
        for h, groups in zip(helpers, saved):
            _set_param_groups(h, groups)
    try:
        opts = getattr(evaluator, "_optimizers", None) or []
        if opts:
            in_opt = {id(p) for o in opts for g in o.param_groups for p in g["params"]}
            missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in in_opt]
            if missing:
                warnings.warn(f"These trainable parameters are in no optimizer group (their modules' "
                              f"parameters were not in the original optimizer): {missing}", stacklevel=2)
        evaluator.train(max_steps, max_epochs)
    finally:
        evaluator.unbind_model()
        model.train(was_training)
    return model
