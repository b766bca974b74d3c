"""``equi tune`` configs: a run config plus a ``search:`` section, validated as strictly as a run config.

The base run config is the evaluation the tuned preset will run ONCE on the test split (its dataset split, attacks,
defenses). ``search:`` names one optimising defense of it and a grid of its optimiser options; every candidate is
an ordinary run config on the dataset's **validation split** (screened with a cheap attack, the best points
confirmed with the strong adaptive attacks), so it is cached and resumable like any run, and the test split is never
part of any run the search makes::

    search:
      defense: 1                                  # index into defenses: the optimising defense to tune
      space: {eta: [3, 6], step_rule: [sign, normalized], schedule: [constant, cosine]}
      validation: {split: val, limit: 32}         # split: default = the dataset's declared validation split
      screen_attack: {name: pgd, eps: 8, steps: 5}
      confirm_attacks: [{name: bpda, eps: 8, steps: 10, eot: 2}, {name: aa, eps: 8, steps: 10}]
      confirm_top: 2                              # confirm this many screened points (+ the baseline)
      clean_tolerance: 2.0                        # points of clean metric below the baseline's that are acceptable
      preset: null                                # name of the tuned preset (default: <name>-tuned)

This module is pure configuration: it builds the candidate run configs and the preset, and runs nothing.
"""

from __future__ import annotations

import difflib
import inspect
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from equicore.errors import EquirobustError
from equicore.registry import DATASETS
from tasks.config import CLEAN, RunConfig, _format_validation_error, canonical, parse_config
from tasks.config_errors import ConfigError
from tasks.config_static import StrictModel

# The options of the optimising defenses a search may vary (README, "Optimiser options of the optimising defenses").
TUNABLE = (
    "eps_v",
    "eps_v_factor",
    "eta",
    "steps",
    "step_rule",
    "schedule",
    "grad_norm",
    "noise",
    "noise_scale",
    "random_start",
    "patience",
    "min_delta",
    "keep_best",
    "best_by",
)
BUDGETS = ("eps_v", "eps_v_factor", "eta")  # budgets in /255 units (or a factor): never negative
MAX_CANDIDATES = 64
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class ValidationSplit(StrictModel):
    split: str | None = Field(default=None, description="default: the dataset's declared validation split")
    limit: int | None = Field(default=32, ge=1, description="the first N validation images (null: all)")


class SearchConfig(StrictModel):
    defense: int = Field(ge=0, description="index into defenses: the optimising defense to tune")
    space: dict[str, Any] = Field(description="option -> list of values; the grid is their product")
    validation: ValidationSplit = Field(default_factory=ValidationSplit)
    screen_attack: dict[str, Any] = Field(description="the cheap attack every candidate is screened with")
    confirm_attacks: list[dict[str, Any]] = Field(
        default_factory=list, description="the strong adaptive attacks the best points are confirmed with"
    )
    confirm_top: int = Field(default=2, ge=0, le=MAX_CANDIDATES)
    clean_tolerance: float = Field(default=2.0, ge=0, le=100, description="points (percent metrics) below baseline")
    preset: str | None = Field(default=None, pattern=NAME_PATTERN)


@dataclass(frozen=True)
class Candidate:
    number: int  # 0 = the baseline: the defense entry as the base config gives it
    settings: dict[str, Any]  # the searched options of this candidate ({} for the baseline)
    defense: dict[str, Any]  # the full defense entry

    @property
    def label(self) -> str:
        if not self.settings:
            return "baseline (as configured)"
        return ", ".join(f"{k}={_short(v)}" for k, v in self.settings.items())


