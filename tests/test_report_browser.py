"""Reports open in a real browser: headless Chromium loads a run report and a plan report with no console
errors, every figure decodes to a non-blank image, and a screenshot of the page is not blank.

CI installs Debian's ``chromium`` (.ci/run); elsewhere the test skips when no chromium is on PATH."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import pytest
import yaml

from sim.cli import main

from test_plan import PLAN

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="no chromium on PATH")

# Appended to a *copy* of a report (reports carry no scripts): after load, every <img> is drawn on a canvas
# and its pixel spread measured; the result replaces the page's body text so --dump-dom shows it.
PROBE = """<script>
window.addEventListener("load", () => {
  const out = [...document.images].map((img) => {
    const c = document.createElement("canvas");
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    if (!img.complete || !img.naturalWidth) return {alt: img.alt, ok: false, distinct: 0};
    const ctx = c.getContext("2d"); ctx.drawImage(img, 0, 0);
    const px = ctx.getImageData(0, 0, c.width, c.height).data;
    const seen = new Set();
    for (let i = 0; i < px.length && seen.size < 50; i += 4 * 97) seen.add(px[i] << 16 | px[i + 1] << 8 | px[i + 2]);
    return {alt: img.alt, ok: true, distinct: seen.size, width: img.naturalWidth};
  });
  const pre = document.createElement("pre"); pre.id = "probe-result";
  pre.textContent = "probe-" + "result:" + JSON.stringify(out) + ":end"; document.body.appendChild(pre);
});
</script>"""


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / "chromium-profile"
    cmd = [
        CHROMIUM or "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
        f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def _console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "ERROR:CONSOLE" in line
            or ":ERROR:" in line)] + [line for line in stderr.splitlines() if "Uncaught" in line and "CONSOLE" not in line]


def _check_in_browser(tmp_path: Path, report: Path, expected_images: int) -> None:
    probed = report.with_name(report.stem + ".probe.html")
    probed.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    dom = _chromium(tmp_path, "--dump-dom", probed.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert _console_errors(dom.stderr) == []
    found = re.search(r"probe-result:(\[.*?\]):end", dom.stdout, re.S)
    assert found, dom.stdout[-2000:]
    images = json.loads(found.group(1))
    assert len(images) == expected_images
    for image in images:
        # A rendered matplotlib figure has axes, text and lines: far more than a few distinct colours.
        assert image["ok"] and image["distinct"] >= 5, image
    shot = tmp_path / (report.stem + ".png")
    run = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", "--hide-scrollbars", report.as_uri())
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    assert _console_errors(run.stderr) == []
    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[0] >= 2000 and pixels[..., :3].std() > 0.05


def test_the_console_check_catches_an_error(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><p>x</p><script>undefinedFunction();</script></body></html>")
    run = _chromium(tmp_path, "--dump-dom", page.as_uri())
    assert any("undefinedFunction" in line for line in _console_errors(run.stderr)), run.stderr[-2000:]


def test_run_and_plan_reports_render_in_chromium(tmp_path):
    scenario = {k: v for k, v in copy.deepcopy(PLAN).items() if k != "plan"}
    scenario["workload"]["max_requests"] = 12
    scenario["hardware"]["expert_memory"] = {"experts": 512}  # half the experts: a cache, hence the load heatmap
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(scenario))
    assert main(["simulate", str(path), "--no-progress", "--out", str(tmp_path / "run")]) == 0
    # The engine's per-layer table (hit rate by layer, time breakdown): two more figures.
    assert (tmp_path / "run" / "layers.csv").exists()
    assert main(["report", str(tmp_path / "run")]) == 0
    _check_in_browser(tmp_path, tmp_path / "run" / "report.html", expected_images=9)
    plan = copy.deepcopy(PLAN)
    plan["plan"]["candidates"]["hardware"] = plan["plan"]["candidates"]["hardware"][1:]
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    assert main(["plan", str(path), "--no-progress", "--jobs", "1", "--out", str(tmp_path / "plan"),
                 "--report", str(tmp_path / "plan.html")]) == 0
    _check_in_browser(tmp_path, tmp_path / "plan.html", expected_images=2)


def test_sweep_and_validation_reports_render_in_chromium(tmp_path):
    sweep = {k: v for k, v in copy.deepcopy(PLAN).items() if k != "plan"}
    sweep["workload"]["max_requests"] = 8
    sweep["sweep"] = {"axes": {"hardware.profile": ["h100-80gb", "a100-80gb"]}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    assert main(["sweep", str(path), "--no-progress", "--jobs", "1", "--out", str(tmp_path / "sweep"),
                 "--report", str(tmp_path / "sweep.html")]) == 0
    _check_in_browser(tmp_path, tmp_path / "sweep.html", expected_images=1)
    folder = tmp_path / "validate"
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps({"scenario": "v", "profile": "p.yaml", "passed": True, "failures": [],
                                                     "bounds": {"median_e2e_ape": 0.05}, "metrics": {"e2e_ape_median": 0.01}}))
    (folder / "comparison.csv").write_text("e2e_s_real,e2e_s_sim,ttft_s_real,ttft_s_sim\n1,1.1,0.1,0.1\n2,1.9,0.2,0.3\n")
    assert main(["report", str(folder), "-o", str(tmp_path / "validation.html")]) == 0
    _check_in_browser(tmp_path, tmp_path / "validation.html", expected_images=1)
