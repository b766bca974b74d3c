"""Training and clean evaluation of the project's own models, and of the self-supervised defense heads.

Outside the engine on purpose: ``equicore`` never imports this package, so editing a recipe, the loop or a model
card's wording leaves the engine's code version (and every cached attack) unchanged.

- ``training.recipes``: ``Recipe`` and the ``RECIPES`` registry (``get_recipe``).
- ``training.data``, ``training.augment``, ``training.loop``: a recipe's data, augmentation and training loop.
- ``training.run``: ``train(name)``, which saves the checkpoint and its JSON card.
- ``training.evaluate``: ``evaluate_clean``, the clean metric on the TEST split, with ``equicore.metrics``.
- ``training.cards``: ``MODEL_CARDS.md`` from the JSON cards.
- ``training.heads``: the rotation and contrastive heads (``equi train-head``).

Pure torch: no prefect/dask/zarr imports. Randomness comes from generators seeded by the recipe's seed, so a run is
reproducible on the same machine and thread count.
"""

from training.cards import CARDS_FILE, load_cards, render_model_cards, write_model_cards
from training.evaluate import evaluate_clean, lenet_reference_accuracies
from training.recipes import RECIPES, Recipe, default_checkpoint, get_recipe, pretrain_recipe
from training.run import train

__all__ = [
    "CARDS_FILE",
    "RECIPES",
    "Recipe",
    "default_checkpoint",
    "evaluate_clean",
    "get_recipe",
    "lenet_reference_accuracies",
    "load_cards",
    "pretrain_recipe",
    "render_model_cards",
    "train",
    "write_model_cards",
]
