"""The CLI as a user runs it: a real subprocess of the installed entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from appliance.readers.formats import FORMATS

SUBCOMMANDS = ("run", "score", "gui", "fhir", "sign-off", "demo", "doctor", "export", "bench")


def cytoedge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_help_lists_every_subcommand() -> None:
    result = cytoedge("--help")
    assert result.returncode == 0, result.stderr
    for name in SUBCOMMANDS:
        assert f" {name} " in result.stdout, name


def test_doctor_exits_zero_on_this_machine() -> None:
    result = cytoedge("doctor", env={"COLUMNS": "250"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ort-cpu" in result.stdout
    assert "OpenSlide: library" in result.stdout
    assert "Ready to score once a bundle is installed." in result.stdout
    # The formats it lists are the readers' table, and only those.
    for fmt in FORMATS:
        assert f"{fmt.name} " in result.stdout and " ".join(fmt.extensions) in result.stdout
    assert ".czi" not in result.stdout


def test_doctor_fails_for_a_configured_bundle_that_is_not_there(tmp_path: Path) -> None:
    result = cytoedge("doctor", "--bundle", str(tmp_path / "nowhere"))
    assert result.returncode == 1
    assert "no bundle.json" in result.stdout


def test_broken_config_gives_one_line_and_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "broken.toml"
    config.write_text("[runtime]\nthreads = 'many'\n", encoding="utf-8")
    result = cytoedge("doctor", "--config", str(config))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "runtime.threads" in lines[0] and str(config) in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_broken_config_from_environment_gives_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "broken.toml"
    config.write_text("[paths]\nunknown = 'x'\n", encoding="utf-8")
    result = cytoedge("doctor", env={"CYTOEDGE_CONFIG": str(config)})
    assert result.returncode == 2
    assert "unknown key paths.unknown" in result.stderr


def test_fhir_writes_signed_off_results_and_refuses_the_others(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from appliance.cli.main import app
    from appliance.review.sign_off import SignOff, sign_off
    from appliance.service.audit import AuditLog
    from cytoedge_demo.samples import write_sample_result

    outbox = tmp_path / "outbox"
    signed = write_sample_result(outbox, "MM-1", "mm_negative")
    write_sample_result(outbox, "MM-2", "mm_positive")
    sign_off(signed.path, SignOff("accepted", "Dr A"), data_dir=tmp_path,
             audit=AuditLog(tmp_path / "audit.jsonl"), write_pdf=False)  # fmt: skip
    done = CliRunner().invoke(app, ["fhir", "MM-1", "MM-2"], env={"CYTOEDGE_DATA": str(tmp_path)})
    assert done.exit_code == 1
    assert done.stdout.split() == [str(tmp_path / "fhir-outbox" / "MM-1-v2.json")]
    assert done.stderr == (
        "cytoedge: case MM-2 version 1 is not signed off: "
        "only a reviewed result goes to the laboratory system\n"
    )


def test_sign_off_enters_confirmed_findings_and_refuses_bad_ones_in_one_line(
    tmp_path: Path,
) -> None:
    import json

    from typer.testing import CliRunner

    from appliance.cli.main import app
    from appliance.results import read_result
    from appliance.service.audit import read_audit
    from cytoedge_demo.samples import write_sample_result

    write_sample_result(tmp_path / "outbox", "MM-3", "mm_positive")
    env = {"CYTOEDGE_DATA": str(tmp_path)}
    runner = CliRunner()
    refused = runner.invoke(
        app,
        ["sign-off", "MM-3", "--decision", "accept", "--reviewer", "Dr A",
         "--karyotype", "46XY"],
        env=env,
    )  # fmt: skip
    assert refused.exit_code == 1
    assert refused.stderr.startswith("cytoedge: confirmed findings: karyotype 46XY does not read")
    assert refused.stderr.count("\n") == 1
    assert not (tmp_path / "outbox" / "MM-3" / "v2").exists()
    done = runner.invoke(
        app,
        ["sign-off", "MM-3", "--decision", "send-for-fish", "--reviewer", "Dr A",
         "--fish", "t(11;14)", "--fish", " del(17p) ", "--mutation", "KRAS G12D",
         "--karyotype", "46,XY,t(11;14)(q13;q32)[20]", "--diagnosis", "Plasma cell myeloma"],
        env=env,
    )  # fmt: skip
    assert done.exit_code == 0, done.stderr
    version = tmp_path / "outbox" / "MM-3" / "v2"
    fhir = tmp_path / "fhir-outbox" / "MM-3-v2.json"
    assert done.stdout.splitlines() == [
        f"MM-3: sent for FISH by Dr A, version 2 ({version})",
        f"FHIR: {fhir}",
    ]
    review = read_result(version).review
    assert review is not None and review.decision == "sent_for_fish"
    assert review.confirmed is not None and review.confirmed.fish == ("t(11;14)", "del(17p)")
    assert review.confirmed.mutations == ("KRAS G12D",)
    (line,) = read_audit(tmp_path / "state" / "audit.jsonl")
    assert line["source"] == "sign-off" and line["confirmed"]["fish"] == ["t(11;14)", "del(17p)"]
    entries = json.loads(fhir.read_text())["entry"]
    assert "FISH: del(17p)" in [e["resource"].get("code", {}).get("text") for e in entries]
    missing = runner.invoke(app, ["sign-off", "MM-9", "--decision", "accept"], env=env)
    assert missing.exit_code == 1
    assert missing.stderr == (
        "cytoedge: MM-9: no result found (a case id, a case folder or a version)\n"
    )
