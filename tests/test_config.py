import re
import subprocess
import sys

import pytest

from trainer.config import ConfigError, config_to_dict, load_config
from trainer.runtime.dataclass_yaml import parse_overrides

RECIPES = ["configs/demo_cpu.yaml", "configs/cifar10_resnet18.yaml", "configs/imagenet_resnet50.yaml",
           "configs/imagenet_resnet50_multicrop.yaml", "configs/imagenet_resnet50_progressive.yaml"]


def test_defaults_and_overrides():
    cfg = load_config(None, ["optim.lr=0.5", "train.epochs=10", "data.augment.crop_scale=[0.2, 1.0]",
                             "precision.dtype=bf16"])
    assert cfg.optim.lr == 0.5 and cfg.train.epochs == 10
    assert cfg.data.augment.crop_scale == (0.2, 1.0)
    assert cfg.precision.dtype == "bf16"


def test_precision_shorthand(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("precision: fp16\n")
    assert load_config(f).precision.dtype == "fp16"


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_load(recipe):
    load_config(recipe)


def test_paper_recipes():
    cifar = load_config("configs/cifar10_resnet18.yaml")
    assert cifar.data.augment.blur_prob == 0 and cifar.data.augment.jitter_strength == 0.5
    assert cifar.loss.temperature == 0.5 and cifar.model.cifar_stem
    imnet = load_config("configs/imagenet_resnet50.yaml")
    assert imnet.data.batch_size == 4096 and imnet.optim.name == "lars" and imnet.optim.lr == 0.3
    assert imnet.optim.lr_scaling == "linear" and imnet.optim.weight_decay == 1e-6
    assert imnet.loss.temperature == 0.1 and imnet.optim.warmup_epochs == 10 and imnet.optim.schedule == "cosine"


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"optim\.weight_decy.*did you mean 'weight_decay'"):
        load_config(None, ["optim.weight_decy=0.1"])
    with pytest.raises(ConfigError, match=r"'loss\.temprature'.*'temperature'"):
        load_config(None, ["loss.temprature=0.1"])
    with pytest.raises(ConfigError, match="unknown config key 'optimizer'.*'optim'"):
        load_config(None, ["optimizer.lr=0.1"])


