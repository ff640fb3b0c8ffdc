"""The ten JSON schemas of the structured-output figures (`customllm bench structured`, the tests):
nested objects, arrays with bounds, enums, numbers with bounds, optional fields, `anyOf`, `$ref`,
patterns and formats — each with the user prompt that asks for it."""
from __future__ import annotations

SCHEMAS: list[tuple[str, str, dict]] = [
    ("person", "Describe a fictional person as JSON with their name, age and email.", {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                       "email": {"type": "string", "format": "email"}},
        "required": ["name", "age"]}),
    ("address", "Give the name and postal address of a museum as JSON, with up to three tags.", {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "address": {"type": "object", "properties": {
                "street": {"type": "string"}, "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["street", "city", "zip"]},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
        "required": ["name", "address", "tags"]}),
    ("product", "Describe a product in an online shop as JSON.", {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1}, "title": {"type": "string"},
            "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 10000},
            "in_stock": {"type": "boolean"},
            "category": {"enum": ["books", "electronics", "garden", "toys", "food"]}},
        "required": ["id", "title", "price", "in_stock", "category"]}),
    ("weather", "Report today's weather in Paris and a short forecast as JSON.", {
        "type": "object",
        "properties": {
            "city": {"type": "string"}, "temperature_c": {"type": "number", "minimum": -90, "maximum": 60},
            "conditions": {"enum": ["sunny", "cloudy", "rain", "snow"]},
            "forecast": {"type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "object", "properties": {
                "day": {"enum": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]},
                "high": {"type": "number"}, "low": {"type": "number"}}, "required": ["day", "high", "low"]}}},
        "required": ["city", "temperature_c", "conditions", "forecast"]}),
    ("recipe", "Write a simple pancake recipe as JSON.", {
        "type": "object",
        "properties": {
            "title": {"type": "string"}, "servings": {"type": "integer", "minimum": 1, "maximum": 12},
            "ingredients": {"type": "array", "minItems": 1, "maxItems": 6, "items": {"type": "object", "properties": {
                "item": {"type": "string"}, "quantity": {"type": "number", "exclusiveMinimum": 0},
                "unit": {"enum": ["g", "ml", "cup", "tbsp", "piece"]}}, "required": ["item", "quantity", "unit"]}},
            "steps": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 5}},
        "required": ["title", "servings", "ingredients", "steps"]}),
    ("event", "Describe an upcoming concert as JSON: its title, when it happens and where.", {
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "when": {"anyOf": [{"type": "string", "format": "date"},
                               {"type": "object", "properties": {"start": {"type": "string", "format": "date"},
                                                                 "end": {"type": "string", "format": "date"}},
                                "required": ["start", "end"]}]},
            "location": {"type": "string"}},
        "required": ["title", "when"]}),
    ("sentiment", "Classify the sentiment of 'I loved this movie, the music was great!' as JSON.", {
        "type": "object",
        "properties": {
            "label": {"enum": ["positive", "negative", "neutral"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "keywords": {"type": "array", "items": {"type": "string"}, "maxItems": 5}},
        "required": ["label", "confidence"]}),
    ("contact", "Give one way to contact a support team as JSON.", {
        "type": "object",
        "properties": {
            "team": {"type": "string"},
            "contact": {"anyOf": [
                {"type": "object", "properties": {"kind": {"const": "email"}, "address": {"type": "string",
                                                                                         "format": "email"}},
                 "required": ["kind", "address"]},
                {"type": "object", "properties": {"kind": {"const": "phone"}, "number": {
                    "type": "string", "pattern": "^\\+[0-9]{6,12}$"}}, "required": ["kind", "number"]}]}},
        "required": ["team", "contact"]}),
    ("order", "Create an example customer order as JSON.", {
        "type": "object",
        "properties": {
            "order_id": {"type": "string", "pattern": "^ORD-[0-9]{4}$"},
            "customer": {"type": "object", "properties": {"name": {"type": "string"}, "vip": {"type": "boolean"}},
                         "required": ["name"]},
            "items": {"type": "array", "minItems": 1, "maxItems": 4, "items": {"type": "object", "properties": {
                "sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1, "maximum": 10}},
                "required": ["sku", "qty"]}},
            "total": {"type": "number", "minimum": 0},
            "notes": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
        "required": ["order_id", "customer", "items", "total"]}),
    ("books", "List up to three classic novels as JSON.", {
        "$defs": {"genre": {"enum": ["fiction", "romance", "adventure", "mystery", "satire"]},
                  "book": {"type": "object", "properties": {
                      "title": {"type": "string"}, "author": {"type": "string"},
                      "year": {"type": "integer", "minimum": 1450, "maximum": 2025},
                      "genres": {"type": "array", "items": {"$ref": "#/$defs/genre"}, "maxItems": 3}},
                      "required": ["title", "author", "year"]}},
        "type": "object",
        "properties": {"books": {"type": "array", "minItems": 1, "maxItems": 3, "items": {"$ref": "#/$defs/book"}}},
        "required": ["books"]}),
]
