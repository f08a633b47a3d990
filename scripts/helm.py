"""`helm lint` and `helm template` on Helm's own Go engine, without a helm binary.

PyPI's helm-python-sdk ships libhelm_c.so, a C ABI over Helm's Go SDK
(helm.sh/helm/v4: pkg/engine renders, pkg/lint lints, the chart's
values.schema.json is checked by Helm's own validator); this file is only the
command line around it, run by scripts/helm from its venv:

    helm.py version
    helm.py lint CHART [-f VALUES]... [--set k=v]... [--strict] [--namespace NS]
                 [--kube-version v1.30.0]
    helm.py template NAME CHART [-f VALUES]... [--set k=v]... [--namespace NS]
                 [--show-only templates/x.yaml]...

Values compose like the helm CLI's: each -f file is merged over the previous
ones (maps key by key, anything else replaced), then each --set /
--set-string / --set-json over that (Helm's strvals parser reads them); the
chart's defaults are coalesced under the result by Helm itself, which also
validates the schema.

`template` prints what `helm template` prints: the rendered documents as one
YAML stream, each after `---` and `# Source: <chart>/templates/<file>`, in
Helm's install order (by kind, then template path, then position in the
file), NOTES.txt and empty documents left out. Exit status: 0, or 1 with
Helm's error on stderr.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import helm_python as helm

# Helm's releaseutil.InstallOrder: kinds in the order `helm install` creates
# them (and `helm template` prints them). Kinds not listed come after, by name.
INSTALL_ORDER = [
    "PriorityClass",
    "Namespace",
    "NetworkPolicy",
    "ResourceQuota",
    "LimitRange",
    "PodSecurityPolicy",
    "PodDisruptionBudget",
    "ServiceAccount",
    "Secret",
    "SecretList",
    "ConfigMap",
    "StorageClass",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleList",
    "ClusterRoleBinding",
    "ClusterRoleBindingList",
    "Role",
    "RoleList",
    "RoleBinding",
    "RoleBindingList",
    "Service",
    "DaemonSet",
    "Pod",
    "ReplicationController",
    "ReplicaSet",
    "Deployment",
    "HorizontalPodAutoscaler",
    "StatefulSet",
    "Job",
    "CronJob",
    "IngressClass",
    "Ingress",
    "APIService",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
]

SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """The helm CLI's mergeMaps: `over` wins; maps are merged key by key."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def user_values(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for path in args.values:
        with open(path, encoding="utf-8") as f:
            parsed = helm.values_from_yaml(f.read())
        if not isinstance(parsed, dict):
            raise SystemExit(f"helm: {path}: values must be a map")
        values = merge(values, parsed)
    for kind, expr in args.sets:
        parse = {
            "set": helm.parse_set_string,
            "set-string": helm.parse_set_string_values,
            "set-json": helm.parse_set_json,
        }[kind]
        values = merge(values, parse(expr))
    return values


def kind_of(document: str) -> str:
    try:
        parsed = helm.values_from_yaml(document)
    except helm.HelmError:
        return ""
    kind = parsed.get("kind") if isinstance(parsed, dict) else None
    return kind if isinstance(kind, str) else ""


def documents(text: str) -> list[str]:
    """Split one rendered template into its YAML documents, as Helm does
    (a line starting with `---` separates), dropping empty ones."""
    docs: list[str] = []
    current: list[str] = []
    for line in text.splitlines(keepends=True):
        if line.startswith("---"):
            docs.append("".join(current))
            current = []
        else:
            current.append(line)
    docs.append("".join(current))
    out = []
    for d in docs:
        meaningful = [
            ln for ln in d.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
        ]
        if meaningful:
            out.append(d.strip("\n") + "\n")
    return out


def order_key(kind: str, path: str, index: int) -> tuple[int, str, str, int]:
    if kind in INSTALL_ORDER:
        return (INSTALL_ORDER.index(kind), "", path, index)
    return (len(INSTALL_ORDER), kind, path, index)


def cmd_template(args: argparse.Namespace) -> int:
    helm.validate_release_name(args.name)
    with helm.Chart.load(args.chart) as chart:
        rendered = chart.render(
            user_values(args),
            name=args.name,
            namespace=args.namespace,
            is_install=True,
        )
    entries = []
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        inner = path.split("/", 1)[1] if "/" in path else path
        if args.show_only and inner not in args.show_only and path not in args.show_only:
            continue
        for i, doc in enumerate(documents(text)):
            entries.append((order_key(kind_of(doc), path, i), path, doc))
    if args.show_only and not entries:
        print(f"Error: could not find template(s) {args.show_only} in chart", file=sys.stderr)
        return 1
    entries.sort(key=lambda e: e[0])
    out = []
    for _, path, doc in entries:
        out.append(f"---\n# Source: {path}\n{doc}")
    sys.stdout.write("".join(out))
    return 0


def cmd_lint(args: argparse.Namespace) -> int:
    report = helm.lint(
        args.chart,
        user_values(args),
        strict=args.strict,
        namespace=args.namespace,
        kube_version=args.kube_version,
    )
    print(f"==> Linting {args.chart}")
    failing = 3 if not args.strict else 2
    failed = False
    for m in report.get("messages", []):
        sev = int(m.get("severity", 0))
        label = SEVERITY.get(sev, str(sev))
        print(f"[{label}] {m.get('path', '')}: {m.get('error', '').rstrip()}")
        if sev >= failing:
            failed = True
    errors = report.get("errors") or []
    if errors:
        failed = True
    print()
    linted = report.get("total_charts_linted", 1)
    print(f"{linted} chart(s) linted, {1 if failed else 0} chart(s) failed")
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/helm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def values_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("-f", "--values", action="append", default=[], metavar="FILE")
        for flag in ("set", "set-string", "set-json"):
            p.add_argument(
                f"--{flag}",
                action="append",
                dest="sets",
                type=lambda v, k=flag: (k, v),
                metavar="K=V",
            )
        p.set_defaults(sets=[])
        p.add_argument("-n", "--namespace", default="default")

    sub.add_parser("version", help="print the Helm SDK version")
    lint = sub.add_parser("lint", help="helm lint")
    lint.add_argument("chart")
    lint.add_argument("--strict", action="store_true", help="warnings fail too")
    lint.add_argument("--kube-version", default=None, metavar="v1.30.0")
    values_options(lint)
    template = sub.add_parser("template", help="helm template")
    template.add_argument("name")
    template.add_argument("chart")
    template.add_argument("-s", "--show-only", action="append", default=[], metavar="TEMPLATE")
    values_options(template)

    args = parser.parse_args(argv)
    if getattr(args, "sets", None) is None:
        args.sets = []
    try:
        if args.command == "version":
            print(f"{helm.helm_sdk_version()} (helm-python-sdk {helm.__version__}, libhelm_c {helm.helm_c_version()})")
            return 0
        if args.command == "lint":
            return cmd_lint(args)
        return cmd_template(args)
    except helm.HelmError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
