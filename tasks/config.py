"""Run configuration: YAML validated by pydantic. Unknown keys are rejected and every error names its field.

Names (dataset, model, attack, defense, views) are checked against the engine's registries at load time, and
attack/defense parameters are checked by building the objects, so a typo fails before anything is written.

Types are strict: a boolean is not a number, a string is not a number or a boolean, and every float is finite
(``eps: true``, ``batch_size: "8"``, ``retry_delay_s: [.nan]`` fail naming the field). Fields that cannot take
effect together (``dataset.limit`` with ``dataset.indices``, ``cluster.in_process`` with a cluster, ...) are an
error, not one silently ignored. A config file is read by :mod:`tasks.config_yaml` (limits against hostile YAML)
and checked by :mod:`tasks.config_checks` (no network exposure from a file, ``${VAR}`` only in paths).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from equicore.errors import EquirobustError
from equicore.registry import ATTACKS, DATASETS, DEFENSES, LOSSES, MODELS
from tasks.config_checks import (
    LOCALHOST,
    check_param_types,
    check_scheduler_address,
    expand_env,
    factory_hints,
    refuse_network_fields,
    shown,
)
from tasks.config_errors import ConfigError
from tasks.config_model import DEFAULT_GRAPH, USER_MODEL_FIELDS, ModelConfig
from tasks.config_static import StrictModel, checked, known, static_pass, static_pass_on
from tasks.config_yaml import read_config_file
from tasks.user_code import check_factory_found, resolve_plugins

__all__ = ["CLEAN", "ConfigError", "ModelConfig", "RunConfig", "expand_env", "load_config", "parse_config"]

CLEAN = "clean"  # the pseudo-attack that leaves images unchanged (the "Clean" row of the paper's tables)
TASK_METRICS = {"classification": "accuracy", "segmentation": "miou", "instance": "mask_ap"}
DEFAULT_EVAL_DRAWS = 4  # draws of a randomised defense each image is scored under (eval_draws)
MAX_ATTACKS = 256  # entries of `attacks` after suites and lambda_e sweeps are expanded
MAX_DEFENSES = 64
MAX_WORKERS = 512  # local Dask worker processes
MAX_RETRY_DELAY_S = 3600.0


def _built(build: Callable[[], Any], name: str, hints: dict[str, Any], params: dict[str, Any]) -> None:
    """Build an attack or defense: the engine's own checks speak first (their messages), then the declared types
    catch what the engine lets through (``eps: true``) or trips over (``target: 5``), naming the parameter."""
    if static_pass_on():
        return
    try:
        build()
    except EquirobustError as e:
        raise ValueError(str(e)) from None
    except Exception as e:  # noqa: BLE001  (a factory surprised by a type: say which parameter)
        checked(lambda p: check_param_types(name, hints, p), params)
        raise ValueError(f"{name}: {type(e).__name__}: {e}") from None
    checked(lambda p: check_param_types(name, hints, p), params)


def _hints(registry: Any, name: str, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Declared types of the parameters of registered factory ``name`` (none for an unknown name, or in the static
    pass)."""
    if static_pass_on() or name not in registry:
        return {}
    return {k: v for k, v in factory_hints(registry.get(name)).items() if k not in skip}


class DatasetConfig(StrictModel):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    limit: int | None = Field(default=None, ge=1, description="evaluate the first N samples")
    indices: list[Annotated[int, Field(ge=0)]] | None = Field(
        default=None, description="evaluate exactly these indices (not with limit)"
    )

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        return known("datasets", DATASETS, v)

    @model_validator(mode="after")
    def _selection(self) -> DatasetConfig:
        if self.limit is not None and self.indices is not None:
            raise ConfigError(
                "limit and indices conflict: indices selects exactly the samples to evaluate, so limit would be "
                "ignored; give one of them"
            )
        if self.indices is not None and len(set(self.indices)) != len(self.indices):
            dupes = sorted({i for i in self.indices if self.indices.count(i) > 1})
            raise ConfigError(f"indices: {dupes[:5]} listed more than once; each sample is evaluated once")
        checked(lambda p: check_param_types(self.name, _hints(DATASETS, self.name), p), self.params)
        return self