@dataclass(frozen=True)
class TuneSpec:
    source: str
    base: dict[str, Any]  # the run config as written (test split), without search:
    search: SearchConfig
    base_config: RunConfig
    validation_split: str
    candidates: list[Candidate]

    @property
    def name(self) -> str:
        return str(self.base["name"])

    @property
    def preset_name(self) -> str:
        return self.search.preset or f"{self.name[:58]}-tuned"

    @property
    def out_dir(self) -> Path:
        return Path(self.base_config.results_dir) / "tune" / self.name

    def screen_config(self, c: Candidate) -> RunConfig:
        return parse_config(self._validation_run(c, [self.search.screen_attack], "screen"), self.source)

    def confirm_config(self, c: Candidate) -> RunConfig:
        data = self._validation_run(c, self.search.confirm_attacks, "confirm")
        return parse_config({**data, "worst_case": True}, self.source)

    def _validation_run(self, c: Candidate, attacks: list[dict[str, Any]], phase: str) -> dict[str, Any]:
        """A run of candidate ``c`` on the validation split only (the base config's dataset selection dropped)."""
        base = self.base
        ds = dict(base["dataset"])
        ds["params"] = {**(ds.get("params") or {}), "split": self.validation_split}
        ds.pop("indices", None)
        ds["limit"] = self.search.validation.limit
        if ds["limit"] is None:
            ds.pop("limit")
        data = {k: v for k, v in base.items() if k not in ("suite", "worst_case", "report")}
        data.update(
            name=f"{self.name[:40]}-tune-{phase}",
            dataset=ds,
            attacks=[{"name": CLEAN}, *attacks],
            defenses=[c.defense],
        )
        return data

    def preset(self, chosen: Candidate) -> dict[str, Any]:
        """The base config (its own dataset split: test) with the tuned defense's entry replaced by ``chosen``."""
        data = dict(self.base)
        defenses = list(data["defenses"])
        defenses[self.search.defense] = chosen.defense
        data.update(name=self.preset_name, defenses=defenses)
        parse_config(data, f"tuned preset {self.preset_name}")  # the preset validates (statically: no data is read)
        return data


def _short(v: Any) -> str:
    return canonical(v) if isinstance(v, dict | list) else str(v)


def _close(name: str, choices: tuple[str, ...]) -> str:
    near = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def factory_default_split(dataset: str) -> str | None:
    default = inspect.signature(DATASETS.get(dataset)).parameters.get("split")
    return None if default is None or default.default is inspect.Parameter.empty else default.default


def resolve_validation_split(base: RunConfig, requested: str | None) -> str:
    """The validation split: the one requested, else the dataset's declared one; never the test split."""
    name = base.dataset.name
    meta = DATASETS.meta(name)
    test_split = base.dataset.params.get("split", factory_default_split(name))
    split = requested or meta.get("validation_split")
    if split is None:
        raise ConfigError(
            f"search.validation.split: dataset {name!r} declares no validation split; name a held-out split of "
            f"your own, disjoint from the test images (README, 'Tuning the defense')"
        )
    forbidden = {s for s in (test_split, meta.get("test_split")) if s is not None}
    if split in forbidden:
        raise ConfigError(
            f"search.validation.split: {split!r} is the test split of this config; tuning must never read it "
            f"(the validation split of {name} is {meta.get('validation_split')!r})"
        )
    return str(split)


def check_space(space: dict[str, Any]) -> list[dict[str, Any]]:
    """The grid of ``space`` as one settings dict per candidate, in order (first option varies slowest)."""
    if not space:
        raise ConfigError("search.space: empty; give at least one option with a list of values")
    for key, values in space.items():
        if key not in TUNABLE:
            raise ConfigError(
                f"search.space.{key}: not a tunable option{_close(key, TUNABLE)}; tunable: {', '.join(TUNABLE)}"
            )
        if not isinstance(values, list) or not values:
            raise ConfigError(f"search.space.{key}: expected a non-empty list of values, got {values!r}")
        if key in BUDGETS:
            for v in values:
                if v is None:
                    continue
                if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                    raise ConfigError(f"search.space.{key}: expected finite numbers, got {v!r}")
                if v < 0:
                    raise ConfigError(f"search.space.{key}: {v} < 0; a budget cannot be negative")
        if len({canonical(v) for v in values}) != len(values):
            raise ConfigError(f"search.space.{key}: a value is listed more than once")
    n = math.prod(len(v) for v in space.values())
    if n > MAX_CANDIDATES:
        raise ConfigError(f"search.space: {n} candidates; at most {MAX_CANDIDATES} (search fewer values)")
    keys = list(space)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(space[k] for k in keys))]


