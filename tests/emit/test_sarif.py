"""findings.sarif: valid SARIF 2.1.0 (the official schema), locations from evidence."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from emit.sarif import emit_findings_outputs, location, sarif_log
from learn.findings import Flag
from learn.model import Finding

SCHEMA = Path(__file__).resolve().parents[1] / "data" / "sarif" / "sarif-schema-2.1.0.json"


def _findings() -> list[Finding]:
    return [
        Flag("scan:shop/web", "scan", "high", "shop/web", None, None,
             "shop/web reached 40 destination/port pairs in 10 min.",
             ["logs/shop/web-1/istio-proxy.log:8719", "logs/shop/web-1/istio-proxy.log:8721"],
             score=40.0, details={"targets": 40}),
        Finding("plaintext:a/x->a/y:80", "plaintext", "high", "a/x", "a/y", 80, "plain",
                ["/abs/dir with space/y.log:7"]),
        Finding("permissive:a/y:80", "permissive", "medium", None, "a/y", 80, "perm",
                ["capture.pcap:packet 12"]),
        Finding("external-egress:a/x->external:example.com:443", "external-egress", "low",
                "a/x", "external:example.com", 443, "egress", []),
    ]


def test_log_validates_against_the_official_schema() -> None:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    log = sarif_log(_findings(), tool_version="1.2.3")
    jsonschema.Draft4Validator(schema).validate(log)
    run = log["runs"][0]
    assert log["version"] == "2.1.0" and run["tool"]["driver"]["name"] == "meshwright"
    rules = [r["id"] for r in run["tool"]["driver"]["rules"]]
    assert rules == sorted(rules) == ["external-egress", "permissive", "plaintext", "scan"]
    results = run["results"]
    assert [r["level"] for r in results] == ["error", "error", "warning", "note"]
    assert [rules[r["ruleIndex"]] for r in results] == [r["ruleId"] for r in results]
    assert [r["partialFingerprints"]["meshwrightFindingId/v1"] for r in results] == [
        f.id for f in _findings()]
    assert [r["rank"] for r in results] == [100.0, 75.0, 50.0, 25.0]
    assert results[0]["properties"]["details"] == {"targets": 40}


def test_locations_come_from_the_evidence() -> None:
    results = sarif_log(_findings(), tool_version="1")["runs"][0]["results"]
    first = results[0]["locations"][0]
    assert first["physicalLocation"] == {
        "artifactLocation": {"uri": "logs/shop/web-1/istio-proxy.log"},
        "region": {"startLine": 8719}}
    assert first["logicalLocations"] == [{"fullyQualifiedName": "shop/web", "kind": "resource"}]
    assert results[0]["relatedLocations"][0]["physicalLocation"]["region"] == {"startLine": 8721}
    absolute = results[1]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
    assert absolute == "file:///abs/dir%20with%20space/y.log"
    packet = results[2]["locations"][0]
    assert packet["physicalLocation"] == {"artifactLocation": {"uri": "capture.pcap"}}
    assert packet["message"] == {"text": "packet 12"}
    assert packet["logicalLocations"][0]["fullyQualifiedName"] == "a/y:80"
    # no evidence: the edge is the only location
    assert results[3]["locations"] == [{"logicalLocations": [{
        "fullyQualifiedName": "a/x->external:example.com:443", "kind": "resource"}]}]


@pytest.mark.parametrize("evidence, uri, line", [
    ("a.log:1", "a.log", 1),
    ("dir/c:d.log:42", "dir/c%3Ad.log", 42),  # the last colon separates the line
    ("nolinenumber.log", "nolinenumber.log", None),
])
def test_evidence_parsing(evidence: str, uri: str, line: int | None) -> None:
    loc = location(evidence)["physicalLocation"]
    assert loc["artifactLocation"]["uri"] == uri
    assert loc.get("region", {}).get("startLine") == line


def test_outputs_are_written_ranked(tmp_path: Path) -> None:
    shuffled = list(reversed(_findings()))
    paths = emit_findings_outputs(tmp_path, shuffled, tool_version="1")
    assert [p.name for p in paths] == ["findings.json", "findings.sarif"]
    rows = json.loads((tmp_path / "findings.json").read_text(encoding="utf-8"))
    # severity first; within a severity the given order (the ranking) is kept
    assert [r["id"] for r in rows] == ["plaintext:a/x->a/y:80", "scan:shop/web",
                                       "permissive:a/y:80",
                                       "external-egress:a/x->external:example.com:443"]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert set(rows[0]) == {"id", "kind", "severity", "source", "destination", "port",
                            "summary", "evidence", "rank"}
    assert rows[1]["details"] == {"targets": 40}
    sarif = json.loads((tmp_path / "findings.sarif").read_text(encoding="utf-8"))
    assert [r["properties"]["id"] for r in sarif["runs"][0]["results"]] == [
        r["id"] for r in rows]
    # byte-identical on a second run
    before = (tmp_path / "findings.sarif").read_bytes()
    emit_findings_outputs(tmp_path, shuffled, tool_version="1")
    assert (tmp_path / "findings.sarif").read_bytes() == before