class AttackConfig(StrictModel):
    model_config = ConfigDict(extra="allow", frozen=True)  # attack parameters, checked by building the attack
    name: str

    @model_validator(mode="after")
    def _build(self) -> AttackConfig:
        if self.name != CLEAN and static_pass_on():
            known("attacks", ATTACKS, self.name)
        elif self.name != CLEAN:
            from equicore.attacks import build_attack
            from equicore.attacks.attack import ATTACK_PARAMS, Attack

            hints = {k: v for k, v in factory_hints(Attack).items() if k in ATTACK_PARAMS}
            _built(lambda: build_attack(self.name, **self.params()), self.name, hints, self.params())
        elif self.params():
            raise ConfigError(f"attack 'clean' takes no parameters, got {sorted(self.params())}")
        return self

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def eps(self) -> float | None:
        if self.name == CLEAN:
            return None
        from equicore.attacks import build_attack

        return build_attack(self.name, **self.params()).eps

    @property
    def defense_aware(self) -> bool:
        """BPDA / AA / Square: the adversarial images depend on the defense, so they are generated per defense."""
        if self.name == CLEAN:
            return False
        from equicore.attacks import build_attack

        return build_attack(self.name, **self.params()).defense_aware

    def sweep_group(self) -> str | None:
        """Entries of one ``lambda_e`` sweep share this label (the attack minus lambda_e); None outside sweeps."""
        if self.name != "aa":
            return None
        return canonical({"name": self.name, **{k: v for k, v in self.params().items() if k != "lambda_e"}})


class DefenseConfig(StrictModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    name: str
    eval_draws: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="score each image under this many independent draws of a randomised defense (default: "
        f"{DEFAULT_EVAL_DRAWS} for randomised defenses, 1 otherwise); reported as the mean over draws and the "
        "all-draws worst",
    )

    def resolved_eval_draws(self, randomized: bool) -> int:
        if self.eval_draws is not None:
            return self.eval_draws if randomized else 1
        return DEFAULT_EVAL_DRAWS if randomized else 1

    @model_validator(mode="after")
    def _build(self) -> DefenseConfig:
        if static_pass_on():
            known("defenses", DEFENSES, self.name)
        _built(
            lambda: DEFENSES.build(self.name, **self.params()), self.name, _hints(DEFENSES, self.name), self.params()
        )
        draws = self.eval_draws or 1
        if draws > 1 and not static_pass_on() and not DEFENSES.build(self.name, **self.params()).randomized:
            raise ConfigError(
                f"eval_draws: {self.eval_draws} draws of defense {self.name!r}, which is not randomised (every draw "
                "is the same); remove eval_draws"
            )
        return self

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class MeasureConfig(StrictModel):
    """The equivariance score recorded per sample before and after defense (Table 4)."""

    enabled: bool = True
    views: str | list[Any] = "paper"
    seed: int = Field(default=0, ge=0)

    @field_validator("views")
    @classmethod
    def _known_views(cls, v: str | list[Any]) -> str | list[Any]:
        # Checked at load time like a defense's views: a typo must not surface only when a shard first scores.
        if static_pass_on():
            return v
        from equicore.transforms import build_views

        return checked(build_views, v)


ReportLayout = Literal["attack_x_defense", "eps_v_sweep", "k_sweep", "ablation", "equivariance"]
REPORT_LAYOUTS: tuple[str, ...] = get_args(ReportLayout)


class ReportConfig(StrictModel):
    """How ``equi report`` presents the run. Not part of the run id: retitling a run never recomputes it."""

    experiment: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="page name under the report folder (default: the config's name)",
    )
    title: str | None = Field(default=None, description="heading of the experiment's page")
    layout: ReportLayout = Field(
        default="attack_x_defense",
        description="attack_x_defense: paper tables; eps_v_sweep: Table 6; k_sweep: Figure 3; ablation: Table 5; "
        "equivariance: Table 4",
    )
    examples: int = Field(
        default=0, ge=0, le=64, description="record the first N samples' images and predictions (Figure 2 grid)"
    )


