"""Open the built docs site in a real browser (headless Chromium, Debian's package) and fail on what a reader would see.

    python scripts/docs_browser_check.py [--site site] [--out runs/docs-check]   # after mkdocs build (make docs-check)

Features
- Serves `--site` on 127.0.0.1 (a free port) and opens the home page, the configuration reference and two guides with
  Playwright driving the system's Chromium (no browser download).
- Fails on a console error, an uncaught page error, a request that failed or answered >= 400, and an image that did
  not load (`naturalWidth == 0`); the home page must show its two heatmaps.
- Writes a full-page screenshot of each page to `--out` (home.png is the artifact CI keeps).
"""

import argparse
import functools
import http.server
import shutil
import sys
import threading
from pathlib import Path

PAGES = {"home": "", "config": "reference/config/", "any-moe": "guides/any-moe/", "scale-out": "guides/scale-out/"}
BROKEN_IMAGES = "Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)"
LOADED_IMAGES = "Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).map(i => i.src)"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def serve(site: Path) -> http.server.ThreadingHTTPServer:
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise SystemExit("no Chromium on PATH: apt-get install chromium (make docs-check does)")


def check_page(browser, url: str, shot: Path) -> tuple[list[str], list[str]]:
    """(problems, loaded image URLs) of one page."""
    problems: list[str] = []
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} ({r.failure})"))
    page.on("response", lambda r: problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
    page.goto(url, wait_until="networkidle")
    problems += [f"image did not load: {src}" for src in page.evaluate(BROKEN_IMAGES)]
    loaded = page.evaluate(LOADED_IMAGES)
    page.screenshot(path=str(shot), full_page=True)
    page.close()
    return problems, loaded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--site", default="site", help="the built site (mkdocs build)")
    parser.add_argument("--out", default="runs/docs-check", help="where the screenshots go")
    args = parser.parse_args(argv)
    site, out = Path(args.site), Path(args.out)
    if not (site / "index.html").is_file():
        raise SystemExit(f"--site={args.site!r} has no index.html: run `mkdocs build` first")
    out.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import sync_playwright

    server = serve(site)
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    failures = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        for name, path in PAGES.items():
            problems, loaded = check_page(browser, base + path, out / f"{name}.png")
            if name == "home" and sum("heatmap" in src for src in loaded) < 2:
                problems.append(f"the home page shows {loaded}, not the two heatmaps")
            print(f"{name}: {len(loaded)} images, {len(problems)} problems -> {out / (name + '.png')}")
            failures += [f"{name}: {p}" for p in problems]
        browser.close()
    server.shutdown()
    for failure in failures:
        print(failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
