"""The model families a run can pick with `model.family`. Everything that depends on the model's
kind (the planner's figures, the validation, initialisation, checkpoints' shape check, Hugging
Face import and export) asks the family found here."""

from __future__ import annotations

from typing import Any

from trainer.config import KEY, ConfigError, ModelConfig, RunConfig
from trainer.models import llama, moe
from trainer.models.family import ModelCosts, ModelFamily

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (llama.FAMILY, moe.FAMILY)}


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
    chosen = family_of(model_cfg)
    refuse_foreign_keys(model_cfg, chosen)
    shape = chosen.shape_of(model_cfg)
    shape.check()
    return shape


def refuse_foreign_keys(model_cfg: Any, chosen: ModelFamily) -> None:
    """A shape key only other families read must keep its default: a changed one would be
    silently ignored (e.g. model.n_experts on a Llama)."""
    mine, defaults = set(chosen.shape_keys()), ModelConfig()
    for other in FAMILIES.values():
        for key in other.shape_keys():
            value = getattr(model_cfg, key)
            if key not in mine and value != getattr(defaults, key):
                raise ConfigError(getattr(KEY.model, key), value,
                                  f"{KEY.model.family}={chosen.name} does not read it (a "
                                  f"{KEY.model.family}={other.name} key); leave it at "
                                  f"{getattr(defaults, key)!r} or choose that family")


def model_costs(run: RunConfig) -> ModelCosts:
    """What the planner reads about the run's model: the family's shape, or a user's module
    counted from its own build on the meta device (`trainer.models.user`)."""
    if run.uses_family_model:
        family_of(run.model).refuse_options(run)
        return shape_of(run.model)
    from trainer.models.user import user_module_costs

    return user_module_costs(run.model._target_, run.model.kwargs)
