"""The OpenAPI 3.1 description of the HTTP surface, served at ``/openapi.json``.

The inference routes follow KServe's Open Inference Protocol (v2) REST description
(https://github.com/kserve/open-inference-protocol), with Triton's binary tensor extension. The
document is written here rather than generated from the routes, because the hot path is a plain
Starlette route that parses its own body; ``tests/serving/test_hostile.py`` checks that every route
of the app is described here and nothing else is. Routes added by an extension describe themselves
by adding their entries to ``app.state.openapi_paths`` when they are included.
"""

from __future__ import annotations

import copy

JSON = "application/json"
ERROR = {"$ref": "#/components/schemas/Error"}


def _response(description: str, schema: dict | None = None, media: str = JSON) -> dict:
    answer = {"description": description}
    if schema is not None:
        answer["content"] = {media: {"schema": schema}}
    return answer


def _errors(*statuses: int) -> dict:
    meaning = {
        400: "Malformed request, or inputs that do not match the model (the message names the field)",
        404: "Unknown model or version",
        408: "The request's headers or body did not arrive in time",
        413: "The body is larger than the server's limit or than any valid request for this model",
        431: "The request line and headers are too large",
        503: "The queue is full, the server holds too many request bytes, or it is shutting down; retry later",
    }
    return {str(s): _response(meaning[s], ERROR) for s in statuses}


def _name(version: bool) -> list[dict]:
    params = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
    if version:
        params.append({"name": "version", "in": "path", "required": True, "schema": {"type": "string"}})
    return params


def _health(summary: str, ready: bool) -> dict:
    responses = {"200": _response("Yes")}
    if ready:
        responses["503"] = _response("Not ready (loading or shutting down)")
    return {"get": {"summary": summary, "tags": ["health"], "responses": responses}}


def _model_metadata(version: bool) -> dict:
    return {
        "get": {
            "summary": "Model metadata: its input and outputs",
            "tags": ["models"],
            "parameters": _name(version),
            "responses": {
                "200": _response("The model's metadata", {"$ref": "#/components/schemas/ModelMetadata"}),
                **_errors(404),
            },
        }
    }


def _model_ready(version: bool) -> dict:
    return {
        "get": {
            "summary": "Whether the model is ready for inference",
            "tags": ["health"],
            "parameters": _name(version),
            "responses": {"200": _response("Ready"), **_errors(404)},
        }
    }


def _infer(version: bool) -> dict:
    header = {
        "name": "Inference-Header-Content-Length",
        "in": "header",
        "required": False,
        "description": "Binary tensor extension: the byte length of the JSON header that starts the body",
        "schema": {"type": "integer", "minimum": 1},
    }
    request = {"$ref": "#/components/schemas/InferenceRequest"}
    binary = {"type": "string", "format": "binary"}
    return {
        "post": {
            "summary": "Run inference: JSON tensors, or a JSON header followed by raw tensor bytes",
            "tags": ["inference"],
            "parameters": [*_name(version), header],
            "requestBody": {
                "required": True,
                "content": {JSON: {"schema": request}, "application/octet-stream": {"schema": binary}},
            },
            "responses": {
                "200": {
                    "description": "The outputs (binary ones appended after the JSON header)",
                    "content": {
                        JSON: {"schema": {"$ref": "#/components/schemas/InferenceResponse"}},
                        "application/octet-stream": {"schema": binary},
                    },
                },
                **_errors(400, 404, 408, 413, 431, 503),
            },
        }
    }


