"""The package manifest (`ferry.yaml`) and typed validation of function inputs and outputs.

`parse_manifest` turns untrusted YAML/JSON into a `Manifest`, reporting every problem at
once as one `Invalid` whose details name each field (`manifest.modules[0].entry_point`).
`validate_inputs`, `shape_output` and `validate_output` apply a function's declared
parameter types to what clients send and what functions return.
"""

from __future__ import annotations

import copy
import difflib
import json
import keyword
import math
import re
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from core.errors import Invalid
from core.service_spec import NAME_PATTERN, Runtime, check_env

SCALAR_TYPES = ("string", "integer", "number", "boolean", "json")
PARAM_TYPES = frozenset((*SCALAR_TYPES, *(f"list[{t}]" for t in SCALAR_TYPES)))
RESERVED_PARAM_NAMES = frozenset({"progress", "context"})  # injected by the runtime
MAX_MANIFEST_BYTES = 1 << 20
MAX_JSON_DEPTH = 128
_MAX_MANIFEST_NODES = 100_000  # YAML aliases can make a small text expand enormously
_MAX_ITEM_PROBLEMS = 20
_PACKAGE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_REQUIREMENT_NAME = re.compile(
    r"^([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*(\[[A-Za-z0-9._,\s-]*\])?"
)
# Kept as strict as worker/images.py's normalise_requirements, so what uploads also builds.
_SPECIFIER = re.compile(r"^\s*(?:===|==|!=|~=|<=|>=|<|>)\s*[A-Za-z0-9.*+!_-]+\s*$")
_ARCHIVE_SUFFIXES = (".whl", ".tar.gz", ".tgz", ".tar.bz2", ".zip")

Loc = tuple[str | int, ...]


def _rule(message: str) -> PydanticCustomError:
    # The message travels in the context so braces in user-provided names are not templates.
    return PydanticCustomError("manifest_rule", "{reason}", {"reason": message})


def _identifier(value: str, what: str) -> str:
    if not (value.isascii() and value.isidentifier()) or keyword.iskeyword(value):
        raise _rule(f"{what} {value!r} must be a Python identifier (ASCII letters, digits, _)")
    if len(value) > 128:
        raise _rule(f"{what} must be at most 128 characters")
    return value


