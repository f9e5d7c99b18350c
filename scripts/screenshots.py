"""Take the README screenshots from the real app over an existing run store.

    .venv/bin/python scripts/screenshots.py --store runs --image ~/.cache/cifar10-jpg/test/cat/0001.jpg \
        --run-text "Two-stage seed 3" \
        --groups two-stage all-at-once --out docs/screenshots

Serves `streamlit run` on a free localhost port with FINETUNE_LAB_DATA=<store>, drives Debian's
chromium with Playwright, and writes run.png (the run whose label contains --run-text),
compare.png (the --groups overlaid) and classify.png (--image uploaded).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update"]
TIMEOUT_MS = 120_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    return
        except OSError:
            pass
        time.sleep(0.5)  # polling interval
    raise SystemExit(f"the app at {url} did not answer within {timeout_s} s")


def settle(page) -> None:
    """Wait until Streamlit has finished running the script (no 'Running...' indicator)."""
    page.wait_for_load_state("networkidle")
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=TIMEOUT_MS)


def choose(page, label: str, option_text: str) -> None:
    box = page.get_by_role("combobox", name=label).first
    box.click()
    box.fill(option_text)  # filter: the option list is virtualised, not all are rendered
    page.get_by_role("option", name=option_text, exact=False).first.click()
    settle(page)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="runs", type=Path)
    ap.add_argument("--image", required=True, type=Path, help="picture to upload on Classify")
    ap.add_argument("--run-text", default="", help="text in the label of the run to show on Runs")
    ap.add_argument("--groups", nargs="*", default=[],
                    help="text in the names of the groups of seeds to overlay on Compare")
    ap.add_argument("--out", default=ROOT / "docs" / "screenshots", type=Path)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://localhost:{port}"
    env = {**os.environ, "FINETUNE_LAB_DATA": str(args.store.resolve())}
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "streamlit_app.py",
                              "--server.headless", "true", "--server.port", str(port)],
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)

            page.goto(url + "/runs")
            settle(page)
            if args.run_text:
                choose(page, "Run", args.run_text)
            page.wait_for_timeout(1500)  # let plotly finish drawing before the picture
            page.screenshot(path=str(args.out / "run.png"), full_page=True)

            page.goto(url + "/compare")
            settle(page)
            for group_text in args.groups:
                choose(page, "Groups of seeds", group_text)
                page.keyboard.press("Escape")
            page.wait_for_timeout(1500)
            page.screenshot(path=str(args.out / "compare.png"), full_page=True)

            page.goto(url + "/classify")
            settle(page)
            page.locator("input[type=file]").first.set_input_files(str(args.image))
            page.get_by_text("Best guess:").first.wait_for()
            settle(page)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(args.out / "classify.png"), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"wrote run.png, compare.png, classify.png to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
