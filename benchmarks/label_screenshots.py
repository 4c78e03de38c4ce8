"""Screenshots of the labelling page on real data, to judge it by eye: a suspected label error and a copy pair in
the review queue, the images whose label the model disagrees with as a grid; then, with only `--labelled` of the
labels kept, the label-next queue large, as a grid, and at a phone's width.

    PYTHONPATH=src python benchmarks/label_screenshots.py --images /tmp/review/images \
        --labels /tmp/review/flipped.csv --doctor /tmp/review/doctor/doctor.json --out shots/

The page works on copies of the label file (nothing is decided); the screenshots go to OUT as PNG.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
from pathlib import Path

from review_loop import label_page


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--doctor", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--labelled", type=int, default=500, help="labels kept for the label-next screenshots")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as scratch, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        labels = Path(scratch) / args.labels.name
        shutil.copy(args.labels, labels)
        with label_page(args.images, labels, args.doctor, args.port) as url:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(url)
            page.wait_for_selector("#classes button")
            page.screenshot(path=str(args.out / "review-label.png"), full_page=True)
            for _ in range(10_000):  # to the first copy pair
                if page.locator(".pair").count():
                    break
                page.keyboard.press("ArrowRight")
                page.wait_for_timeout(30)
            page.wait_for_timeout(500)
            page.screenshot(path=str(args.out / "review-copy.png"), full_page=True)
            page.keyboard.press("e")
            page.wait_for_selector("#filter-show", state="visible")
            page.select_option("#filter-show", "disagree")
            page.keyboard.press("g")
            page.wait_for_timeout(1500)
            page.screenshot(path=str(args.out / "everything-disagree-grid.png"), full_page=True)
        lines = labels.read_text().splitlines()
        kept = random.Random(0).sample(lines[1:], args.labelled)
        partial = Path(scratch) / "partial.csv"
        partial.write_text("\n".join([lines[0], *kept]) + "\n")
        with label_page(args.images, partial, args.doctor, args.port + 1) as url:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(url)
            page.wait_for_selector("#classes button")
            page.keyboard.press("n")
            page.wait_for_timeout(1000)
            page.screenshot(path=str(args.out / "next.png"), full_page=True)
            page.keyboard.press("g")
            page.wait_for_timeout(1500)
            page.screenshot(path=str(args.out / "next-grid.png"), full_page=True)
            page.keyboard.press("g")
            page.set_viewport_size({"width": 390, "height": 844})
            page.wait_for_timeout(500)
            page.screenshot(path=str(args.out / "next-phone.png"), full_page=True)
        browser.close()
    print(f"wrote {', '.join(sorted(path.name for path in args.out.glob('*.png')))} to {args.out}")


if __name__ == "__main__":
    main()