@pytest.mark.parametrize("override,needle", [
    ("data.batch_size=0", "data.batch_size: 0 is out of range"),
    ("data.batch_size=-8", "data.batch_size"),
    ("loss.temperature=0", "loss.temperature: 0.0 is out of range"),
    ("precision.dtype=fp8", "precision.dtype: 'fp8' is not allowed; choose one of fp32, bf16, fp16"),
    ("train.epochs=ten", "train.epochs: expected an integer, got 'ten'"),
    ("model.cifar_stem=maybe", "model.cifar_stem: expected true or false"),
    ("model.arch=vit", "model.arch='vit' is not an encoder we build"),
    ("data.augment.grayscale_prob=1.5", "grayscale_prob"),
    ("optim.momentum=1", "optim.momentum"),
    ("dist.flight_recorder_entries=-1", "dist.flight_recorder_entries: -1 is out of range"),
])
def test_bad_values_name_key_value_and_allowed(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert needle in str(err.value)


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["optim.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_roundtrip_through_dict():
    from trainer.config import config_from_dict

    cfg = load_config("configs/imagenet_resnet50.yaml")
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_cli_user_error_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launch", "train", "loss.temperature=-1"], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "loss.temperature" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "launch", "train", "data.root=/nonexistent/x", "train.device=cpu",
                           "tracking.enabled=false", f"train.run_dir={tmp_path}/r"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "/nonexistent/x does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "launch", "train", "--nproc", "2", "data.root=/nonexistent/x"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "/nonexistent/x does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_help():
    for args in ([], ["train"], ["eval"], ["demo"]):
        proc = subprocess.run([sys.executable, "-m", "launch", *args, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "usage: simclr" in proc.stdout


def test_readme_config_reference_lists_every_key_with_a_meaning():
    """Every config key has one row of four cells (a stray `||` left the meaning column empty)."""
    import dataclasses
    import re

    from tests.helpers.runs import REPO
    from trainer.config import Config

    def keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.type) or (isinstance(f.default_factory, type)
                                                    and dataclasses.is_dataclass(f.default_factory)):
                yield from keys(f.default_factory, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    text = (REPO / "docs" / "config-reference.md").read_text()
    table = text[text.index("## Config reference"):]
    rows = {}
    for line in table.splitlines():
        m = re.match(r"\| `([a-z_.]+)` \|", line)
        if m:
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            rows[m.group(1)] = cells
    missing = [k for k in keys(Config) if k not in rows]
    assert not missing, f"docs/config-reference.md lacks {missing}"
    empty = [k for k, cells in rows.items() if len(cells) != 4 or not cells[3]]
    assert not empty, f"rows without four cells or a meaning: {empty}"


def test_install_page_version_ranges_are_those_setup_cfg_declares():
    import configparser

    from packaging.requirements import Requirement

    from tests.helpers.runs import REPO

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    reqs = {Requirement(x).name: Requirement(x) for x in cfg["options"]["install_requires"].splitlines()
            if x.strip() and not x.strip().startswith("#")}
    readme = " ".join((REPO / "docs" / "install.md").read_text().split())
    for name in ("torch", "torchvision", "mlflow", "submitit"):
        spec = ",".join(str(s) for s in sorted(reqs[name].specifier, key=lambda s: s.operator != ">="))
        assert f"{name} {spec}" in readme, f"docs/install.md should say '{name} {spec}' (setup.cfg)"


def test_every_config_field_says_what_a_resume_may_do_with_it():
    """A new key declared without fixed(...), setting(...) or hyper(...) would silently count as a
    hyper-parameter; the run's whole config, flattened, has a policy for every key."""
    import dataclasses

    from foundation.resume_policy import hyper, resume_policies
    from trainer.config import Config
    from trainer.runtime.dataclass_yaml import flatten
    from trainer.state.resume import RESUME_POLICY

    undeclared = [key for key, policy in resume_policies(Config).items() if policy is None]
    assert undeclared == [], f"declare these with fixed/setting/hyper (foundation/resume_policy.py): {undeclared}"
    assert set(RESUME_POLICY) == set(flatten(config_to_dict(Config()), leaves=RESUME_POLICY))
    assert RESUME_POLICY["model.arch"] == "fixed" and RESUME_POLICY["data.batch_size"] == "fixed"
    assert RESUME_POLICY["tracking.uri"] == "setting" and RESUME_POLICY["optim.lr"] == "hyper"

    @dataclasses.dataclass
    class Section:
        said: int = hyper(1)
        silent: int = 2

    @dataclasses.dataclass
    class Whole:
        part: Section = dataclasses.field(default_factory=Section)

    assert resume_policies(Whole) == {"part.said": "hyper", "part.silent": None}


def test_an_item_of_a_list_is_overridden_by_the_key_form_errors_use():
    """Round 7, F55: data.views[1].count=6 was refused with "did you mean 'views'?", though our
    errors name keys in that form; data.views.1.count=6 made a mapping of the list."""
    cfg = load_config(None, ["data.views=[{count: 2, size: 32}, {count: 4, size: 16}]", "data.views[1].count=6",
                             "data.views[1].size={start: 8, end: 16, to_epoch: 2, step: 8}"])
    assert [g.count for g in cfg.data.views] == [2, 6] and cfg.data.views[1].size.end == 16
    for overrides, said in (
            (["data.views[0].count=4"], "this config gives no data.views list to index"),
            (["data.views=[{count: 2}]", "data.views[3].count=4"], "data.views has 1 item(s) in this config; index"),
            (["data.views=[{count: 2}]", "data.views.0.count=4"], "index goes in brackets: data.views[0].count=4"),
            (["data.views=[{count: 2}]", "data.views[0].cuont=4"], "did you mean 'count'"),
            (["data.views[x].count=4"], "a key is names joined by '.', each with optional [index]")):
        with pytest.raises(ConfigError, match=re.escape(said)):
            load_config(None, overrides)