class ClusterConfig(StrictModel):
    """Where a run executes. ``address`` and a non-loopback ``host`` come only from the command line (``--cluster``,
    ``--listen``): a config file naming them is refused (:func:`tasks.config_checks.refuse_network_fields`)."""

    address: str | None = Field(
        default=None, description="existing Dask scheduler, e.g. tcp://host:8786 (only from --cluster)"
    )
    n_workers: int | None = Field(
        default=None, ge=1, le=MAX_WORKERS, description="default: one per GPU, else one per 2 cores"
    )
    threads_per_worker: int = Field(default=1, ge=1, le=64)
    torch_threads: int | None = Field(
        default=None, ge=1, le=256, description="torch threads per worker (default: cores/workers)"
    )
    host: str = Field(
        default=LOCALHOST, description="interface the local scheduler and workers bind to (non-loopback: --listen)"
    )
    gpu_resources: bool | None = Field(
        default=None,
        description="annotate GPU work with Dask resources {GPU: 1} (default: for local clusters with GPUs)",
    )
    dashboard: bool = False
    in_process: bool = Field(default=False, description="run shards sequentially in this process (no Dask)")
    connect_timeout_s: float = Field(
        default=10.0, gt=0, le=300, description="seconds to reach the scheduler of --cluster before giving up"
    )

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        return None if v is None else checked(check_scheduler_address, v)

    @model_validator(mode="after")
    def _one_way_to_run(self) -> ClusterConfig:
        """Settings of one way of running that another would silently ignore are an error."""
        ways = {"in_process": self.in_process, "address (--cluster)": self.address is not None}
        local = {
            "n_workers (--workers)": self.n_workers is not None,
            "dashboard": self.dashboard,
            "host (--listen)": self.host != LOCALHOST,
        }
        if all(ways.values()):
            raise ConfigError("in_process and address (--cluster) conflict: run in this process or on a scheduler")
        for way, chosen in ways.items():
            clash = [k for k, v in local.items() if v]
            if chosen and clash:
                raise ConfigError(
                    f"{way} and {clash[0]} conflict: {clash[0].split(' ')[0]} applies to a local Dask cluster only"
                )
        return self


def expand_sweeps(data: Any) -> Any:
    """``{name: aa, lambda_e: [0.1, 1, 10]}`` -> one attack entry per value (each cached and scored on its own; the
    results table adds the worst case over the sweep)."""
    if not isinstance(data, dict) or not isinstance(data.get("attacks"), list):
        return data
    attacks: list[Any] = []
    for entry in data["attacks"]:
        values = entry.get("lambda_e") if isinstance(entry, dict) else None
        if isinstance(values, list):
            if not values:
                raise ValueError(f"attack {entry.get('name')!r}: lambda_e sweep is empty")
            attacks += [{**entry, "lambda_e": v} for v in values]
        else:
            attacks.append(entry)
    return {**data, "attacks": attacks}


SUITES = ("standard",)


def standard_suite(task: str | None, eps: float, norm: str, adaptive: bool) -> list[dict[str, Any]]:
    """AutoAttack's 'standard' version, per task, as attack entries (run with ``worst_case``):

    - classification: APGD-CE, APGD-T (targeted DLR over the top-9 classes), Square (5000 queries);
    - segmentation: APGD on each of SEA's per-pixel losses (masked CE, balanced masked CE, JS divergence; SEA keeps
      each image's worst);
    - instance segmentation: APGD on the model's own losses;
    plus, when a defense optimises at test time or is randomised (AutoAttack's 'rand' version), BPDA with EOT and the
    defense-aware attack AA, both on APGD.
    """
    base = {"eps": eps, "norm": norm}
    if task == "segmentation":
        attacks = [{"name": "apgd", "loss": loss, **base} for loss in ("masked_ce", "masked_ce_balanced", "js")]
    elif task == "instance":
        attacks = [{"name": "apgd", **base}]
    else:
        attacks = [{"name": "apgd", **base}, {"name": "apgd_t", **base}]
        if norm in ("linf", "l2"):
            attacks.append({"name": "square", **base})
    if adaptive:
        loss = {"loss": "masked_ce"} if task == "segmentation" else {}
        attacks += [{"name": "bpda", **loss, **base}, {"name": "aa", **loss, **base}]
    return [{"name": CLEAN}, *attacks]


class SuiteConfig(StrictModel):
    name: Literal["standard"]
    eps: float = Field(gt=0, le=255, description="budget in /255 units")
    norm: Literal["linf", "l2"] = "linf"


