"""Only the build step setup.cfg cannot express: the recipes (configs/) and cluster examples
(cluster_configs/) are copied into the trainer package of a built wheel (trainer/_recipes/), so that
an installed ``simclr`` finds them by name from any folder (trainer/runtime/recipes.py). An editable install
reads them from the clone."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

RECIPE_FOLDERS = ("configs", "cluster_configs")


class BuildWithRecipes(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        here = Path(__file__).resolve().parent
        for folder in RECIPE_FOLDERS:
            target = Path(self.build_lib) / "trainer" / "_recipes" / folder
            target.mkdir(parents=True, exist_ok=True)
            for recipe in sorted((here / folder).glob("*.yaml")):
                shutil.copy2(recipe, target / recipe.name)


setup(cmdclass={"build_py": BuildWithRecipes})
