"""The docs site builds in strict mode and its pages render in a real browser.

Builds the site with mkdocs (the ``docs`` extra; strict: a warning, a broken link or a missing
API reference fails the build), unless ``FLAX_LORA_SITE`` names a site CI built already, then
opens pages in headless Chromium (Debian's ``chromium``) and reads the rendered DOM: the title,
the navigation, an API entry with its signature, a plot. Screenshots go to
``FLAX_LORA_SCREENSHOTS`` when set. Skips, saying why, where mkdocs or Chromium is missing (CI's
first leg has both).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next(
    (c for c in ("chromium", "chromium-browser", "google-chrome") if shutil.which(c)), None
)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    built = os.environ.get("FLAX_LORA_SITE")
    if built:
        return Path(built)
    pytest.importorskip(
        "mkdocs", reason="the docs extra (mkdocs-material, mkdocstrings) is not installed"
    )
    out = tmp_path_factory.mktemp("site")
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return out


def _render(page: Path, tmp: Path, site: Path) -> str:
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    args = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={tmp}/profile",
    ]
    dom = subprocess.run(
        [*args, "--virtual-time-budget=3000", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    shots = os.environ.get("FLAX_LORA_SCREENSHOTS")
    if shots:
        name = str(page.parent.relative_to(site)).replace("/", "_").replace(".", "home")
        Path(shots).mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [*args, "--window-size=1280,1600", f"--screenshot={shots}/{name}.png", page.as_uri()],
            capture_output=True,
            timeout=120,
        )
    return dom.stdout


def test_site_files(site: Path) -> None:
    for page in (
        "index.html",
        "api/running/index.html",
        "guides/peft/index.html",
        "benchmarks/index.html",
    ):
        assert (site / page).is_file(), page
    assert (site / "img" / "train_step.png").stat().st_size > 10_000
    # offline: no page asks a font or script host for anything
    for html in site.rglob("*.html"):
        text = html.read_text()
        assert "fonts.googleapis.com" not in text and "fonts.gstatic.com" not in text, html


def test_home_renders_title_and_navigation(site: Path, tmp_path: Path) -> None:
    dom = _render(site / "index.html", tmp_path, site)
    assert "<title>flax_lora</title>" in dom
    for entry in ("Getting started", "Concepts", "Guides", "Benchmarks", "API reference"):
        assert f">{entry}<" in dom or f"> {entry} <" in dom or entry in dom, entry
    assert 'class="md-nav' in dom  # Material's navigation, built by its scripts and templates


def test_api_entry_with_signature(site: Path, tmp_path: Path) -> None:
    dom = _render(site / "api" / "running" / "index.html", tmp_path, site)
    assert 'id="flax_lora.wrap"' in dom
    assert "doc-signature" in dom and "apply_fn" in dom  # wrap's signature, rendered
    assert "Returns" in dom


def test_guide_and_plot_render(site: Path, tmp_path: Path) -> None:
    dom = _render(site / "guides" / "peft" / "index.html", tmp_path, site)
    assert "PEFT files and key maps" in dom and "save_peft" in dom
    dom = _render(site / "benchmarks" / "index.html", tmp_path, site)
    assert 'src="../img/train_step.png"' in dom
