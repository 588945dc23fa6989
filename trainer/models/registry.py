"""The model families a run can pick with `model.family`. Everything that depends on the model's
kind (the planner's figures, the validation, initialisation, checkpoints' shape check, Hugging
Face import and export) asks the family found here."""

from __future__ import annotations

from typing import Any

from trainer.config import KEY, ConfigError, RunConfig
from trainer.models import llama
from trainer.models.family import ModelCosts, ModelFamily

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (llama.FAMILY,)}


def family(name: str) -> ModelFamily:
    """The family `name`; KeyError naming the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"no model family {name!r}; known: {', '.join(FAMILIES)}") from None


def family_of(model_cfg: Any) -> ModelFamily:
    """The family `model.family` names; ConfigError naming the known ones otherwise."""
    try:
        return family(model_cfg.family)
    except KeyError:
        raise ConfigError(KEY.model.family, model_cfg.family,
                          f"allowed: {', '.join(FAMILIES)}") from None


def shape_of(model_cfg: Any) -> Any:
    """The family's shape of `model_cfg`, checked (ConfigError naming the key it breaks)."""
    shape = family_of(model_cfg).shape_of(model_cfg)
    shape.check()
    return shape


def model_costs(run: RunConfig) -> ModelCosts:
    """What the planner reads about the run's model: the family's shape, or a user's module
    counted from its own build on the meta device (`trainer.models.user`)."""
    if run.uses_family_model:
        return shape_of(run.model)
    from trainer.models.user import user_module_costs

    return user_module_costs(run.model._target_, run.model.kwargs)
