"""Fuzzing the recipe loader: any document is either accepted or refused with one line (BadInput)."""
from __future__ import annotations

import copy
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compress.errors import BadInput
from compress.recipe import Recipe, load_recipe, parse_recipe

VALID = {
    "version": 1,
    "name": "fuzz",
    "seed": 0,
    "model": {"arch": "builtin:resnet8", "kwargs": {"width": 8}, "train": {"epochs": 1}},
    "data": {"dataset": "digits", "batch_size": 64, "split": {"val": 0.1, "test": 0.2}},
    "metric": "top1",
    "stages": [
        {"name": "prune", "pass": "prune.magnitude", "params": {"sparsity": 0.5, "finetune": {"epochs": 1}}, "gate": {"max_drop": 0.1}},
    ],
    "export": {"onnx": {"opset": 17, "precisions": ["fp32"]}, "verify": {"max_drop": 0.01}},
}

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def _accepts_or_refuses(raw: object) -> None:
    try:
        assert isinstance(parse_recipe(raw, "fuzz.yaml"), Recipe)
    except BadInput as exc:
        message = str(exc)
        assert message.startswith("fuzz.yaml: ") and "\n" not in message


def _paths(node: object, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(node, dict):
        for key, child in node.items():
            found += _paths(child, prefix + (key,))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            found += _paths(child, prefix + (index,))
    return found


@st.composite
def mutated_recipes(draw: st.DrawFn) -> object:
    recipe = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(recipe) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = recipe
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(values)
    return recipe


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_recipes())
def test_mutations_of_a_valid_recipe(raw: object) -> None:
    _accepts_or_refuses(raw)


@settings(max_examples=200, deadline=None)
@given(values)
def test_random_structures(raw: object) -> None:
    _accepts_or_refuses(raw)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200) | st.builds(lambda d: yaml.safe_dump(d), mutated_recipes()))
def test_random_yaml_text(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    try:
        load_recipe(path)
    except BadInput as exc:
        assert "\n" not in str(exc)