def parse_tune_config(data: Any, source: str = "config") -> TuneSpec:
    """Validate a tune config (ConfigError: one line naming the field) and build its candidates."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    if "search" not in data:
        raise ConfigError(f"{source}: no search: section; a tune config is a run config plus search: (README)")
    base_data = {k: v for k, v in data.items() if k != "search"}
    try:
        search = SearchConfig.model_validate(data["search"])
    except ValidationError as e:
        message = _format_validation_error(e, source)
        raise ConfigError(message.replace(f"{source}: ", f"{source}: search.", 1)) from None
    base = parse_config(base_data, source)
    try:
        return _spec(source, base_data, search, base)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _spec(source: str, base_data: dict[str, Any], search: SearchConfig, base: RunConfig) -> TuneSpec:
    if search.defense >= len(base.defenses):
        raise ConfigError(f"search.defense: {search.defense} is past the end of defenses ({len(base.defenses)})")
    tuned = base.defenses[search.defense]
    from equicore.registry import DEFENSES

    if not getattr(DEFENSES.build(tuned.name, **tuned.params()), "optimizes_at_test_time", False):
        raise ConfigError(
            f"search.defense: defenses.{search.defense} ({tuned.name}) does not optimise at test time; tune one of "
            "equivariance, invariance, rotation, contrastive"
        )
    if search.confirm_top and not search.confirm_attacks:
        raise ConfigError(
            "search.confirm_attacks: empty, but confirm_top is "
            f"{search.confirm_top}; list the strong adaptive attacks (bpda, aa) or set confirm_top: 0"
        )
    split = resolve_validation_split(base, search.validation.split)
    entry = {"name": tuned.name, **tuned.params()}
    if tuned.eval_draws is not None:
        entry["eval_draws"] = tuned.eval_draws
    grid = check_space(search.space)
    candidates = [Candidate(0, {}, entry)]
    seen = [_identity(entry)]
    for settings in grid:
        defense = {**entry, **settings}
        try:
            key = _identity(defense)
        except EquirobustError:
            key = canonical(defense)  # refused by the engine: reported with its candidate below
        if key in seen:  # the grid point IS the baseline (or another point): e.g. step_rule: sign, schedule: constant
            continue
        seen.append(key)
        candidates.append(Candidate(len(candidates), settings, defense))
    spec = TuneSpec(source, base_data, search, base, split, candidates)
    for c in candidates:  # every candidate run is valid before any runs (an option the engine refuses, a bad attack)
        try:
            spec.screen_config(c)
            if search.confirm_top:
                spec.confirm_config(c)
        except ConfigError as e:
            raise ConfigError(f"search.space: candidate {c.label}: {str(e).removeprefix(source + ': ')}") from None
    return spec


def _identity(entry: dict[str, Any]) -> Any:
    """What a defense entry computes: the built defense (options in canonical form, defaults filled) and its draws."""
    from equicore.registry import DEFENSES

    params = {k: v for k, v in entry.items() if k not in ("name", "eval_draws")}
    return (DEFENSES.build(entry["name"], **params), entry.get("eval_draws"))


def load_tune_config(path: str | Path, *, in_process: bool = False) -> TuneSpec:
    """A tune config FILE (read within limits, no network fields, ``${VAR}`` in paths); ``in_process``: run every
    candidate in this process (``--in-process``; not part of any run id)."""
    from tasks.config_checks import expand_env, refuse_network_fields
    from tasks.config_yaml import read_config_file

    p = Path(path)
    data = read_config_file(p)
    if isinstance(data, dict):
        try:
            refuse_network_fields({k: v for k, v in data.items() if k != "search"})
            data = {**expand_env({k: v for k, v in data.items() if k != "search"}), "search": data.get("search")}
            if data["search"] is None:
                data.pop("search")
            if in_process:
                cluster = {k: v for k, v in (data.get("cluster") or {}).items() if k not in ("n_workers", "dashboard")}
                data["cluster"] = {**cluster, "in_process": True}
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
    return parse_tune_config(data, str(p))
