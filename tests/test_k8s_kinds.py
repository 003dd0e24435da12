"""The job-kind registry (k8s/gnpk8s/kinds.py) and the shape of the k8s package.

- every registered kind has the protocol's constants and its five operations (render, submit, status, logs,
  delete) plus build, rank0_pod and follow_up, and renders every job spec into objects that validate strictly
  against their CRDs (tests/data/crds/<group>_<plural>.yaml), a built-in kind (the conversion Job, batch/v1)
  with `kubernetes-validate --strict`: a new kind is checked by adding its module, its KINDS line and, for a
  custom resource, its CRD file;
- the CLI and `make status|logs|delete` reach a kind only through the registry (--api offers exactly KINDS);
- no function in k8s/ is longer than 100 lines.
The package's import graph is checked with trainer/'s in tests/test_train.py (test_no_import_cycles).
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from gnpk8s import cli, kinds
from gnpk8s.spec import load_job
from tests.support.prom import cr_errors, crd_schema
from tests.test_k8s import JOBS, ROOT, TEST_IMAGE

CRDS = ROOT / "tests" / "data" / "crds"
CONSTANTS = ("NAME", "GROUP", "VERSION", "PLURAL", "KIND", "MAKE_API", "KUEUE_FRAMEWORK", "KUEUE_HINT")
FUNCTIONS = (*kinds.OPERATIONS, "build", "rank0_pod", "follow_up")
MAX_FUNCTION_LINES = 100


BUILTIN_GROUPS = {"v1", "apps", "batch", "rbac.authorization.k8s.io"}  # what kubernetes-validate knows


def _crd(obj: dict) -> Path:
    group = obj["apiVersion"].split("/")[0]
    return CRDS / f"{group}_{obj['kind'].lower()}s.yaml"


def _errors(obj: dict) -> list:
    """Strict validation errors of one object: its CRD's schema, or kubernetes-validate for a built-in kind."""
    if obj["apiVersion"].split("/")[0] in BUILTIN_GROUPS:
        kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate==1.37.0 into .venv")
        try:
            kv.validate(obj, "1.37", strict=True)
        except kv.ValidationError as e:
            return [str(e)]
        return []
    assert _crd(obj).is_file(), f"no CRD for {obj['kind']}: add {_crd(obj).name} to tests/data/crds"
    return cr_errors(obj, crd_schema(_crd(obj), obj["apiVersion"]))


def test_the_protocol_names_what_the_test_checks():
    declared = set(kinds.JobKind.__annotations__)
    methods = {n for n, v in vars(kinds.JobKind).items() if inspect.isfunction(v) and not n.startswith("_")}
    assert declared == set(CONSTANTS) and methods == set(FUNCTIONS)


@pytest.mark.parametrize("name", list(kinds.KINDS))
def test_every_kind_has_the_protocol(name):
    kind = kinds.KINDS[name]
    assert kind.NAME == name and kinds.get(name) is kind
    for const in CONSTANTS:
        assert isinstance(getattr(kind, const), str), f"{name}.{const}"
    for fn in FUNCTIONS:
        assert callable(getattr(kind, fn, None)), f"{name} has no {fn}()"
        want = [p for p in inspect.signature(getattr(kinds.JobKind, fn)).parameters if p != "self"]
        have = list(inspect.signature(getattr(kind, fn)).parameters)
        assert have == want, f"{name}.{fn}{tuple(have)}: the protocol says {tuple(want)}"


@pytest.mark.parametrize("name", list(kinds.KINDS))
@pytest.mark.parametrize("job", JOBS)
def test_every_kind_renders_every_job_valid_against_its_crd(name, job, capsys):
    kind = kinds.get(name)
    spec = load_job(job, spec_overrides=[f"api={name}"], namespace="gnp", image=TEST_IMAGE)
    objects = kind.render(spec)
    assert objects[-1] == kind.build(spec) and objects[-1]["kind"] == kind.KIND
    assert objects[-1]["apiVersion"] == f"{kind.GROUP}/{kind.VERSION}"
    for obj in objects:
        assert _errors(obj) == [], (job, obj["kind"])
    assert isinstance(kind.rank0_pod(objects[-1]), str) and job in kind.rank0_pod(objects[-1])
    assert f"make status JOB={job}" in kind.follow_up(job, "gnp")
    capsys.readouterr()  # an elastic job's TrainJob notice


def test_an_unknown_kind_is_a_user_error():
    with pytest.raises(kinds.UserError, match=r"^unknown job kind 'nope'; known: pytorchjob, trainjob, convert$"):
        kinds.get("nope")
    known = "pytorchjob, trainjob, convert"
    with pytest.raises(kinds.UserError, match=rf"^k8s/jobs/x.yaml: api: expected one of {known}, got"):
        kinds.get("nope", "k8s/jobs/x.yaml")
    for command in ("render", "submit"):  # submit: before any cluster call (no kubeconfig needed)
        assert cli.main([command, "resnet-cifar", "--spec", "api=nope"]) == 2


def test_the_cli_offers_exactly_the_registered_kinds():
    status = cli._parser()._subparsers._group_actions[0].choices["status"]
    (api,) = [a for a in status._actions if a.dest == "api"]
    assert list(api.choices) == list(kinds.KINDS)


def test_cluster_knows_no_kind():
    """cluster.py is what every kind shares: it names no kind module and no kind."""
    src = (ROOT / "k8s" / "gnpk8s" / "cluster.py").read_text()
    for name in kinds.KINDS:
        assert name not in src.replace("kind", ""), name
    mods = {n.module for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom) and n.level}
    assert mods <= {"errors", "spec"}, mods


def test_no_function_in_k8s_is_over_100_lines():
    long = []
    for path in sorted((ROOT / "k8s").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}() {lines} lines")
    assert long == []
