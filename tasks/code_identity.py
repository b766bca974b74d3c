"""The code a cached attack or a stored unit depends on, one version per component.

Like lm-evaluation-harness' per-task ``metadata.version`` rather than one hash of the whole engine: each registry
entry carries an explicit version and the digest of the modules its maths run in (:mod:`equicore.code_identity`),
and a key holds only the components its output depends on. So editing training code, reports, a dataset loader
the run does not use or another attack keeps every cached entry valid, while a change to an attack's maths (its own
module, the shared loop, its loss, seeding) invalidates exactly the entries that attack made.

``STEP_VERSIONS`` covers what the pipeline's own shard steps add (seeds per purpose, the per-image columns): bump
the step's version by hand when it changes what it writes.
"""

from __future__ import annotations

from equicore.adapters import ADAPTERS
from equicore.attacks import attack_code_version, build_attack
from equicore.code_identity import code_version
from equicore.registry import DATASETS, DEFENSES, METRICS, MODELS
from tasks.config import CLEAN, TASK_METRICS, AttackConfig, DefenseConfig
from tasks.config_model import DEFAULT_GRAPH
from tasks.runtime import Runtime
from tasks.user_code import user_model_code_version

STEP_VERSIONS = {"attack": "1", "defend": "1"}
# ``model.graph: optimized``: the module that rewrites the model (BatchNorm folding, NHWC).
GRAPH_VERSION = "1"
GRAPH_MODULES = ("equicore.models.inference_graph",)
# The equivariance score reported before and after a defense (``measure:`` in a config) and its view draws.
MEASURE_MODULES = (
    "equicore.equivariance",
    "equicore.seeding",
    "equicore.transforms.base",
    "equicore.transforms.functional",
    "equicore.transforms.library",
    "equicore.transforms.views",
)
# Metrics a unit may score besides its task metric (targeted segmentation attacks, the equivariance score).
EXTRA_METRICS = {"segmentation": ("miou_to_target",)}


def model_code(rt: Runtime) -> dict[str, str]:
    """The model, its task adapter and the dataset loader: what turns a config into images and predictions."""
    m = rt.cfg.model
    model = MODELS.code_version(m.name) if m.name else user_model_code_version(m.factory, m.file, rt.cfg.plugins)
    code = {
        "model": model,
        "adapter": ADAPTERS.code_version(rt.task),
        "dataset": DATASETS.code_version(rt.cfg.dataset.name),
    }
    if m.graph != DEFAULT_GRAPH:  # the optimised graph's code; absent for plain, so plain keys stay as they were
        code["graph"] = code_version(GRAPH_VERSION, GRAPH_MODULES)
    return code


def attack_code(rt: Runtime, attack: AttackConfig, target: DefenseConfig | None = None) -> dict[str, str]:
    """Components an attack's adversarial images depend on; ``target``: the defense a defense-aware attack sees."""
    code = {"step": STEP_VERSIONS["attack"], **model_code(rt)}
    if attack.name != CLEAN:
        code["attack"] = attack_code_version(build_attack(attack.name, **attack.params()))
    if target is not None:
        code["defense"] = DEFENSES.code_version(target.name)
    return code


def measure_code() -> str:
    """Version of the equivariance measure (its module digests): part of every key a measured score is stored under."""
    return code_version("1", MEASURE_MODULES)


def defense_code(rt: Runtime, defense: DefenseConfig) -> dict[str, str]:
    """Components a unit's scores depend on besides its images: the defense, the measure and the metrics."""
    metrics = (TASK_METRICS[rt.task], *EXTRA_METRICS.get(rt.task, ()), "equivariance_score")
    return {
        "step": STEP_VERSIONS["defend"],
        **model_code(rt),
        "defense": DEFENSES.code_version(defense.name),
        "measure": measure_code(),
        **{f"metric:{name}": METRICS.code_version(name) for name in metrics},
    }