def _check_requirement(line: str) -> str:
    problem = requirement_problem(line)
    if problem:
        raise _rule(f"{line!r}: {problem}")
    return line


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Param(_Strict):
    """A declared input, init input or output of a function."""

    name: str
    type: str = "json"
    required: bool | None = None  # always a bool once validated
    default: Any = None  # only meaningful when set; see `has_default`
    description: str = ""

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return _identifier(value, "name")

    @field_validator("type")
    @classmethod
    def _check_type(cls, value: str) -> str:
        if value not in PARAM_TYPES:
            raise _rule(
                f"unknown type {value!r}; use one of string, integer, number, boolean, json, "
                "list[...]"
            )
        return value

    @field_validator("default")
    @classmethod
    def _check_default(cls, value: Any, info: ValidationInfo) -> Any:
        param_type = info.data.get("type")
        if info.data.get("required") is True:
            raise _rule("a param with a default is not required; drop one of the two")
        if param_type is None or value is None:  # bad type reported already; None = no value
            return value
        problems = type_problems(param_type, value)
        if problems:
            raise _rule("default does not match its type: " + _join_problems(problems))
        return value

    @model_validator(mode="after")
    def _settle_required(self) -> Param:
        if self.has_default:
            self.required = False
        elif self.required is None:
            self.required = True
        return self

    @property
    def has_default(self) -> bool:
        return "default" in self.model_fields_set

    @model_serializer(mode="wrap")
    def _omit_unset_default(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        dumped: dict[str, Any] = handler(self)
        if not self.has_default:
            dumped.pop("default", None)
        return dumped


class FunctionSpec(_Strict):
    """One callable function of a module, with its typed inputs and outputs."""

    name: str
    timeout_s: int | None = Field(default=None, gt=0)
    inputs: list[Param] = []
    outputs: list[Param] = []
    description: str = ""

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return _identifier(value, "function name")


class Module(_Strict):
    """A Python file of the codebase, optionally a class instantiated once per replica."""

    name: str
    entry_point: str
    class_name: str | None = None
    init_inputs: list[Param] = []
    functions: list[FunctionSpec] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return _identifier(value, "module name")

    @field_validator("class_name")
    @classmethod
    def _check_class_name(cls, value: str | None) -> str | None:
        return None if value is None else _identifier(value, "class name")

    @field_validator("entry_point")
    @classmethod
    def _check_entry_point(cls, value: str) -> str:
        if "\\" in value or value.startswith("/") or re.match(r"[A-Za-z]:", value):
            raise _rule("entry_point must be a relative path with '/' separators")
        parts = [part for part in value.split("/") if part not in ("", ".")]
        if ".." in parts:
            raise _rule("entry_point must stay inside the codebase (no '..')")
        if not parts or not parts[-1].endswith(".py") or parts[-1] == ".py":
            raise _rule("entry_point must be a .py file, e.g. main.py")
        return "/".join(parts)


class ServiceSection(_Strict):
    """`service:` in ferry.yaml: how `ferry deploy` creates or updates the package's service.

    Stored with the manifest; the server never acts on it. Its values are checked by the
    same rules as the API's service bodies, so a bad one is named before anything uploads.
    """

    name: str | None = Field(default=None, pattern=NAME_PATTERN)  # default: the package's
    module: str | None = None
    runtime: Runtime | None = None
    execution_timeout_s: int | None = Field(default=None, ge=1, le=7 * 86400)
    max_attempts: int | None = Field(default=None, ge=1, le=100)
    env: dict[str, str] = {}
    init_inputs: dict[str, Any] = {}

    _env = field_validator("env")(check_env)


class Manifest(_Strict):
    """A package's definition: its name, pip requirements and modules of functions."""

    name: str
    description: str = ""
    requirements: list[Annotated[str, AfterValidator(_check_requirement)]] = []
    modules: list[Module] = Field(min_length=1)
    service: ServiceSection | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _PACKAGE_NAME.fullmatch(value):
            raise _rule(
                "package name must be 1-63 characters of lowercase letters, digits and '-', "
                "starting with a letter or digit"
            )
        return value

    @model_validator(mode="after")
    def _check_rules(self) -> Manifest:
        # Reached only when every field is valid; parse_manifest also runs these on raw data.
        problems = _rule_problems(self.model_dump())
        if problems:
            raise PydanticCustomError(
                "manifest_rules",
                "{reason}",
                {
                    "reason": _summary([_detail("manifest", *p) for p in problems]),
                    "problems": problems,
                },
            )
        return self


_NESTED: dict[type[BaseModel], dict[str, type[BaseModel]]] = {
    Manifest: {"modules": Module, "service": ServiceSection},
    ServiceSection: {"runtime": Runtime},
    Module: {"init_inputs": Param, "functions": FunctionSpec},
    FunctionSpec: {"inputs": Param, "outputs": Param},
}


def requirement_problem(line: str) -> str | None:
    """Why `line` is not an acceptable pip requirement, or None when it is.

    Only PEP 508 lines: `name[extras] specifiers ; marker` or `name @ https://...`.
    Options (`-e`, `--index-url`), local paths and archives are refused.
    """
    if any(char in line for char in "\r\n\x00"):
        return "must be a single line"
    text = line.split(" #", 1)[0].strip()
    if not text or text.startswith("#"):
        return "empty requirement"
    if text.startswith("-"):
        return "pip options (-e, -r, --index-url, ...) are not allowed"
    match = _REQUIREMENT_NAME.match(text)
    if match is None or match.group(1).lower().endswith(_ARCHIVE_SUFFIXES):
        return "not a package name (local paths and archives are not allowed)"
    spec = text[match.end() :].partition(";")[0].strip()
    if spec.startswith("@"):
        if not re.fullmatch(r"(?:git\+)?https?://\S+", spec[1:].strip()):
            return "only an http(s) URL may follow '@'"
    elif spec and not all(_SPECIFIER.match(part) for part in spec.split(",")):
        return "not a version specifier"
    return None


def parse_manifest(data: bytes | str | dict[str, Any], source: str) -> Manifest:
    """Parse and validate a manifest from YAML or JSON text, or from an already-loaded dict.

    `source` names where it came from (`ferry.yaml`, `manifest`) in the error message.
    Every problem is reported in one `Invalid`, one detail per field, each field a path
    like `manifest.modules[0].functions[1].inputs[0].type`.
    """
    raw = _load(data, source)
    try:
        return Manifest.model_validate(raw)
    except ValidationError as error:
        problems = _translate(error) + _rule_problems(raw)
    details = _dedupe(_detail("manifest", loc, message) for loc, message in problems)
    raise Invalid(f"{source} is not a valid manifest: {_summary(details)}", details)


def check_entry_points(manifest: Manifest, files: Collection[str]) -> None:
    """Raise `Invalid` naming each module whose `entry_point` is not among `files`."""
    details = [
        _detail(
            "manifest",
            ("modules", index, "entry_point"),
            f"{module.entry_point!r} is not in the codebase",
        )
        for index, module in enumerate(manifest.modules)
        if module.entry_point not in files
    ]
    if details:
        raise Invalid(f"the manifest does not match the codebase: {_summary(details)}", details)


def find_module(manifest: Manifest, module_name: str, *, field: str = "module") -> Module:
    """The module called `module_name`; `Invalid` naming `field` when there is none."""
    for module in manifest.modules:
        if module.name == module_name:
            return module
    known = ", ".join(module.name for module in manifest.modules)
    raise Invalid.field(
        field, f"package {manifest.name!r} has no module {module_name!r}; it has: {known}"
    )


def find_function(
    manifest: Manifest, module_name: str, function_name: str, *, field: str = "function"
) -> FunctionSpec:
    """The function of a module; `Invalid` naming `field` (or `module`) when missing."""
    module = find_module(manifest, module_name)
    for function in module.functions:
        if function.name == function_name:
            return function
    known = ", ".join(function.name for function in module.functions)
    raise Invalid.field(
        field, f"module {module_name!r} has no function {function_name!r}; it has: {known}"
    )


def validate_inputs(
    function: FunctionSpec, given: dict[str, Any] | None, field_prefix: str = "input"
) -> dict[str, Any]:
    """`given` checked against the function's inputs, with every declared input present.

    Absent optional inputs (and ones given as None) take their default, or None when they
    have none. Raises `Invalid` with one detail per unknown, missing or mistyped input.
    """
    return _validate_params(function.inputs, given, field_prefix, "input")


def validate_init_inputs(
    module: Module, given: dict[str, Any] | None, field_prefix: str = "init_inputs"
) -> dict[str, Any]:
    """Like `validate_inputs`, for the arguments a module's class is instantiated with."""
    return _validate_params(module.init_inputs, given, field_prefix, "init input")


def shape_output(function: FunctionSpec, value: Any) -> Any:
    """What a function returned, as the execution's `output`.

    With exactly one declared output, a value that is not already `{that_name: ...}` is
    wrapped as such; otherwise the value is kept as it is (see `validate_output`).
    """
    if len(function.outputs) == 1:
        name = function.outputs[0].name
        if isinstance(value, dict) and len(value) == 1 and name in value:
            return value
        return {name: value}
    return value


def validate_output(function: FunctionSpec, output: Any) -> None:
    """Raise `Invalid` (fields `output...`) if a shaped output breaks the declaration.

    No declared outputs: any JSON value. Otherwise an object with the declared names,
    each of its declared type; required ones present.
    """
    if not function.outputs:
        problems = type_problems("json", output)
        if problems:
            details = [_detail("output", (), _join_problems(problems))]
            raise Invalid(f"invalid output: {_summary(details)}", details)
        return
    _validate_params(function.outputs, output, "output", "output", absent_is_empty=False)


def type_problems(param_type: str, value: Any) -> list[tuple[str, str]]:
    """How `value` fails `param_type`, as `(suffix, message)` pairs; empty when it fits.

    A suffix locates the problem inside the value (`[2]` for a list item).
    """
    if param_type.startswith("list[") and param_type.endswith("]"):
        item_type = param_type[5:-1]
        if not isinstance(value, list | tuple):
            return [("", f"expected {param_type}, got {json_type_name(value)}")]
        problems: list[tuple[str, str]] = []
        bad_items = 0
        for index, item in enumerate(value):
            item_problems = type_problems(item_type, item)
            if item_problems:
                bad_items += 1
                if bad_items <= _MAX_ITEM_PROBLEMS:
                    problems += [(f"[{index}]{suffix}", msg) for suffix, msg in item_problems]
        if bad_items > _MAX_ITEM_PROBLEMS:
            problems.append(
                ("", f"{bad_items - _MAX_ITEM_PROBLEMS} more items are not {item_type}")
            )
        return problems
    if param_type == "json":
        return _json_problems(value)
    fits = _SCALAR_FITS[param_type]
    if fits(value):
        return []
    return [("", f"expected {param_type}, got {json_type_name(value)}")]


_SCALAR_FITS: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: (
        (isinstance(v, int) and not isinstance(v, bool))
        or (isinstance(v, float) and math.isfinite(v))
    ),
    "boolean": lambda v: isinstance(v, bool),
}


