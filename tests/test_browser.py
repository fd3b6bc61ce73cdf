"""The web page in a real browser: Debian's chromium driven by Playwright, against uvicorn on 127.0.0.1."""
from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from geolocate.serving import Geolocator
from geolocate.serving.server import create_app, serve_in_thread

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
PHOTO = "032_HMD_Nokia_8.3_5G.jpg"  # Helsinki harbour, with EXIF GPS

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed (apt-get install -y chromium)"),
]


def onnx_geolocator(trained) -> Geolocator:
    cfg, _, model_path = trained
    return Geolocator.from_pretrained(model_path, engine="onnx", onnx_path=Path(cfg.paths.data_dir).parent / "onnx-cache" / "model.onnx")


def test_page_upload_shows_five_cells_on_the_map(trained, photos_dir, tmp_path):
    from playwright.sync_api import sync_playwright

    geo = onnx_geolocator(trained)
    with serve_in_thread(create_app(geo)) as url, sync_playwright() as pw:
        expected = httpx.post(f"{url}/predict", files={"file": (PHOTO, (photos_dir / PHOTO).read_bytes(), "image/jpeg")},
                              timeout=60).json()
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 820})
            requests, errors = [], []
            page.on("request", lambda r: requests.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.wait_for_function("document.body.dataset.ready === '1'", timeout=20_000)
            assert page.locator("#land path.land").count() > 50  # the bundled world outline is drawn
            page.wait_for_function("!document.getElementById('model-card').textContent.startsWith('loading')")
            assert "efficientnet_lite0" in page.locator("#model-card").inner_text()

            page.set_input_files("#file", str(photos_dir / PHOTO))
            page.wait_for_function("document.body.dataset.state === 'done'", timeout=30_000)
            rows = page.locator("#results tbody tr.cell-row")
            assert rows.count() == 5
            assert page.locator("#cells path.cell").count() == 5
            shown_cells = [rows.nth(i).get_attribute("data-cell") for i in range(5)]
            assert shown_cells == [c["cell"] for c in expected["top"]]
            table = page.locator("#results").inner_text()
            for c in expected["top"]:
                assert c["place"] in table
                assert f"{100 * c['probability']:.1f}%" in table
            summary = page.locator("#summary").inner_text()
            assert expected["place"] in summary and "EXIF GPS" in summary and "km" in summary
            # honest confidence: the street photo to the aerial model is flagged; the cell set and regions are said
            assert expected["ood"] and expected["warning"] in summary and page.locator("#summary .warn").count() == 1
            assert f"90% set: {expected['prediction_set']['sentence']}" in summary and "regions: " + expected["regions"][0]["region"] in summary
            assert page.locator("#marks circle.mark-truth").count() == 1
            shot = tmp_path / "geolocate_page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 20_000

            # a non-image shows one clear error and the page keeps working
            bad = tmp_path / "notes.txt"
            bad.write_text("not a photo")
            page.set_input_files("#file", str(bad))
            page.wait_for_function("document.body.dataset.state === 'error'", timeout=20_000)
            assert "not a recognised image format" in page.locator("#error").inner_text()
            # ... and nothing of the previous photo's answer stays under it
            assert page.locator("#results").is_hidden() and page.locator("#summary").is_hidden()
            assert page.locator("#results tbody tr").count() == 0
            assert page.locator("#cells path.cell").count() == 0 and page.locator("#marks *").count() == 0
            assert page.locator("#zoom-cells").is_disabled()

            assert not errors, errors
            assert all(u.startswith(url) or u.startswith(("blob:", "data:")) for u in requests), requests
        finally:
            browser.close()


def test_page_uploads_four_views_as_one_place(trained, photos_dir):
    from playwright.sync_api import sync_playwright

    geo = onnx_geolocator(trained)
    names = [PHOTO, "000_IMG_7159.jpg", "010_001.jpg", "021_DSCN0010.jpg"]
    with serve_in_thread(create_app(geo)) as url, sync_playwright() as pw:
        files = [("file", (n, (photos_dir / n).read_bytes(), "image/jpeg")) for n in names]
        expected = httpx.post(f"{url}/predict", files=files, timeout=60).json()
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 820})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.wait_for_function("document.body.dataset.ready === '1'", timeout=20_000)
            page.set_input_files("#file", [str(photos_dir / n) for n in names])
            page.wait_for_function("document.body.dataset.state === 'done'", timeout=30_000)
            rows = page.locator("#results tbody tr.cell-row")
            assert [rows.nth(i).get_attribute("data-cell") for i in range(rows.count())] == [c["cell"] for c in expected["top"]]
            assert "4 views of one place" in page.locator("#summary").inner_text()
            assert page.locator("#summary .dropped").count() == 0
            assert "4 views" in page.locator("#status").inner_text()
            # five photos: the server's one-line refusal is shown, nothing else
            page.set_input_files("#file", [str(photos_dir / n) for n in names + ["013_IMG_20180725_163423.jpg"]])
            page.wait_for_function("document.body.dataset.state === 'error'", timeout=20_000)
            assert "send at most 4 views of one place" in page.locator("#error").inner_text()
            assert page.locator("#results").is_hidden() and page.locator("#cells path.cell").count() == 0
            assert not errors, errors
        finally:
            browser.close()


PHONE = {"width": 390, "height": 844}
_OVERFLOW = "document.documentElement.scrollWidth - document.documentElement.clientWidth"
_CONTRAST = """(sel) => {
  const lum = (c) => { const v = c.match(/[\\d.]+/g).slice(0, 3).map(Number).map((x) => { x /= 255; return x <= 0.03928 ? x / 12.92 : ((x + 0.055) / 1.055) ** 2.4; });
                       return 0.2126 * v[0] + 0.7152 * v[1] + 0.0722 * v[2]; };
  const el = document.querySelector(sel), st = getComputedStyle(el);
  const a = lum(st.color), b = lum(st.backgroundColor);
  return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
}"""


def test_page_and_dashboards_fit_a_phone(trained, photos_dir, tmp_path):
    from playwright.sync_api import sync_playwright

    from geolocate.runs.aggregate import aggregate

    cfg, run_dir, _ = trained
    agg = aggregate(run_dir.parent, tmp_path / "_aggregate").out_dir / "dashboard.html"
    geo = onnx_geolocator(trained)
    with serve_in_thread(create_app(geo)) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport=PHONE)
            page.goto(url + "/")
            page.wait_for_function("document.body.dataset.ready === '1'", timeout=20_000)
            assert page.evaluate(_OVERFLOW) == 0
            page.set_input_files("#file", str(photos_dir / PHOTO))
            page.wait_for_function("document.body.dataset.state === 'done'", timeout=30_000)
            assert page.locator("#results tbody tr.cell-row").count() == 5
            assert page.evaluate(_OVERFLOW) == 0, "the result page is wider than the phone"
            page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
            for dash in (run_dir / "dashboard.html", agg):
                page.goto(dash.as_uri())
                assert page.evaluate(_OVERFLOW) == 0, f"{dash} is wider than the phone"
            page.goto((run_dir / "dashboard.html").as_uri())
            assert page.evaluate(_CONTRAST, "header code") >= 4.5  # the dataset fingerprint badge is readable
            assert page.locator("li.missing", has_text="dashboard.html").count() == 0
        finally:
            browser.close()
