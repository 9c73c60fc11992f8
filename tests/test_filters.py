"""The event filter language: every operator, dotted paths, and validation naming the field."""

from __future__ import annotations

import pytest

from core.errors import Invalid
from core.filters import matches, validate_filter

DATA = {
    "size": 50,
    "name": "photo.jpg",
    "ok": True,
    "tags": ["a", "b"],
    "owner": {"id": "u1", "team": {"name": "red"}},
    "none": None,
}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, True),
        ({"size": 50}, True),
        ({"size": 51}, False),
        ({"size": {"$eq": 50}}, True),
        ({"size": {"$ne": 50}}, False),
        ({"size": {"$gt": 10, "$lte": 50}}, True),
        ({"size": {"$gte": 51}}, False),
        ({"size": {"$lt": 50}}, False),
        ({"size": {"$gt": "10"}}, False),  # a number and a string do not compare
        ({"name": {"$gt": "a"}}, True),
        ({"ok": 1}, False),  # true is not 1
        ({"name": {"$in": ["photo.jpg", "x"]}}, True),
        ({"name": {"$nin": ["photo.jpg"]}}, False),
        ({"name": {"$regex": r"\.jpe?g$"}}, True),
        ({"size": {"$regex": "5"}}, False),
        ({"owner.team.name": "red"}, True),
        ({"owner.team.name": {"$in": ["blue"]}}, False),
        ({"tags.1": "b"}, True),
        ({"tags.5": {"$exists": False}}, True),
        ({"owner.id": {"$exists": True}}, True),
        ({"none": {"$exists": True}}, True),
        ({"missing": {"$ne": 1}}, True),
        ({"missing": {"$gt": 1}}, False),
        ({"missing": None}, False),
        ({"tags": ["a", "b"]}, True),
        ({"owner": {"id": "u1", "team": {"name": "red"}}}, True),
        ({"$and": [{"size": 50}, {"ok": True}]}, True),
        ({"$and": [{"size": 50}, {"ok": False}]}, False),
        ({"$or": [{"size": 1}, {"name": {"$regex": "^photo"}}]}, True),
        ({"$or": [{"size": 1}, {"size": 2}]}, False),
        ({"$not": {"size": 1}}, True),
        ({"size": {"$not": {"$gt": 10}}}, False),
        ({"missing": {"$not": {"$gt": 10}}}, True),
    ],
)
def test_matches(spec, expected):
    validate_filter(spec)
    assert matches(spec, DATA) is expected


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"$foo": 1}, "spec.filter.$foo"),
        ({"size": {"$foo": 1}}, "spec.filter.size.$foo"),
        ({"size": {"$in": 1}}, "spec.filter.size.$in"),
        ({"size": {"$exists": "yes"}}, "spec.filter.size.$exists"),
        ({"name": {"$regex": "("}}, "spec.filter.name.$regex"),
        ({"$and": []}, "spec.filter.$and"),
        ({"$or": [{"a": 1}, {"b": {"$bad": 1}}]}, "spec.filter.$or[1].b.$bad"),
        ({"$not": {"$gte": 1}}, "spec.filter.$not.$gte"),
        ({"a": {"$not": 5}}, "spec.filter.a.$not"),
        ({"a": {"$gt": 1, "b": 2}}, "spec.filter.a"),
        ([], "spec.filter"),
    ],
)
def test_validation_names_the_field(spec, field):
    with pytest.raises(Invalid) as caught:
        validate_filter(spec)
    assert caught.value.details[0]["field"] == field
