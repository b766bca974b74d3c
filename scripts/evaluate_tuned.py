"""The test evaluation of a finished `equi tune` search: the base config's vanilla, the paper's setting (the
search's baseline, as written in the tune config) and the tuned setting, in ONE run on the test split.

    python scripts/evaluate_tuned.py configs/tune/fashion_equivariance.yaml  # RESULTS/tune/<name>/<name>-test.yaml
    equi run .equi/results/tune/<name>/<name>-test.yaml

The tuned entry is read from the preset `equi tune` wrote; nothing is chosen here (the choice was made on the
validation split), so evaluating the baseline beside it on test reads the test split once, for the report.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv: list[str]) -> int:
    from storage.atomic import atomic_write_text
    from tasks.tune_config import load_tune_config

    spec = load_tune_config(argv[0])
    out = Path(spec.base_config.results_dir) / "tune" / spec.name
    preset_path = out / f"{spec.preset_name}.yaml"
    if not preset_path.exists():
        print(f"error: {preset_path} not found: run `equi tune {argv[0]}` first", file=sys.stderr)
        return 2
    preset = yaml.safe_load(preset_path.read_text())
    index = spec.search.defense
    tuned, baseline = preset["defenses"][index], spec.base["defenses"][index]
    defenses = [d for i, d in enumerate(spec.base["defenses"]) if i != index] + [baseline]
    if tuned != baseline:  # the baseline may have won: then it is evaluated once
        defenses.append(tuned)
    test = {**preset, "name": f"{spec.name[:58]}-test", "defenses": defenses}
    path = atomic_write_text(out / f"{spec.name}-test.yaml", yaml.safe_dump(test, sort_keys=False))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
