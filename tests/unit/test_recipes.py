"""Every bundled model has a recipe, and every recipe builds a valid model and training config."""

from importlib import resources

import pytest
import yaml

from attnserve.core.manifest import discover
from attnserve.models.architectures import architecture
from attnserve.models.tasks import TASKS, task
from attnserve.models.train import TrainConfig
from tests.conftest import BUNDLED_REPOSITORY

RECIPES = yaml.safe_load(resources.files("attnserve.models").joinpath("recipes.yaml").read_text("utf-8"))


def test_every_bundled_model_has_a_recipe_of_its_task_and_family():
    for manifest in discover(BUNDLED_REPOSITORY):
        recipe = RECIPES[manifest.name]
        assert (recipe["task"], recipe["architecture"]) == (manifest.task, manifest.architecture)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_builds_its_model_and_stages(name):
    recipe = RECIPES[name]
    assert recipe["task"] in TASKS
    model = architecture(recipe["architecture"]).new_model(40, 30, **recipe["model"])
    assert sum(p.numel() for p in model.parameters()) > 0
    settings = [dict(stage) for stage in recipe["train"]]
    stage_args = [s.pop("task_args", None) for s in settings]  # a stage may change its task's arguments
    stages = [TrainConfig(**s) for s in settings]
    assert stages and all(s.epochs > 0 and s.lr > 0 for s in stages)
    for args in filter(None, stage_args):
        assert task(recipe["task"], **{**recipe.get("task_args", {}), **args}).arguments


@pytest.mark.parametrize(
    ("options", "message"),
    [(["--stage", "99"], "has stages 1 to"), (["--stage", "7"], "continues from stage 6; pass --init-from")],
)
def test_a_stage_that_cannot_run_alone_is_refused_in_plain_words(options, message, capsys, tmp_path):
    from attnserve.cli.main import main

    assert main(["train", "--recipe", "dates-luong", "--out", str(tmp_path), *options]) == 2
    assert message in capsys.readouterr().err
