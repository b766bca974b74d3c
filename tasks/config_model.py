"""The ``model:`` section of a run configuration: a built-in model by ``name``, a function of your own by
``factory: "module:function"`` (found next to the config or on ``plugins:``, see :mod:`tasks.user_code`), or a
whole-model ``file`` (a ``torch.export`` program ``.pt2`` or a TorchScript archive). Exactly one of the three.

Factory and file models declare their ``task`` (the built-in ones are registered with theirs), may declare
``num_classes`` (checked against the dataset and the model's output before anything runs) and a ``normalize`` of
the input when they expect normalised images. ``feature_layer`` may be given here or under ``adapter``.

``graph: optimized`` runs attacks and defenses on an inference-optimised copy of a built-in or factory model
(BatchNorm folded into the convolutions, NHWC weights: :mod:`equicore.models.inference_graph`). The model's
outputs change by float rounding only, but sign-gradient attacks and defenses amplify rounding, so it is part of the
run id and of every cache key: plain and optimized results are never mixed. ``plain`` (the default) leaves the
identities of configs written before the field unchanged.

Validation never imports the factory's module: that happens when the run builds its model (in this process and on
every worker), where a module that does not import is one line naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field, field_validator, model_validator

from equicore.registry import MODELS
from tasks.config_checks import check_param_types, factory_hints
from tasks.config_errors import ConfigError
from tasks.config_static import StrictModel, checked, known, static_pass_on
from tasks.user_code import check_factory_string

ModelTask = Literal["classification", "segmentation", "instance"]
# Fields a built-in model's config never had: left out of the run id when unset, so existing run ids stay.
USER_MODEL_FIELDS = ("factory", "file", "task", "num_classes", "normalize")
ModelGraph = Literal["plain", "optimized"]
GRAPHS: tuple[str, ...] = get_args(ModelGraph)
DEFAULT_GRAPH = "plain"  # left out of the run id and the cache keys, so configs written before the field keep theirs


class NormalizeConfig(StrictModel):
    """``(x - mean) / std`` per channel in front of the model (images are in [0, 1])."""

    mean: list[float] = Field(min_length=1, max_length=4)
    std: list[float] = Field(min_length=1, max_length=4)

    @model_validator(mode="after")
    def _same_channels(self) -> NormalizeConfig:
        if len(self.mean) != len(self.std):
            raise ConfigError(f"mean has {len(self.mean)} channels but std has {len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"std must be > 0 for every channel, got {self.std}")
        return self


class ModelConfig(StrictModel):
    name: str | None = Field(default=None, description="a built-in model (equi list models)")
    factory: str | None = Field(default=None, description="'module:function' in your own module (runs your code)")
    file: str | None = Field(default=None, description="a torch.export program (.pt2) or TorchScript archive")
    checkpoint: str | None = Field(default=None, description="local state_dict path; None = the model's default")
    task: ModelTask | None = Field(default=None, description="the task of a factory or file model")
    num_classes: int | None = Field(default=None, ge=1, description="classes a factory or file model outputs")
    params: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the model's factory")
    adapter: dict[str, Any] = Field(default_factory=dict, description="task adapter options, e.g. feature_layer")
    normalize: NormalizeConfig | None = Field(default=None, description="input normalisation of a user model")
    graph: ModelGraph = Field(
        default=DEFAULT_GRAPH, description="plain, or optimized: BatchNorm folded, NHWC (built-in and factory models)"
    )

    @model_validator(mode="before")
    @classmethod
    def _feature_layer_here(cls, data: Any) -> Any:
        """``feature_layer: layer3`` is ``adapter: {feature_layer: layer3}`` (one spelling in the run id)."""
        if not isinstance(data, dict) or "feature_layer" not in data:
            return data
        adapter = data.get("adapter") or {}
        if isinstance(adapter, dict) and "feature_layer" in adapter:
            raise ConfigError("feature_layer and adapter.feature_layer conflict: give it once")
        rest = {k: v for k, v in data.items() if k != "feature_layer"}
        options = adapter if isinstance(adapter, dict) else {}
        return {**rest, "adapter": {**options, "feature_layer": data["feature_layer"]}}

    @field_validator("graph", mode="before")
    @classmethod
    def _graph(cls, v: Any) -> Any:
        if v not in GRAPHS:
            raise ConfigError(f"expected one of {', '.join(GRAPHS)}, got {v!r}")
        return v

    @field_validator("name")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        return v if v is None else known("models", MODELS, v)

    @field_validator("factory")
    @classmethod
    def _factory_string(cls, v: str | None) -> str | None:
        return v if v is None else check_factory_string(v)

    @model_validator(mode="after")
    def _one_model(self) -> ModelConfig:
        given = [k for k in ("name", "factory", "file") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(
                "give exactly one of name (a built-in model), factory (module:function) or file (.pt2 / TorchScript)"
                + (f"; got {' and '.join(given)}" if given else "")
            )
        if self.name is not None and static_pass_on():
            from equicore import catalogue

            registered = catalogue.meta("models", self.name).get("task")
            if self.task is not None and self.task != registered:
                raise ConfigError(f"task: model {self.name!r} is a {registered} model, not {self.task}")
            return self  # the rest needs the model's factory (torch): the full pass checks it
        if self.name is not None:
            registered = MODELS.meta(self.name).get("task")
            if self.task is not None and self.task != registered:
                raise ConfigError(f"task: model {self.name!r} is a {registered} model, not {self.task}")
            if self.num_classes is not None:
                raise ConfigError(f"num_classes: built-in model {self.name!r} takes params.num_classes")
            if self.normalize is not None:
                raise ConfigError(f"normalize: built-in model {self.name!r} normalises its input itself")
            hints = {k: v for k, v in factory_hints(MODELS.get(self.name)).items() if k != "checkpoint"}
            checked(lambda p: check_param_types(self.name, hints, p), self.params)
            return self
        if self.task is None:
            raise ConfigError(f"task: a {given[0]} model declares its task (classification or segmentation)")
        if self.file is not None:
            if self.checkpoint is not None:
                raise ConfigError("checkpoint: a model file holds its weights; checkpoint is for name or factory")
            if self.params:
                raise ConfigError("params: a model file takes no parameters; params are a factory's arguments")
            if self.task == "instance":
                raise ConfigError("task: model files are classification or segmentation models")
            if self.graph != DEFAULT_GRAPH:
                raise ConfigError(
                    f"graph: {self.graph} is for built-in and factory models; a model file runs as it was exported "
                    "(fold BatchNorm before exporting it, or use graph: plain)"
                )
        return self

    @property
    def kind(self) -> str:
        return "name" if self.name is not None else "factory" if self.factory is not None else "file"

    @property
    def label(self) -> str:
        """How results and messages name the model: the built-in name, the factory, or the file's name."""
        return self.name or self.factory or Path(self.file or "model").name

    @property
    def task_name(self) -> str | None:
        if self.name is None:
            return self.task
        if static_pass_on():
            from equicore import catalogue

            return catalogue.meta("models", self.name).get("task")
        return MODELS.meta(self.name).get("task")

    def identity(self) -> dict[str, Any]:
        """The fields that change what the model computes besides its name, weights, params and adapter: a user
        model's factory or file, task and normalisation; the graph when not plain (none for a plain built-in)."""
        out: dict[str, Any] = {}
        if self.graph != DEFAULT_GRAPH:
            out["graph"] = self.graph
        for key in ("factory", "file", "task"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key) if key != "file" else Path(self.file or "").name
        if self.normalize is not None:
            out["normalize"] = self.normalize.model_dump()
        return out
