"""The package's shape: short functions, config.py a leaf, choices declared once, learned operators known by
their checkpoint's kind."""

import ast
import dataclasses
from pathlib import Path

import pytest
from conftest import FAST

from l2o_kd import config
from l2o_kd.compare import OperatorSpec
from l2o_kd.config import TrainConfig
from l2o_kd.errors import UserError
from l2o_kd.operators import CLASSIC, SCHEDULES, classic_operator
from l2o_kd.operators.learned import LSTMOperator, LSTMOperatorConfig, LSTMOperatorNet
from l2o_kd.operators.schedules import Schedule
from l2o_kd.train import train

PACKAGE = Path(__file__).resolve().parent.parent / "l2o_kd"
MAX_FUNCTION_LINES = 60


def test_no_function_of_the_package_is_longer_than_60_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, "functions over 60 lines: " + "; ".join(long)


def test_config_imports_only_the_leaves_of_the_package():
    tree = ast.parse((PACKAGE / "config.py").read_text())
    own = {alias.name if node.module is None else node.module for node in ast.walk(tree)
           if isinstance(node, ast.ImportFrom) and node.level for alias in node.names}
    assert own <= {"errors", "seeds", "device"}, own
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Import) and any(a.name.startswith(("torch", "l2o_kd")) for a in n.names)]
    assert not any(".endswith(\".pt\")" in p.read_text() for p in PACKAGE.rglob("*.py"))  # learned operators: by checkpoint kind


def test_the_choices_declared_in_config_are_the_ones_the_modules_run():
    assert CLASSIC == config.CLASSIC_OPERATORS and SCHEDULES == config.SCHEDULES
    for name in config.CLASSIC_OPERATORS:
        classic_operator(name, 0.1, Schedule())
    for kind in config.SCHEDULES:
        Schedule(kind, step_size=1)
    with pytest.raises(UserError, match="--schedule must be one of"):
        TrainConfig(schedule="linear").validate()


def test_a_learned_operator_is_known_by_its_checkpoint_kind_not_its_suffix(tmp_path, teacher_ckpt):
    op = tmp_path / "operator.ckpt"  # any name
    LSTMOperator(LSTMOperatorNet(LSTMOperatorConfig(hidden=4))).save(op)
    cfg = TrainConfig(model="tiny", teacher=str(teacher_ckpt), operator=str(op), steps=2, runs_dir=str(tmp_path), tensorboard=False, **FAST)
    assert cfg.learned and train(cfg)["step"] == 2
    spec = OperatorSpec.parse(f"ckpt:{op}@step=2")
    assert spec.learned and (spec.base, spec.variant) == (str(op), "step=2")
    for bad in (f"ckpt:{teacher_ckpt}", f"ckpt:{teacher_ckpt}@step=2"):  # a model checkpoint is refused by its kind
        with pytest.raises(UserError, match="holds a 'model' checkpoint, but a 'operator' checkpoint is needed"):
            OperatorSpec.parse(bad)
    with pytest.raises(UserError, match="holds a 'model' checkpoint"):
        train(dataclasses.replace(cfg, operator=str(teacher_ckpt), run_name="teacher-as-operator"))
    with pytest.raises(UserError, match="unknown operator 'adagrad': use sgd, adam, adamw or a learned-operator checkpoint"):
        dataclasses.replace(cfg, operator="adagrad").validate()


def test_every_cli_default_is_the_dataclass_default():
    """A flag's default is declared once, in its config dataclass (train-teacher: in ``TEACHER_RECIPE`` over
    TrainConfig's); ``None`` means "derived" (e.g. --epochs when --steps is given) and a flag's unset means False."""
    from l2o_kd.cli import cli

    configs = {"train-teacher": [config.TrainConfig], "deploy": [config.TrainConfig], "meta-train": [config.MetaConfig],
               "compare": [config.CompareConfig, config.TrainConfig], "search": [config.SearchConfig, config.TrainConfig]}
    checked, wrong = 0, []
    for name, classes in configs.items():
        recipe = config.TEACHER_RECIPE if name == "train-teacher" else {}
        for param in cli.commands[name].params:
            fields = [f for c in classes for f in dataclasses.fields(c) if f.name == param.name]
            if not fields or param.default is None:
                continue
            f = fields[0]
            want = recipe.get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
            got = param.default is True if getattr(param, "is_flag", False) else param.default
            if f.name == "kd_grid" and got == "":  # given as text, parsed into the list
                got = []
            checked += 1
            if got != want:
                wrong.append(f"{name} --{f.name}: {got!r} != {want!r}")
    assert checked > 80 and not wrong, wrong


def test_a_compare_folder_passes_its_shared_fields_to_every_run_with_the_same_defaults():
    train, comp = ({f.name: f.default for f in dataclasses.fields(c)} for c in (config.TrainConfig, config.CompareConfig))
    assert all(train[name] == comp[name] for name in config.CompareConfig.RUN_FIELDS)