def expand_suite(data: Any) -> Any:
    """``suite: {name: standard, eps: 8}`` -> its attack entries ahead of any listed ``attacks``, and
    ``worst_case: true`` unless set."""
    if not isinstance(data, dict) or data.get("suite") is None:
        return data
    try:
        suite = SuiteConfig.model_validate(data["suite"])
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, "suite")) from None
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    name = model.get("name")
    task = MODELS.meta(name).get("task") if isinstance(name, str) and name in MODELS else model.get("task")
    adaptive = False
    for d in data.get("defenses") or []:
        if isinstance(d, dict) and isinstance(d.get("name"), str) and d["name"] in DEFENSES:
            params = {k: v for k, v in d.items() if k not in ("name", "eval_draws")}
            try:
                spec = DEFENSES.build(d["name"], **params)
            except EquirobustError:
                continue  # reported with its field when the defenses are validated
            adaptive |= bool(spec.optimizes_at_test_time or spec.randomized)
    listed = data.get("attacks") or []
    if not isinstance(listed, list):
        return data
    expanded = standard_suite(task, suite.eps, suite.norm, adaptive)
    return {
        **{k: v for k, v in data.items() if k != "suite"},
        "attacks": expanded + listed,
        "worst_case": data.get("worst_case", True),
        "suite_used": suite.model_dump(),
    }


