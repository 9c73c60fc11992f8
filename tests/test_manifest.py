"""The manifest's rules and the typed validation of inputs and outputs."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest
import yaml

from core.errors import Invalid
from core.manifest import (
    FunctionSpec,
    Manifest,
    Param,
    check_entry_points,
    find_function,
    find_module,
    parse_manifest,
    shape_output,
    validate_init_inputs,
    validate_inputs,
    validate_output,
)

API_EXAMPLE = """\
name: image-tools
requirements: []            # pip requirement lines, installed into the service image
modules:
  - name: main
    entry_point: main.py
    class_name: Runner      # optional: instantiated once per replica with init_inputs
    init_inputs: [{name: model, type: string}]
    functions:
      - name: resize
        inputs:  [{name: image, type: json}, {name: size, type: integer, default: 128}]
        outputs: [{name: image, type: json}]
"""


def valid() -> dict[str, Any]:
    return yaml.safe_load(API_EXAMPLE)


def problems(data: Any) -> dict[str, str]:
    """The details of the Invalid that parsing `data` raises, as {field: message}."""
    with pytest.raises(Invalid) as caught:
        parse_manifest(data, "ferry.yaml")
    assert caught.value.status == 422
    return {d["field"]: d["message"] for d in caught.value.details}


def function(*inputs: dict[str, Any], outputs: list[dict[str, Any]] | None = None) -> FunctionSpec:
    return FunctionSpec.model_validate(
        {"name": "f", "inputs": list(inputs), "outputs": outputs or []}
    )


# --- parsing ---------------------------------------------------------------------------


def test_api_example_parses():
    manifest = parse_manifest(API_EXAMPLE, "ferry.yaml")
    assert isinstance(manifest, Manifest)
    module = manifest.modules[0]
    assert (manifest.name, manifest.description, manifest.requirements) == ("image-tools", "", [])
    assert (module.name, module.entry_point, module.class_name) == ("main", "main.py", "Runner")
    assert module.init_inputs[0].type == "string"
    resize = module.functions[0]
    assert (resize.name, resize.timeout_s, resize.description) == ("resize", None, "")
    image, size = resize.inputs
    assert (image.type, image.required, image.has_default) == ("json", True, False)
    assert (size.type, size.required, size.default, size.has_default) == (
        "integer",
        False,
        128,
        True,
    )


def test_dump_shows_defaults_only_where_declared_and_round_trips():
    manifest = parse_manifest(API_EXAMPLE, "ferry.yaml")
    dumped = manifest.model_dump(mode="json")
    inputs = dumped["modules"][0]["functions"][0]["inputs"]
    assert inputs[0] == {"name": "image", "type": "json", "required": True, "description": ""}
    assert inputs[1]["default"] == 128 and inputs[1]["required"] is False
    assert parse_manifest(dumped, "stored") == manifest
    assert parse_manifest(json.dumps(dumped), "stored") == manifest
    assert parse_manifest(manifest.model_dump_json().encode(), "stored") == manifest


def test_pep508_requirements_are_accepted():
    lines = [
        "numpy",
        "numpy >= 1.2, <2",
        'requests[socks]==2.32.3 ; python_version >= "3.11"',
        "pkg @ https://example.com/pkg-1.0-py3-none-any.whl",
        "tool @ git+https://example.com/tool.git",
    ]
    assert parse_manifest(_set("requirements", lines), "ferry.yaml").requirements == lines


def test_bytes_with_bom_and_json_text_parse():
    assert (
        parse_manifest(b"\xef\xbb\xbf" + API_EXAMPLE.encode(), "ferry.yaml").name == "image-tools"
    )
    assert parse_manifest(json.dumps(valid()), "manifest").name == "image-tools"


def test_a_null_default_makes_an_optional_param():
    data = valid()
    data["modules"][0]["functions"][0]["inputs"].append(
        {"name": "note", "type": "string", "default": None}
    )
    note = parse_manifest(data, "ferry.yaml").modules[0].functions[0].inputs[2]
    assert (note.required, note.has_default, note.default) == (False, True, None)


def test_entry_point_is_normalised():
    data = valid()
    data["modules"][0]["entry_point"] = "./lib//main.py"
    assert parse_manifest(data, "ferry.yaml").modules[0].entry_point == "lib/main.py"


F = "manifest.modules[0].functions[0]"


def _set(path: str, value: Any) -> dict[str, Any]:
    """The API example with the value at a dotted path (`modules.0.name`) replaced."""
    data = valid()
    *parents, last = path.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    node[int(last) if last.isdigit() else last] = value
    return data


BAD_FIELDS = [
    ("name", "Image_Tools", "manifest.name", "lowercase letters"),
    ("name", "tools\n", "manifest.name", "lowercase letters"),
    ("name", "x" * 64, "manifest.name", "1-63 characters"),
    ("name", 12, "manifest.name", "expected a string, got integer"),
    ("requirements", ["numpy>=1", "-e ."], "manifest.requirements[1]", "pip options"),
    ("requirements", ["--index-url https://evil"], "manifest.requirements[0]", "pip options"),
    ("requirements", ["numpy\n--index-url x"], "manifest.requirements[0]", "single line"),
    ("requirements", ["./local/path"], "manifest.requirements[0]", "not a package name"),
    ("requirements", ["pkg @ file:///etc"], "manifest.requirements[0]", "http(s) URL"),
    ("requirements", ["numpy>=1 --index-url x"], "manifest.requirements[0]", "version specifier"),
    ("requirements", ["numpy 1.2"], "manifest.requirements[0]", "not a version specifier"),
    ("requirements", [""], "manifest.requirements[0]", "empty requirement"),
    ("requirements", "numpy", "manifest.requirements", "expected a list, got string"),
    ("modules", [], "manifest.modules", "must not be empty"),
    ("modules.0.name", "2main", "manifest.modules[0].name", "Python identifier"),
    ("modules.0.name", "class", "manifest.modules[0].name", "Python identifier"),
    ("modules.0.entry_point", "../main.py", "manifest.modules[0].entry_point", "'..'"),
    ("modules.0.entry_point", "/main.py", "manifest.modules[0].entry_point", "relative"),
    ("modules.0.entry_point", "lib\\main.py", "manifest.modules[0].entry_point", "relative"),
    ("modules.0.entry_point", "C:/main.py", "manifest.modules[0].entry_point", "relative"),
    ("modules.0.entry_point", "main.txt", "manifest.modules[0].entry_point", ".py file"),
    ("modules.0.class_name", "not a class", "manifest.modules[0].class_name", "identifier"),
    ("modules.0.functions", [], "manifest.modules[0].functions", "must not be empty"),
    ("modules.0.functions.0.name", "ré", f"{F}.name", "Python identifier"),
    ("modules.0.functions.0.timeout_s", 0, f"{F}.timeout_s", "greater than 0"),
    ("modules.0.functions.0.timeout_s", "60", f"{F}.timeout_s", "expected an integer"),
    ("modules.0.functions.0.timeout_s", True, f"{F}.timeout_s", "expected an integer"),
    (
        "modules.0.functions.0.inputs.0.type",
        "int",
        f"{F}.inputs[0].type",
        "unknown type 'int'; use one of string, integer, number, boolean, json, list[...]",
    ),
    (
        "modules.0.functions.0.inputs.0.type",
        "list[list[integer]]",
        f"{F}.inputs[0].type",
        "unknown type",
    ),
    (
        "modules.0.functions.0.inputs.0.required",
        "yes",
        f"{F}.inputs[0].required",
        "expected a boolean",
    ),
    ("modules.0.functions.0.outputs.0.name", "my-image", f"{F}.outputs[0].name", "identifier"),
    (
        "modules.0.init_inputs.0",
        "model",
        "manifest.modules[0].init_inputs[0]",
        "expected a mapping, got string",
    ),
]


@pytest.mark.parametrize(("path", "value", "field", "message"), BAD_FIELDS)
def test_each_bad_field_is_named_exactly(path, value, field, message):
    found = problems(_set(path, value))
    assert list(found) == [field]
    assert message in found[field]


@pytest.mark.parametrize(
    ("default", "param_type", "message"),
    [
        ("x", "integer", "expected integer, got string"),
        (True, "integer", "expected integer, got boolean"),
        (1.5, "integer", "expected integer, got number"),
        ("1", "number", "expected number, got string"),
        (1, "boolean", "expected boolean, got integer"),
        (3, "string", "expected string, got integer"),
        ([1, "two", 3], "list[integer]", "[1]: expected integer, got string"),
        ({"a": 1}, "list[string]", "expected list[string], got object"),
    ],
)
def test_defaults_must_match_their_type(default, param_type, message):
    data = _set(
        "modules.0.functions.0.inputs.1", {"name": "size", "type": param_type, "default": default}
    )
    found = problems(data)
    assert list(found) == [f"{F}.inputs[1].default"]
    assert message in found[f"{F}.inputs[1].default"]


def test_a_required_param_cannot_have_a_default():
    data = _set("modules.0.functions.0.inputs.1", {"name": "size", "required": True, "default": 1})
    assert "not required" in problems(data)[f"{F}.inputs[1].default"]


def test_unknown_keys_are_caught_with_a_suggestion():
    data = valid()
    data["modulez"] = []
    data["modules"][0]["entrypoint"] = data["modules"][0].pop("entry_point")
    data["modules"][0]["functions"][0]["inputs"][0]["defualt"] = 1
    found = problems(data)
    assert found["manifest.modulez"] == "unknown field 'modulez'; did you mean 'modules'?"
    assert "did you mean 'entry_point'" in found["manifest.modules[0].entrypoint"]
    assert "did you mean 'default'" in found[f"{F}.inputs[0].defualt"]
    assert "manifest.modules[0].entry_point" in found  # the misspelt key leaves it missing


def test_missing_fields_are_required():
    found = problems({"modules": [{"functions": [{}]}]})
    assert found == {
        "manifest.name": "required",
        "manifest.modules[0].name": "required",
        "manifest.modules[0].entry_point": "required",
        f"{F}.name": "required",
    }


def test_duplicate_names_are_caught_in_every_list():
    data = valid()
    module = data["modules"][0]
    module["functions"].append(copy.deepcopy(module["functions"][0]))
    module["functions"][0]["inputs"].append({"name": "image"})
    module["functions"][0]["outputs"].append({"name": "image"})
    module["init_inputs"].append({"name": "model"})
    data["modules"].append(copy.deepcopy(module))
    found = problems(data)
    assert found["manifest.modules[0].functions[1].name"] == (
        "duplicate function name 'resize' (first at index 0)"
    )
    assert "duplicate input" in found[f"{F}.inputs[2].name"]
    assert "duplicate output" in found[f"{F}.outputs[1].name"]
    assert "duplicate init input" in found["manifest.modules[0].init_inputs[1].name"]
    assert "duplicate module" in found["manifest.modules[1].name"]


@pytest.mark.parametrize("name", ["progress", "context"])
def test_reserved_param_names(name):
    data = valid()
    data["modules"][0]["functions"][0]["inputs"].append({"name": name})
    data["modules"][0]["init_inputs"].append({"name": name})
    found = problems(data)
    assert "reserved" in found[f"{F}.inputs[2].name"]
    assert "reserved" in found["manifest.modules[0].init_inputs[1].name"]
    # An output may be called so: nothing is injected there.
    data = valid()
    data["modules"][0]["functions"][0]["outputs"] = [{"name": name}]
    assert parse_manifest(data, "ferry.yaml").modules[0].functions[0].outputs[0].name == name


def test_every_problem_is_reported_at_once():
    data = valid()
    data["name"] = "Bad Name"
    data["modules"][0]["functions"][0]["inputs"][0]["type"] = "int"
    data["modules"][0]["functions"][0]["inputs"].append({"name": "progress"})
    found = problems(data)
    assert set(found) == {"manifest.name", f"{F}.inputs[0].type", f"{F}.inputs[2].name"}


def test_model_validate_also_enforces_the_cross_item_rules():
    data = valid()
    data["modules"][0]["functions"].append({"name": "resize"})
    with pytest.raises(ValueError, match="duplicate function name"):
        Manifest.model_validate(data)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\nmodules: [\n", "not valid YAML at line 3, column 1"),
        ("name: x\n  bad: indent\n", "not valid YAML at line 2, column 6"),
        ("- a\n- b\n", "must be a mapping with name and modules, got list"),
        ("just text", "must be a mapping with name and modules, got string"),
        ("", "is empty"),
        ("# only a comment\n", "is empty"),
        (b"name: \xff", "not UTF-8"),
        ("a: &a [*a, *a]", "too large or nested too deeply"),
        ("x: " + "[" * 5000 + "]" * 5000, "nested too deeply"),
        ("x" * (2 << 20), "larger than"),
    ],
    ids=[
        "unclosed",
        "indent",
        "list",
        "scalar",
        "empty",
        "comment",
        "bytes",
        "alias",
        "deep",
        "huge",
    ],
)
def test_unparseable_manifests_name_the_manifest(text, message):
    found = problems(text)
    assert list(found) == ["manifest"]
    assert message in found["manifest"]


def test_billion_laughs_is_refused_quickly():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    assert "too large" in problems("\n".join(lines))["manifest"]


# --- finding functions -----------------------------------------------------------------


def test_find_function_and_module():
    manifest = parse_manifest(API_EXAMPLE, "ferry.yaml")
    assert find_function(manifest, "main", "resize").name == "resize"
    assert find_module(manifest, "main").class_name == "Runner"
    with pytest.raises(Invalid) as caught:
        find_function(manifest, "main", "rotate")
    assert caught.value.details == [
        {"field": "function", "message": "module 'main' has no function 'rotate'; it has: resize"}
    ]
    with pytest.raises(Invalid) as caught:
        find_function(manifest, "other", "resize")
    assert caught.value.details[0]["field"] == "module"


def test_check_entry_points_against_the_codebase():
    manifest = parse_manifest(API_EXAMPLE, "ferry.yaml")
    check_entry_points(manifest, ["ferry.yaml", "main.py"])
    with pytest.raises(Invalid) as caught:
        check_entry_points(manifest, ["ferry.yaml", "lib/main.py"])
    assert caught.value.details == [
        {"field": "manifest.modules[0].entry_point", "message": "'main.py' is not in the codebase"}
    ]


# --- inputs ----------------------------------------------------------------------------


def input_problems(spec: FunctionSpec, given: Any) -> dict[str, str]:
    with pytest.raises(Invalid) as caught:
        validate_inputs(spec, given)
    return {d["field"]: d["message"] for d in caught.value.details}


ACCEPTED = [
    ("string", "hello"),
    ("string", ""),
    ("integer", 3),
    ("integer", -(10**30)),
    ("number", 3),
    ("number", 2.5),
    ("boolean", False),
    ("json", {"any": ["thing", 1, None]}),
    ("json", None),
    ("list[integer]", [1, 2, 3]),
    ("list[string]", []),
    ("list[number]", [1, 2.5]),
    ("list[boolean]", [True]),
    ("list[json]", [{"a": 1}, None, "x"]),
]


@pytest.mark.parametrize(("param_type", "value"), ACCEPTED)
def test_inputs_of_the_right_type_pass(param_type, value):
    spec = function({"name": "x", "type": param_type})
    assert validate_inputs(spec, {"x": value}) == {"x": value}


REFUSED = [
    ("string", 1, "input.x", "expected string, got integer"),
    ("integer", True, "input.x", "expected integer, got boolean"),
    ("integer", 3.0, "input.x", "expected integer, got number"),
    ("integer", "3", "input.x", "expected integer, got string"),
    ("integer", None, "input.x", "expected integer, got null"),
    ("number", False, "input.x", "expected number, got boolean"),
    ("number", math.nan, "input.x", "expected number, got nan"),
    ("number", math.inf, "input.x", "expected number, got inf"),
    ("boolean", 0, "input.x", "expected boolean, got integer"),
    ("boolean", "true", "input.x", "expected boolean, got string"),
    ("json", math.nan, "input.x", "expected a JSON value, got nan"),
    ("json", {"a": {1, 2}}, "input.x.a", "expected a JSON value, got set"),
    ("list[integer]", [1, 2, "3"], "input.x[2]", "expected integer, got string"),
    ("list[integer]", [1, True], "input.x[1]", "expected integer, got boolean"),
    ("list[integer]", {"0": 1}, "input.x", "expected list[integer], got object"),
    ("list[string]", "abc", "input.x", "expected list[string], got string"),
]


@pytest.mark.parametrize(("param_type", "value", "field", "message"), REFUSED)
def test_inputs_of_the_wrong_type_are_refused(param_type, value, field, message):
    spec = function({"name": "x", "type": param_type})
    assert input_problems(spec, {"x": value}) == {field: message}


def test_every_bad_list_item_is_named_up_to_a_limit():
    spec = function({"name": "tags", "type": "list[integer]"})
    assert input_problems(spec, {"tags": [1, "a", 2, "b"]}) == {
        "input.tags[1]": "expected integer, got string",
        "input.tags[3]": "expected integer, got string",
    }
    with pytest.raises(Invalid) as caught:
        validate_inputs(spec, {"tags": ["x"] * 1000})
    assert len(caught.value.details) == 21
    assert caught.value.details[-1] == {
        "field": "input.tags",
        "message": "980 more items are not integer",
    }


def test_unknown_and_missing_inputs():
    spec = parse_manifest(API_EXAMPLE, "ferry.yaml").modules[0].functions[0]
    assert input_problems(spec, {"sise": 3}) == {
        "input.sise": "unknown input; did you mean 'size'?",
        "input.image": "required",
    }
    assert (
        "expected one of: image, size" in input_problems(spec, {"image": 1, "zzz": 1})["input.zzz"]
    )
    assert input_problems(function(), {"a": 1}) == {"input.a": "unknown input; there are no inputs"}


def test_defaults_are_filled_and_not_shared():
    spec = function(
        {"name": "image", "type": "json"},
        {"name": "size", "type": "integer", "default": 128},
        {"name": "tags", "type": "list[string]", "default": ["a"]},
        {"name": "note", "type": "string", "required": False},
    )
    full = validate_inputs(spec, {"image": {"url": "x"}})
    assert full == {"image": {"url": "x"}, "size": 128, "tags": ["a"], "note": None}
    full["tags"].append("mutated")
    assert validate_inputs(spec, {"image": 1})["tags"] == ["a"]
    # None for an optional input means absent; a required json input may be null.
    assert validate_inputs(spec, {"image": None, "size": None, "note": None}) == {
        "image": None,
        "size": 128,
        "tags": ["a"],
        "note": None,
    }


def test_input_must_be_an_object():
    spec = function({"name": "x", "required": False})
    assert validate_inputs(spec, None) == {"x": None}
    assert input_problems(spec, [1, 2]) == {"input": "expected an object with x, got list"}


def test_field_prefix_is_used():
    spec = function({"name": "size", "type": "integer"})
    with pytest.raises(Invalid) as caught:
        validate_inputs(spec, {"size": "big"}, field_prefix="executions[3].input")
    assert caught.value.details == [
        {"field": "executions[3].input.size", "message": "expected integer, got string"}
    ]


def test_init_inputs():
    module = parse_manifest(API_EXAMPLE, "ferry.yaml").modules[0]
    assert validate_init_inputs(module, {"model": "small"}) == {"model": "small"}
    with pytest.raises(Invalid) as caught:
        validate_init_inputs(module, {})
    assert caught.value.details == [{"field": "init_inputs.model", "message": "required"}]


# --- outputs ---------------------------------------------------------------------------


def test_one_declared_output_wraps_a_bare_value():
    spec = function(outputs=[{"name": "image", "type": "json"}])
    assert shape_output(spec, [1, 2]) == {"image": [1, 2]}
    assert shape_output(spec, None) == {"image": None}
    assert shape_output(spec, {"image": 1}) == {"image": 1}
    assert shape_output(spec, {"image": 1, "other": 2}) == {"image": {"image": 1, "other": 2}}
    validate_output(spec, shape_output(spec, {"image": 1, "other": 2}))


def test_one_typed_output_is_checked():
    spec = function(outputs=[{"name": "count", "type": "integer"}])
    validate_output(spec, shape_output(spec, 3))
    with pytest.raises(Invalid) as caught:
        validate_output(spec, shape_output(spec, "three"))
    assert caught.value.details == [
        {"field": "output.count", "message": "expected integer, got string"}
    ]


def test_several_outputs_need_an_object_with_their_names():
    spec = function(
        outputs=[{"name": "width", "type": "integer"}, {"name": "tags", "type": "list[string]"}]
    )
    assert shape_output(spec, {"width": 1, "tags": []}) == {"width": 1, "tags": []}
    validate_output(spec, {"width": 1, "tags": ["a"]})
    with pytest.raises(Invalid) as caught:
        validate_output(spec, {"width": 1.5, "tags": ["a", 2], "extra": 1})
    assert {d["field"]: d["message"] for d in caught.value.details} == {
        "output.width": "expected integer, got number",
        "output.tags[1]": "expected string, got integer",
        "output.extra": "unknown output; expected one of: width, tags",
    }
    with pytest.raises(Invalid) as caught:
        validate_output(spec, {"width": 1})
    assert caught.value.details == [
        {"field": "output.tags", "message": "missing from the return value"}
    ]
    with pytest.raises(Invalid) as caught:
        validate_output(spec, [1, ["a"]])
    assert caught.value.details[0]["field"] == "output"


def test_no_declared_outputs_take_any_json():
    spec = function()
    for value in (None, 1, "x", [1, {"a": None}], {"any": "thing"}):
        assert shape_output(spec, value) == value
        validate_output(spec, value)
    with pytest.raises(Invalid) as caught:
        validate_output(spec, {"when": object()})
    assert caught.value.details[0]["field"] == "output"
    assert "expected a JSON value" in caught.value.details[0]["message"]


def test_param_model_defaults():
    param = Param(name="x")
    assert (param.type, param.required, param.has_default, param.description) == (
        "json",
        True,
        False,
        "",
    )
