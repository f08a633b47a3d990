"""Validates Kubernetes manifests offline, as an API server would.

Usage: validate_manifests.py --kubernetes-version 1.32 [--kubernetes-version ...]
                             --crds DIR FILE...

Every document of every FILE (a YAML stream; `-` is stdin) is checked:

- a kind that one of the CustomResourceDefinitions in DIR defines (group and
  kind match) against that CRD's openAPIV3Schema for the document's version,
  which must be a served, non-deprecated one: the schema (as JSON Schema),
  its `x-kubernetes-list-type` set/map uniqueness, and its
  `x-kubernetes-validations` CEL rules (cel-python; Kubernetes' `isURL` /
  `url().getScheme()` library functions by Go's url.ParseRequestURI rules;
  transition rules, which use oldSelf, never apply to a create); its
  metadata against Kubernetes' ObjectMeta;
- any other kind against Kubernetes' own OpenAPI schema of each
  --kubernetes-version, from PyPI's kubernetes-validate;
- a kind neither knows is a failure, not a skip.

Both are strict, as `kubectl apply` (server-side field validation Strict)
is: an unknown field is an error, except below a CRD's
`x-kubernetes-preserve-unknown-fields`.

Prints one JSON line per document and schema: file, doc (index in the
stream), kind, name, against, ok, errors, cel_rules (how many CEL rules
were evaluated). Exits 0 when every document passed, 1 otherwise, 2 on bad
usage or unreadable input.
"""

import argparse
import copy
import json
import os
import re
import sys
from urllib.parse import urlsplit

import celpy
import celpy.celtypes
import jsonschema
import kubernetes_validate
import referencing
import yaml
from kubernetes_validate.utils import (
    SchemaNotFoundError,
    all_versions,
    major_minor,
    schema_contents,
)

OBJECT_META = (
    "https://kubernetes.io/api/_definitions.json"
    "#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
)


class Crd:
    """One CustomResourceDefinition: its group, kind and versions."""

    def __init__(self, doc, source):
        spec = doc["spec"]
        self.name = doc["metadata"]["name"]
        self.group = spec["group"]
        self.kind = spec["names"]["kind"]
        self.source = source
        self.versions = {v["name"]: v for v in spec["versions"]}


def load_crds(directory):
    crds = {}
    for entry in sorted(os.listdir(directory)):
        if not entry.endswith((".yaml", ".yml")):
            continue
        with open(os.path.join(directory, entry)) as f:
            for doc in yaml.safe_load_all(f):
                if doc and doc.get("kind") == "CustomResourceDefinition":
                    crd = Crd(doc, entry)
                    crds[(crd.group, crd.kind)] = crd
    return crds