class RunConfig(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    dataset: DatasetConfig
    model: ModelConfig
    attacks: list[AttackConfig] = Field(min_length=1)
    defenses: list[DefenseConfig] = Field(min_length=1)
    reference_eps: float | None = Field(
        default=None, ge=0, le=255, description="eps (/255) that resolves defenses' eps_v on clean images"
    )
    measure: MeasureConfig = Field(default_factory=MeasureConfig)
    shard_size: int = Field(default=64, ge=1)
    batch_size: int = Field(default=32, ge=1)
    seed: int = Field(default=0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cache_dir: str = ".equi/cache"
    results_dir: str = ".equi/results"
    retries: int = Field(default=2, ge=0, le=20)
    retry_delay_s: list[Annotated[float, Field(ge=0, le=MAX_RETRY_DELAY_S)]] = Field(
        default_factory=lambda: [2.0, 10.0], max_length=20
    )
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    worst_case: bool = Field(
        default=False,
        description="add, per defense, the per-image worst case over every attack of the run (attack 'worst'); "
        "built from the cached per-attack outputs, so it never changes a number of its own",
    )

    suite_used: SuiteConfig | None = Field(default=None, description="the suite the attacks were expanded from")
    plugins: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="your own .py files or folders (relative to the config file) where model.factory is found",
    )

    @model_validator(mode="before")
    @classmethod
    def _expand_sweeps(cls, data: Any) -> Any:
        data = expand_sweeps(expand_suite(data))
        for kind, most in (("attacks", MAX_ATTACKS), ("defenses", MAX_DEFENSES)):
            entries = data.get(kind) if isinstance(data, dict) else None
            if isinstance(entries, list) and len(entries) > most:
                raise ConfigError(f"{kind}: {len(entries)} entries (suites and sweeps expanded); at most {most}")
        return data

    @model_validator(mode="after")
    def _no_conflicts(self) -> RunConfig:
        """Fields that cannot take effect together: one of them would be silently ignored, or the run would hang."""
        if self.report.layout == "equivariance" and not self.measure.enabled:
            raise ConfigError(
                "report.layout 'equivariance' (Table 4) shows the equivariance measure, but measure.enabled is false"
            )
        if self.cluster.gpu_resources and self.device == "cpu" and not self.cluster.address:
            raise ConfigError(
                "cluster.gpu_resources: true asks every task for a GPU, but device is cpu: the local workers have "
                "none and the tasks would wait forever; remove gpu_resources or set device: cuda"
            )
        return self

    @model_validator(mode="after")
    def _attacks_fit_task(self) -> RunConfig:
        # Fail at load time, not on a worker hours later: e.g. Houdini is a segmentation attack.
        if static_pass_on():
            return self
        task = self.model.task_name
        if not task:
            return self
        from equicore.attacks import build_attack

        for i, a in enumerate(self.attacks):
            if a.name == CLEAN:
                continue
            spec = build_attack(a.name, **a.params())
            attack_tasks = ATTACKS.meta(a.name).get("tasks", ())
            if spec.optimizer == "square":
                attack_tasks = ("classification",)
            if attack_tasks and task not in attack_tasks:
                raise ConfigError(f"attacks.{i} ({a.name}): defined for {list(attack_tasks)} models, not {task}")
            tasks = LOSSES.meta(spec.loss).get("tasks", ())
            if tasks and task not in tasks:
                raise ConfigError(
                    f"attacks.{i} ({a.name}): loss {spec.loss!r} is not defined for {task} models (only {list(tasks)})"
                )
            if spec.targeted and task == "instance":
                raise ConfigError(f"attacks.{i} ({a.name}): targeted attacks are not defined for instance models")
        return self

    @model_validator(mode="after")
    def _factory_found(self) -> RunConfig:
        # The module is located (never imported) now: `os:system` or a module outside plugins fails at load time.
        if self.model.factory is not None:
            check_factory_found(self.model.factory, self.plugins)
        elif self.plugins:
            raise ConfigError("plugins: only a model.factory uses them; remove plugins or set model.factory")
        return self

    @model_validator(mode="after")
    def _batches_align(self) -> RunConfig:
        # Batches never straddle shards and every shard splits into the same batches whatever the shard count, so
        # per-sample results are bit-identical under 1, 2 or N shards.
        if self.shard_size % self.batch_size:
            raise ValueError(f"shard_size ({self.shard_size}) must be a multiple of batch_size ({self.batch_size})")
        return self

    @model_validator(mode="after")
    def _unique(self) -> RunConfig:
        for kind, items in (("attacks", self.attacks), ("defenses", self.defenses)):
            keys = [canonical({"name": i.name, **i.params()}) for i in items]
            dupes = {k for k in keys if keys.count(k) > 1}
            if dupes:
                raise ConfigError(f"{kind}: duplicate entries {sorted(dupes)}")
        return self

    # -- identity -------------------------------------------------------------------------------------------------
    def semantic_dict(self) -> dict[str, Any]:
        """What determines the numbers: excludes where and how it runs (cluster, retries, directories) and how it is
        reported (``report``: the recorded examples are extra output, not numbers)."""
        d = self.model_dump(mode="json")
        for k in ("cluster", "retries", "retry_delay_s", "cache_dir", "results_dir", "device", "report", "worst_case"):
            d.pop(k, None)
        d.pop("suite_used", None)  # the expanded attacks are what determines the numbers
        d.pop("plugins", None)  # where code lives; its digest is in the cache keys (tasks.code_identity)
        for key in ("name", *USER_MODEL_FIELDS):  # unset: the identity of configs written before user models
            if d["model"].get(key) is None:
                d["model"].pop(key, None)
        if d["model"].get("graph") == DEFAULT_GRAPH:  # the identity of configs written before model.graph
            d["model"].pop("graph")
        for defense in d["defenses"]:  # unset: the identity of configs written before eval_draws existed
            if defense.get("eval_draws") is None:
                defense.pop("eval_draws", None)
        return d

    def config_hash(self) -> str:
        return hashlib.sha256(canonical(self.semantic_dict()).encode()).hexdigest()[:16]

    def run_id(self) -> str:
        """Same config -> same run id, so running it again resumes instead of starting over."""
        return f"{self.name}-{self.config_hash()[:10]}"

    def resolved_reference_eps(self) -> float:
        if self.reference_eps is not None:
            return self.reference_eps
        eps = [a.eps for a in self.attacks if a.name != CLEAN]
        return max(eps) if eps else 4.0


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    ctx_err = (first.get("ctx") or {}).get("error")
    if isinstance(ctx_err, Exception):
        msg = str(ctx_err)
    msg = msg.removeprefix("Value error, ")
    if first["type"].endswith("_type") or first["type"] == "finite_number":  # strict types: say what was given
        msg = f"{msg}, got {shown(first.get('input'))}"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {loc}: {msg}{more}"


def parse_config(data: Any, source: str = "config") -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        if "suite" not in data:  # (suites are expanded by the engine's registries)
            # Static pass first: most mistakes (unknown keys and names, types, bounds) fail here without torch.
            with static_pass():
                RunConfig.model_validate(data)
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None
    except EquirobustError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_config(
    path: str | os.PathLike[str], sets: Sequence[str] = (), *, limit: int | None = None, device: str | None = None
) -> RunConfig:
    """A config FILE: read within limits (:mod:`tasks.config_yaml`), command-line overrides applied (``--set``,
    ``--limit``, ``--device``: :mod:`tasks.config_overrides`), without network settings (those come from their own
    flags), ``${VAR}`` expanded in path fields, then validated."""
    from tasks.config_overrides import apply_overrides

    p = Path(path)
    data = read_config_file(p)
    flags = [*(f"--set {s}" for s in sets), *([f"--limit {limit}"] if limit is not None else [])]
    flags += [f"--device {device}"] if device is not None else []
    source = f"{p} (with {', '.join(flags)})" if flags else str(p)
    if isinstance(data, dict):
        try:
            data = apply_overrides(data, sets, limit=limit, device=device)
            refuse_network_fields(data)
            data = resolve_plugins(expand_env(data), p.resolve().parent)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    return parse_config(data, source)