CORE_PATHS: dict[str, dict] = {
    "/v2/health/live": _health("Whether the server is live", ready=False),
    "/v2/health/ready": _health("Whether the server is ready for inference", ready=True),
    "/v2": {
        "get": {
            "summary": "Server metadata",
            "tags": ["server"],
            "responses": {
                "200": _response("Name, version, extensions", {"$ref": "#/components/schemas/ServerMetadata"})
            },
        }
    },
    "/v2/models/{name}": _model_metadata(False),
    "/v2/models/{name}/versions/{version}": _model_metadata(True),
    "/v2/models/{name}/ready": _model_ready(False),
    "/v2/models/{name}/versions/{version}/ready": _model_ready(True),
    "/v2/models/{name}/infer": _infer(False),
    "/v2/models/{name}/versions/{version}/infer": _infer(True),
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics",
            "tags": ["server"],
            "responses": {"200": _response("Metrics in the Prometheus text format", {"type": "string"}, "text/plain")},
        }
    },
    "/openapi.json": {
        "get": {
            "summary": "This document",
            "tags": ["server"],
            "responses": {"200": _response("The OpenAPI description of the HTTP surface", {"type": "object"})},
        }
    },
}

_DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"]
_SHAPE = {"type": "array", "items": {"type": "integer", "minimum": 0}}
_PARAMETERS = {"type": "object", "additionalProperties": True}
_TENSOR_METADATA = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
    },
}
_DATA = {
    "description": "Tensor values, row-major, flat or nested",
    "type": "array",
    "items": {"anyOf": [{"type": "number"}, {"type": "boolean"}, {"type": "array"}]},
}

SCHEMAS: dict[str, dict] = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "ServerMetadata": {
        "type": "object",
        "required": ["name", "version", "extensions"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}},
        },
    },
    "ModelMetadata": {
        "type": "object",
        "required": ["name", "platform", "inputs", "outputs"],
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": _TENSOR_METADATA},
            "outputs": {"type": "array", "items": _TENSOR_METADATA},
            "parameters": _PARAMETERS,
        },
    },
    "RequestInput": {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"},
            "shape": _SHAPE,
            "datatype": {"type": "string", "enum": _DATATYPES},
            "parameters": {
                "type": "object",
                "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
                "additionalProperties": True,
            },
            "data": _DATA,
        },
    },
    "RequestOutput": {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string"},
            "parameters": {
                "type": "object",
                "properties": {"binary_data": {"type": "boolean"}},
                "additionalProperties": True,
            },
        },
    },
    "InferenceRequest": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": {
                "type": "object",
                "properties": {"binary_data_output": {"type": "boolean"}},
                "additionalProperties": True,
            },
            "inputs": {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/RequestInput"}},
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/RequestOutput"}},
        },
    },
    "ResponseOutput": {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"},
            "shape": _SHAPE,
            "datatype": {"type": "string", "enum": _DATATYPES},
            "parameters": _PARAMETERS,
            "data": _DATA,
        },
    },
    "InferenceResponse": {
        "type": "object",
        "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "parameters": _PARAMETERS,
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/ResponseOutput"}},
        },
    },
}


def build_document(paths: dict[str, dict], version: str, title: str = "fpt-deploy") -> dict:
    """The OpenAPI document for ``paths`` (``CORE_PATHS`` plus whatever extensions added)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": "Open Inference Protocol (KServe v2) over HTTP, with Triton's binary tensor extension.",
        },
        "paths": paths,
        "components": {"schemas": SCHEMAS},
    }


def with_examples(doc: dict, models: list[str], infer_example: dict | None = None) -> dict:
    """A copy of ``doc`` whose ``name`` parameters list the served models as examples, and whose infer
    bodies carry ``infer_example``: API tools and fuzzers then reach the models, not only 404s."""
    doc = copy.deepcopy(doc)
    for path, operations in doc["paths"].items():
        for operation in operations.values():
            for param in operation.get("parameters", []):
                if param.get("in") == "path" and param["name"] == "name" and models:
                    param["schema"]["examples"] = list(models)
                elif param.get("in") == "path" and param["name"] == "version":
                    param["schema"]["examples"] = ["1"]
            body = operation.get("requestBody", {}).get("content", {}).get(JSON)
            if infer_example is not None and body is not None and path.endswith("/infer"):
                body["example"] = infer_example
    return doc