def strict_json_schema(schema):
    """The CRD schema as JSON Schema (draft 4, OpenAPI 3.0's base), strict.

    Walks the structural part (properties, items, additionalProperties):
    objects that do not say what else they allow and do not preserve unknown
    fields get `additionalProperties: false`; `nullable` admits null;
    `x-kubernetes-int-or-string` admits both. Value-validation branches
    (allOf/anyOf/oneOf/not) are left as they are: in a structural schema
    they only constrain values, never declare fields.
    """
    out = dict(schema)
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        int_or_string = {"anyOf": [{"type": "integer"}, {"type": "string"}]}
        out["allOf"] = out.get("allOf", []) + [int_or_string]
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out:
        out["properties"] = {k: strict_json_schema(v) for k, v in out["properties"].items()}
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict_json_schema(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = strict_json_schema(out["items"])
    preserve = out.get("x-kubernetes-preserve-unknown-fields")
    if out.get("type") == "object" and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


# Kubernetes' CEL URL library (k8s.io/apiserver/pkg/cel/library/urls.go)
# parses with Go's url.ParseRequestURI: an absolute URI with a scheme, or an
# absolute path, without spaces or control characters.
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _request_uri(text):
    text = str(text)
    if not text or re.search(r"[\x00-\x20\x7f]", text):
        return None
    if not (SCHEME.match(text) or text.startswith("/")):
        return None
    return urlsplit(text)


def _is_url(text):
    return celpy.celtypes.BoolType(_request_uri(text) is not None)


def _url(text):
    parsed = _request_uri(text)
    if parsed is None:
        raise ValueError("url: %r is not an absolute URI or path" % str(text))
    return parsed


def _get_scheme(parsed):
    return celpy.celtypes.StringType(parsed.scheme)


CEL_FUNCTIONS = {"isURL": _is_url, "url": _url, "getScheme": _get_scheme}
CEL = celpy.Environment()


def path_text(path):
    return "/".join(str(p) for p in path) or "(document)"


def extension_errors(value, schema, path, counter):
    """What JSON Schema cannot check: list-type uniqueness and CEL rules.

    Like the API server, a node's rules apply only where the value exists.
    """
    for rule in schema.get("x-kubernetes-validations", []):
        expr = rule["rule"]
        if "oldSelf" in expr:
            continue
        counter[0] += 1
        try:
            program = CEL.program(CEL.compile(expr), functions=CEL_FUNCTIONS)
            result = program.evaluate({"self": celpy.json_to_cel(value)})
        except Exception as e:  # a rule that cannot evaluate refuses, as in Kubernetes
            result = e
        if not (isinstance(result, celpy.celtypes.BoolType) and bool(result)):
            yield "%s: %s (CEL rule %s%s)" % (
                path_text(path),
                rule.get("message", "failed"),
                expr.replace("\n", " "),
                "" if isinstance(result, celpy.celtypes.BoolType) else ": %s" % result,
            )
    if isinstance(value, dict):
        for key, item in value.items():
            sub = schema.get("properties", {}).get(key)
            if sub is None and isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
            if sub is not None:
                yield from extension_errors(item, sub, path + [key], counter)
    elif isinstance(value, list):
        kind = schema.get("x-kubernetes-list-type")
        seen = set()
        for index, item in enumerate(value):
            if kind == "set":
                key = json.dumps(item, sort_keys=True)
            elif kind == "map" and isinstance(item, dict):
                key = tuple(item.get(k) for k in schema.get("x-kubernetes-list-map-keys", []))
            else:
                key = None
            if key is not None:
                if key in seen:
                    yield "%s: duplicate entry %r in a list of type %s" % (
                        path_text(path + [index]),
                        key,
                        kind,
                    )
                seen.add(key)
            if isinstance(schema.get("items"), dict):
                yield from extension_errors(item, schema["items"], path + [index], counter)


def describe(error, prefix=()):
    return "%s: %s" % (path_text(list(prefix) + list(error.absolute_path)), error.message)


def shipped_version(wanted):
    """The schema release kubernetes-validate ships for `wanted`'s minor."""
    for version in all_versions():
        if major_minor(version) == major_minor(wanted):
            return version
    return None


def object_meta_validator(version):
    defs = schema_contents(
        "kubernetes-json-schema/v%s-local-strict/_definitions.json" % version, version
    )
    registry = referencing.Registry().with_resource(
        defs["$id"], referencing.Resource.from_contents(defs)
    )
    return jsonschema.Draft202012Validator({"$ref": OBJECT_META}, registry=registry)


def check_custom(doc, crd, meta_validator):
    version = doc["apiVersion"].split("/", 1)[1]
    against = "CRD %s %s (%s)" % (crd.name, version, crd.source)
    served = crd.versions.get(version)
    if served is None or not served.get("served"):
        return against, ["apiVersion: %s is not a served version of %s" % (version, crd.name)], 0
    if served.get("deprecated"):
        return against, ["apiVersion: %s of %s is deprecated" % (version, crd.name)], 0
    schema = copy.deepcopy(served["schema"]["openAPIV3Schema"])
    # apiVersion and kind were matched above; metadata is ObjectMeta's.
    envelope = ("apiVersion", "kind", "metadata")
    for key in envelope:
        schema.get("properties", {}).pop(key, None)
    body = {k: v for k, v in doc.items() if k not in envelope}
    errors = [describe(e) for e in jsonschema.Draft4Validator(strict_json_schema(schema)).iter_errors(body)]
    counter = [0]
    errors += list(extension_errors(body, schema, [], counter))
    errors += [
        describe(e, ["metadata"]) for e in meta_validator.iter_errors(doc.get("metadata") or {})
    ]
    return against, errors, counter[0]


def check_builtin(doc, version):
    against = "Kubernetes %s (strict)" % major_minor(version)
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except SchemaNotFoundError as e:
        return against, ["unknown kind: %s" % e.message], 0
    except kubernetes_validate.ValidationError as e:
        return against, [describe(e)], 0
    return against, [], 0


def check(doc, crds, versions, meta):
    if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
        return [("nothing", ["a document without apiVersion and kind"], 0)]
    api_version = doc["apiVersion"]
    group = api_version.rsplit("/", 1)[0] if "/" in api_version else ""
    crd = crds.get((group, doc["kind"]))
    if crd is not None:
        return [check_custom(doc, crd, meta)]
    return [check_builtin(doc, v) for v in versions]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubernetes-version", action="append", required=True)
    parser.add_argument("--crds", required=True)
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    crds = load_crds(args.crds)
    if not crds:
        print("no CustomResourceDefinition in %s" % args.crds, file=sys.stderr)
        return 2
    versions = [shipped_version(v) for v in args.kubernetes_version]
    if None in versions:
        print(
            "kubernetes-validate %s ships no schemas for Kubernetes %s (it has %s)"
            % (
                kubernetes_validate.__version__,
                args.kubernetes_version[versions.index(None)],
                ", ".join(all_versions()),
            ),
            file=sys.stderr,
        )
        return 2
    meta = object_meta_validator(versions[0])
    failed = False
    for path in args.files:
        try:
            text = sys.stdin.read() if path == "-" else open(path).read()
            docs = list(yaml.safe_load_all(text))
        except (OSError, yaml.YAMLError) as e:
            print("%s: %s" % (path, e), file=sys.stderr)
            return 2
        for index, doc in enumerate(docs):
            if doc is None:
                continue
            fields = doc if isinstance(doc, dict) else {}
            line = {
                "file": path,
                "doc": index,
                "kind": fields.get("kind"),
                "name": (fields.get("metadata") or {}).get("name"),
            }
            for against, errors, cel_rules in check(doc, crds, versions, meta):
                failed = failed or bool(errors)
                result = dict(line, against=against, ok=not errors, errors=errors)
                print(json.dumps(dict(result, cel_rules=cel_rules)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
