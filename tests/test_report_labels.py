"""Report columns follow the config's entries: a row without a config attack (the per-image worst case) lands in
its defense's column even when the defense's recorded parameters are in canonical form and the config's are not
(``schedule: cosine`` is recorded as ``{"name": "cosine", "final": 0}``)."""

from __future__ import annotations

import json

from reports.tables import RunIndex, label_rows


def _row(attack: str, attack_key: str, defense_key: str, params: dict) -> dict:
    return {
        "attack": attack,
        "attack_params": "",
        "attack_key": attack_key,
        "defense": "equivariance",
        "defense_params": json.dumps(params),
        "defense_key": defense_key,
    }


def test_the_worst_case_row_lands_in_its_defense_column() -> None:
    index = RunIndex(
        attacks=[("clean", {})],
        defenses=[("equivariance", {"steps": 10}), ("equivariance", {"steps": 10, "schedule": "cosine"})],
        unit_of={("a-clean", "d-paper"): (0, 0), ("a-clean", "d-tuned"): (0, 1)},
    )
    tuned = {"steps": 10, "schedule": {"final": 0, "name": "cosine"}}
    rows = label_rows(
        [
            _row("clean", "a-clean", "d-paper", {"steps": 10}),
            _row("clean", "a-clean", "d-tuned", tuned),
            _row("worst", "worst-1234", "d-paper", {"steps": 10}),
            _row("worst", "worst-1234", "d-tuned", tuned),
        ],
        index,
    )
    labels = [(r["attack"], r["defense_label"], r["defense_index"]) for r in rows]
    assert labels[2][1:] == labels[0][1:] and labels[3][1:] == labels[1][1:]
    assert labels[1][1] == "equivariance (schedule=cosine)" and labels[3][2] == 1
