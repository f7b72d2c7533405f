"""The early-warning alerts (issue 19) while they wait to join the generated pack: rules/early-warning-draft.yml
passes promtool's check and its unit tests (every alert fires with its labels and stays quiet), and each
alert has its runbook quoting the expression it evaluates."""

from __future__ import annotations

import re
import subprocess

import yaml

from tests.conftest import require_tool
from tests.fakenvml.scenario import REPO

DRAFT = REPO / "rules" / "early-warning-draft.yml"
TESTS = REPO / "rules" / "tests" / "early-warning-draft.test.yml"
ALERTS = [r for g in yaml.safe_load(DRAFT.read_text())["groups"] for r in g["rules"]]


def test_promtool_checks_the_draft_and_its_cases_pass() -> None:
    promtool = require_tool("promtool")
    check = subprocess.run([promtool, "check", "rules", str(DRAFT)], capture_output=True, text=True)
    assert check.returncode == 0 and f"SUCCESS: {len(ALERTS)} rules found" in check.stdout, check.stdout + check.stderr
    unit = subprocess.run([promtool, "test", "rules", TESTS.name], capture_output=True, text=True, cwd=TESTS.parent)
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_every_alert_has_a_firing_and_a_quiet_case_and_its_runbook() -> None:
    firing, quiet = set(), set()
    for t in yaml.safe_load(TESTS.read_text())["tests"]:
        for case in t["alert_rule_test"]:
            (firing if case["exp_alerts"] else quiet).add(case["alertname"])
    names = {r["alert"] for r in ALERTS}
    assert len(names) == 9 and firing == names == quiet
    for r in ALERTS:
        text = (REPO / "docs" / "runbooks" / f"{r['alert']}.md").read_text()
        quoted = re.search(r"```promql\n(.*?)```", text, re.S)
        assert quoted and " ".join(quoted.group(1).split()) == " ".join(r["expr"].split()), r["alert"]
        assert r["annotations"]["runbook_url"].endswith(f"/docs/runbooks/{r['alert']}.md")
        assert "{{ $value" in r["annotations"]["description"], r["alert"]