def json_type_name(value: Any) -> str:
    """The JSON name of a value's type, as used in error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number" if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _json_problems(value: Any) -> list[tuple[str, str]]:
    # Iterative, so hostile nesting cannot exhaust the stack; jsonb refuses NaN and Infinity.
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return [(path, f"nested more than {MAX_JSON_DEPTH} levels deep")]
        if item is None or isinstance(item, bool | int | str):
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                return [(path, f"expected a JSON value, got {item}")]
        elif isinstance(item, list | tuple):
            stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))
        elif isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    return [(path, f"object keys must be strings, got {json_type_name(key)}")]
                stack.append((child, f"{path}.{key}", depth + 1))
        else:
            return [(path, f"expected a JSON value, got {type(item).__name__}")]
    return []


def _validate_params(
    params: Sequence[Param],
    given: Any,
    prefix: str,
    noun: str,
    *,
    absent_is_empty: bool = True,
) -> dict[str, Any]:
    if given is None and absent_is_empty:
        given = {}
    if not isinstance(given, dict):
        names = ", ".join(param.name for param in params)
        raise Invalid.field(prefix, f"expected an object with {names}, got {json_type_name(given)}")
    declared = {param.name: param for param in params}
    problems: list[tuple[Loc, str]] = []
    for key in given:
        if key not in declared:
            hint = _did_you_mean(str(key), declared) or (
                f"expected one of: {', '.join(declared)}" if declared else f"there are no {noun}s"
            )
            problems.append(((str(key),), f"unknown {noun}; {hint}"))
    complete: dict[str, Any] = {}
    for param in params:
        value = given.get(param.name)
        if value is None and (param.name not in given or not param.required):
            if param.required:
                missing = "missing from the return value" if noun == "output" else "required"
                problems.append(((param.name,), missing))
            complete[param.name] = copy.deepcopy(param.default) if param.has_default else None
            continue
        for suffix, message in type_problems(param.type, value):
            problems.append(((param.name + suffix,), message))
        complete[param.name] = value
    if problems:
        details = [_detail(prefix, loc, message) for loc, message in problems]
        raise Invalid(f"invalid {noun}: {_summary(details)}", details)
    return complete


def _load(data: bytes | str | dict[str, Any], source: str) -> Any:
    if isinstance(data, dict):
        loaded: Any = data
    else:
        if len(data) > MAX_MANIFEST_BYTES:
            raise Invalid.field("manifest", f"{source} is larger than {MAX_MANIFEST_BYTES} bytes")
        if isinstance(data, bytes):
            try:
                data = data.decode("utf-8-sig")
            except UnicodeDecodeError as error:
                raise Invalid.field(
                    "manifest", f"{source} is not UTF-8 text (byte {error.start})"
                ) from None
        loaded = _load_text(data, source)
    if loaded is None:
        raise Invalid.field("manifest", f"{source} is empty")
    if not isinstance(loaded, dict):
        raise Invalid.field(
            "manifest",
            f"{source} must be a mapping with name and modules, got {json_type_name(loaded)}",
        )
    _check_size(loaded, source)
    return loaded


def _load_text(text: str, source: str) -> Any:
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            pass  # YAML flow mappings start with "{" too; YAML reports the error
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = error.problem or error.context or "syntax error"
        raise Invalid.field("manifest", f"{source} is not valid YAML{where}: {what}") from None
    except (yaml.YAMLError, RecursionError) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise Invalid.field("manifest", f"{source} is not valid YAML: {reason}") from None


def _check_size(loaded: Any, source: str) -> None:
    # Bounded walk: stops at the budget, so recursive or alias-bombed YAML cannot hang it.
    stack: list[tuple[Any, int]] = [(loaded, 0)]
    nodes = 0
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if nodes > _MAX_MANIFEST_NODES or depth > MAX_JSON_DEPTH:
            raise Invalid.field("manifest", f"{source} is too large or nested too deeply")
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in (*item.keys(), *item.values()))
        elif isinstance(item, list | tuple):
            stack.extend((child, depth + 1) for child in item)


def _rule_problems(data: Any) -> list[tuple[Loc, str]]:
    """Cross-item rules (unique and reserved names), tolerant of otherwise broken data."""
    problems: list[tuple[Loc, str]] = []
    modules = _items(data, "modules")
    problems += _unique_names(modules, ("modules",), "module")
    for m, module in modules:
        init_inputs = _items(module, "init_inputs")
        problems += _unique_names(init_inputs, ("modules", m, "init_inputs"), "init input")
        problems += _reserved_names(init_inputs, ("modules", m, "init_inputs"))
        functions = _items(module, "functions")
        problems += _unique_names(functions, ("modules", m, "functions"), "function")
        for f, function in functions:
            where: Loc = ("modules", m, "functions", f)
            inputs = _items(function, "inputs")
            problems += _unique_names(inputs, (*where, "inputs"), "input")
            problems += _reserved_names(inputs, (*where, "inputs"))
            problems += _unique_names(_items(function, "outputs"), (*where, "outputs"), "output")
    return problems


def _items(parent: Any, key: str) -> list[tuple[int, dict[str, Any]]]:
    children = parent.get(key) if isinstance(parent, dict) else None
    if not isinstance(children, list):
        return []
    return [(index, child) for index, child in enumerate(children) if isinstance(child, dict)]


def _unique_names(
    items: list[tuple[int, dict[str, Any]]], loc: Loc, noun: str
) -> list[tuple[Loc, str]]:
    first_index: dict[str, int] = {}
    problems: list[tuple[Loc, str]] = []
    for index, item in items:
        name = item.get("name")
        if not isinstance(name, str):
            continue
        if name in first_index:
            message = f"duplicate {noun} name {name!r} (first at index {first_index[name]})"
            problems.append(((*loc, index, "name"), message))
        else:
            first_index[name] = index
    return problems


def _reserved_names(items: list[tuple[int, dict[str, Any]]], loc: Loc) -> list[tuple[Loc, str]]:
    return [
        ((*loc, index, "name"), f"{item['name']!r} is reserved: the runtime passes it to functions")
        for index, item in items
        if item.get("name") in RESERVED_PARAM_NAMES
    ]


def _translate(error: ValidationError) -> list[tuple[Loc, str]]:
    problems: list[tuple[Loc, str]] = []
    for item in error.errors(include_url=False):
        loc: Loc = tuple(item["loc"])
        kind = item["type"]
        if kind == "manifest_rules":
            problems += item["ctx"]["problems"]
        elif kind == "manifest_rule":
            problems.append((loc, item["ctx"]["reason"]))
        elif kind == "missing":
            problems.append((loc, "required"))
        elif kind == "extra_forbidden":
            problems.append((loc, _unknown_field_message(loc)))
        elif kind == "greater_than":
            problems.append((loc, f"must be greater than {item['ctx']['gt']}"))
        elif kind == "too_short":
            problems.append((loc, "must not be empty"))
        elif kind in (
            "string_type",
            "int_type",
            "bool_type",
            "list_type",
            "model_type",
            "dict_type",
            "model_attributes_type",
        ):
            expected = {
                "string_type": "a string",
                "int_type": "an integer",
                "bool_type": "a boolean",
                "list_type": "a list",
            }.get(kind, "a mapping")
            problems.append((loc, f"expected {expected}, got {json_type_name(item['input'])}"))
        else:
            problems.append((loc, item["msg"]))
    return problems


def _unknown_field_message(loc: Loc) -> str:
    model: type[BaseModel] = Manifest
    for part in loc[:-1]:
        if isinstance(part, str):
            model = _NESTED.get(model, {}).get(part, model)
    allowed = list(model.model_fields)
    key = str(loc[-1]) if loc else ""
    hint = _did_you_mean(key, allowed) or f"allowed: {', '.join(allowed)}"
    return f"unknown field {key!r}; {hint}"


def _did_you_mean(key: str, choices: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(key, list(choices), n=1)
    return f"did you mean {close[0]!r}?" if close else None


def _path(prefix: str, loc: Loc) -> str:
    path = prefix
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _detail(prefix: str, loc: Loc, message: str) -> dict[str, Any]:
    return {"field": _path(prefix, loc), "message": message}


def _dedupe(details: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[tuple[str, str]] = set()
    unique = []
    for detail in details:
        key = (detail["field"], detail["message"])
        if key not in seen:
            seen.add(key)
            unique.append(detail)
    return unique


def _join_problems(problems: Iterable[tuple[Any, str]]) -> str:
    return "; ".join(f"{where}: {message}" if where else message for where, message in problems)


def _summary(details: list[dict[str, Any]]) -> str:
    shown = "; ".join(f"{d['field']}: {d['message']}" for d in details[:3])
    return shown + (f" (and {len(details) - 3} more)" if len(details) > 3 else "")
