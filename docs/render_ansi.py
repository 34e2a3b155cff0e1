"""Render a terminal capture (`tmux capture-pane -p -e`) to a PNG, for the README.

    python docs/render_ansi.py capture.ansi out.png [--cols 100]

A docs tool, not part of criud: it needs Pillow (`pip install '.[docs]'`)
and a monospace TrueType font (fonts-dejavu-core).  It understands what a
capture holds: text and SGR escapes (reset, bold, dim, the 8/16 colours,
256-colour and true-colour foregrounds and backgrounds).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf"
FONT_BOLD = "/usr/share/fonts/truetype/dejavu/DejaVuSansMono-Bold.ttf"
SIZE = 16
PAD = 14
BG = (30, 30, 36)
FG = (220, 220, 214)
# xterm's palette, roughly: black, red, green, yellow, blue, magenta, cyan, white; then bright.
BASIC = [
    (40, 40, 48), (214, 72, 72), (112, 192, 92), (220, 190, 80),
    (90, 140, 230), (200, 110, 200), (80, 190, 200), (214, 214, 214),
    (110, 110, 120), (240, 100, 100), (150, 230, 120), (240, 220, 120),
    (130, 170, 250), (230, 150, 230), (120, 220, 230), (250, 250, 250),
]  # fmt: skip
SGR = re.compile(r"\x1b\[([0-9;]*)m")
OTHER_ESC = re.compile(r"\x1b\[[0-9;?]*[A-Za-ln-z]")

Rgb = tuple[int, int, int]


def _c256(n: int) -> Rgb:
    if n < 16:
        return BASIC[n]
    if n < 232:
        n -= 16
        steps = (0, 95, 135, 175, 215, 255)
        return steps[n // 36], steps[n // 6 % 6], steps[n % 6]
    g = 8 + (n - 232) * 10
    return g, g, g


class Style:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.fg: Rgb = FG
        self.bg: Rgb | None = None
        self.bold = False
        self.dim = False

    def apply(self, params: str) -> None:
        codes = [int(x) if x else 0 for x in params.split(";")] if params else [0]
        i = 0
        while i < len(codes):
            c = codes[i]
            if c == 0:
                self.reset()
            elif c == 1:
                self.bold = True
            elif c == 2:
                self.dim = True
            elif c == 22:
                self.bold = self.dim = False
            elif 30 <= c <= 37 or 90 <= c <= 97:
                self.fg = BASIC[c - 30 if c < 90 else c - 90 + 8]
            elif 40 <= c <= 47 or 100 <= c <= 107:
                self.bg = BASIC[c - 40 if c < 100 else c - 100 + 8]
            elif c == 39:
                self.fg = FG
            elif c == 49:
                self.bg = None
            elif c in (38, 48) and i + 1 < len(codes):
                if codes[i + 1] == 5 and i + 2 < len(codes):
                    rgb, i = _c256(codes[i + 2]), i + 2
                elif codes[i + 1] == 2 and i + 4 < len(codes):
                    rgb, i = (codes[i + 2], codes[i + 3], codes[i + 4]), i + 4
                else:
                    rgb = FG
                if c == 38:
                    self.fg = rgb
                else:
                    self.bg = rgb
            i += 1

    def colour(self) -> Rgb:
        if self.dim:
            return (self.fg[0] * 6 // 10, self.fg[1] * 6 // 10, self.fg[2] * 6 // 10)
        return self.fg


def render(text: str, cols: int, out: Path) -> None:
    """Draw the capture's lines, cols wide, on a dark terminal-like background."""
    lines = text.rstrip("\n").split("\n")
    regular = ImageFont.truetype(FONT, SIZE)
    bold = ImageFont.truetype(FONT_BOLD, SIZE)
    cw = round(regular.getlength("M"))
    ch = SIZE + 6
    img = Image.new("RGB", (cols * cw + 2 * PAD, len(lines) * ch + 2 * PAD), BG)
    draw = ImageDraw.Draw(img)
    style = Style()
    for row, line in enumerate(lines):
        line = OTHER_ESC.sub("", line)
        col, y = 0, PAD + row * ch
        pos = 0
        for m in [*SGR.finditer(line), None]:
            chunk = line[pos : m.start() if m else len(line)]
            for char in chunk:
                x = PAD + col * cw
                if style.bg is not None:
                    draw.rectangle([x, y, x + cw, y + ch], fill=style.bg)
                draw.text(
                    (x, y + 2), char, font=bold if style.bold else regular, fill=style.colour()
                )
                col += 1
            if m is None:
                break
            style.apply(m.group(1))
            pos = m.end()
    img.save(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("capture", type=Path)
    p.add_argument("png", type=Path)
    p.add_argument("--cols", type=int, default=100)
    a = p.parse_args()
    render(a.capture.read_text(), a.cols, a.png)


if __name__ == "__main__":
    main()
