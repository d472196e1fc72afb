"""Figures quoted in the README, checked against the result files they come from.

Every figure the README takes from a result names its source in an HTML comment right after it
(invisible once rendered):

    the whole path adds 94 ms <!-- figure: evals/results/bench_serve.json:levels.1.added_p50_ms -->

- `figure: FILE:KEY` checks the last number written between the previous marker on the line (or
  the line's start) and this one: it must equal the value at KEY (dots descend into objects and
  lists) rounded to the decimals printed (as Python's f-strings round). `KEY*100`, `KEY/1e9` scale
  the value first (percent, bytes as GB); `KEY/OTHER.KEY` divides it by another value of the same
  file (a ratio), `KEY - OTHER.KEY` subtracts it (spaces around `-` and `+`: keys may hold a
  hyphen). A figure written with `~` or `about` before it may be rounded further: `~6,000`
  matches 5,956.
- `table: FILE:TEMPLATE` on the line before a markdown table checks each of its numeric cells
  (bold and backticks ignored) against TEMPLATE with `{row}` (the first cell, without backticks
  and a parenthesised remark) and `{column}` (the header cell) filled in.
- `holds: FILE:KEY` checks that the value is true (an object: every value in it true);
  `holds: FILE:KEY=TEXT` that it is TEXT (e.g. the backend that ran).

`python -m evals.figures [README.md]` prints every check, and exits 1 if one fails;
tests/test_readme_figures.py runs the same checks in the default suite. After `make results`:
`--update` rewrites each figure that no longer matches to its new value, printed the way the old one
was (decimals, thousands separators, `~` rounding), and lists the `holds:` claims that failed, which
need a person; `--against REV` shows how far each figure moved from the result files at a git
revision (the run-to-run spread of a full regeneration), `--json FILE` writes that comparison.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from evals.provenance import REPO

MARKER = re.compile(r"<!--\s*(figure|table|holds):\s*([^\s:]+):(.+?)\s*-->")
CODE_SPAN = re.compile(r"`[^`]*`")
ANY_MARKER = re.compile(r"<!--\s*(figure|table|holds)\b")
NUMBER = re.compile(r"(~|\babout\s+)?(?<![\w.])(-?\d[\d,]*(?:\.\d+)?)")
# KEY, KEY*N, KEY/N, KEY/KEY (no spaces needed: keys hold no * or /), KEY - KEY, KEY + KEY (spaced:
# keys may hold a hyphen, as expert names do).
EXPRESSION = re.compile(r"^(?P<key>[^\s*/]+?)(?:\s*(?P<op>[*/])\s*(?P<by>\S+)|\s+(?P<op2>[-+])\s+(?P<by2>\S+))?$")


@dataclass
class Check:
    line: int
    source: str  # FILE:KEY as written
    printed: str | None
    expected: str | None
    ok: bool
    problem: str = ""
    column: int | None = None  # where `printed` starts in its README line (0-based), for --update
    approximate: bool = False  # printed after `~` or `about`: may be rounder than its decimals
    value: float | None = None  # the result's value, where the key resolved

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        return f"README line {self.line}: {verdict} {self.printed!r} <- {self.source}" + (f" = {self.expected}" if self.expected else "") + (
            f" ({self.problem})" if self.problem else "")


def lookup(data, key: str):
    value = data
    for part in key.split("."):
        if isinstance(value, list):
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            raise KeyError(f"no {part!r} in {key!r}")
    return value


def resolve(data, expression: str) -> float:
    match = EXPRESSION.match(expression)
    if match is None:
        raise ValueError(f"cannot read {expression!r}: KEY, KEY*N, KEY/N, KEY/KEY, KEY - KEY or KEY + KEY")
    value = lookup(data, match["key"])
    op, by = (match["op"], match["by"]) if match["op"] else (match["op2"], match["by2"])
    if op:
        try:
            other = float(by)
        except ValueError:
            other = lookup(data, by)
        value = {"*": value * other, "/": value / other if op == "/" else None,
                 "-": value - other, "+": value + other}[op]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{expression} is {value!r}, not a number")
    return float(value)


def matches(printed: str, value: float, approximate: bool) -> tuple[bool, str]:
    """Whether `printed` is `value` rounded as printed; returns the expected text."""
    digits = printed.replace(",", "")
    decimals = len(digits.split(".")[1]) if "." in digits else 0
    exact = f"{value:.{decimals}f}"  # as Python prints it, as the generators do
    if Decimal(digits) == Decimal(exact):
        return True, exact
    if approximate and decimals == 0:
        zeros = len(digits) - len(digits.rstrip("0"))
        if zeros and Decimal(digits) == Decimal(round(value, -zeros)):
            return True, exact
    return False, exact


def reprint(printed: str, value: float, approximate: bool) -> str:
    """`value` written the way `printed` was: its decimals, its thousands separators and, for an
    approximate round figure, its trailing zeros."""
    digits = printed.replace(",", "")
    decimals = len(digits.split(".")[1]) if "." in digits else 0
    zeros = len(digits) - len(digits.rstrip("0")) if approximate and decimals == 0 else 0
    if zeros and round(value, -zeros) != 0:
        value = round(value, -zeros)
    return f"{value:{',' if ',' in printed else ''}.{decimals}f}"


class Files:
    """The result files under `root`, or, with `revision`, as committed at that git revision."""

    def __init__(self, root: Path, revision: str | None = None):
        self.root, self.revision, self.cache = root, revision, {}

    def __call__(self, name: str):
        if name not in self.cache:
            if self.revision is None:
                text = (self.root / name).read_text()
            else:
                shown = subprocess.run(["git", "show", f"{self.revision}:{name}"], cwd=self.root, capture_output=True, text=True)
                if shown.returncode:
                    raise FileNotFoundError(f"{name} at {self.revision}: {shown.stderr.strip()}")
                text = shown.stdout
            self.cache[name] = json.loads(text)
        return self.cache[name]


def _cells(row: str) -> list[tuple[str, int]]:
    """A table row's cells, each with the column where it starts in the row."""
    cells, start = [], row.index("|") + 1 if row.lstrip().startswith("|") else 0
    for raw in row[start:].rstrip().removesuffix("|").split("|"):
        cells.append((raw.strip(), start + len(raw) - len(raw.lstrip())))
        start += len(raw) + 1
    return cells


def _plain(cell: str) -> str:
    return re.sub(r"\s*\(.*\)$", "", cell.replace("**", "").replace("`", "")).strip()


def check_table(lines: list[str], start: int, files: Files, name: str, template: str) -> list[Check]:
    header = [_plain(c) for c, _ in _cells(lines[start])]
    checks = []
    for n in range(start + 2, len(lines)):
        if not lines[n].lstrip().startswith("|"):
            break
        cells = _cells(lines[n])
        row = _plain(cells[0][0])
        for column, (cell, at) in zip(header[1:], cells[1:]):
            text = _plain(cell)
            if not NUMBER.fullmatch(text):
                continue
            key = template.replace("{row}", row).replace("{column}", column)
            checks.append(check_one(n + 1, files, name, key, text, approximate=False, column=at + cell.index(text)))
    if not checks:
        checks.append(Check(start, f"{name}:{template}", None, None, False, "no numeric cell in the table after the marker"))
    return checks


def check_one(line: int, files: Files, name: str, key: str, printed: str, approximate: bool, column: int | None = None) -> Check:
    source = f"{name}:{key}"
    try:
        value = resolve(files(name), key)
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        return Check(line, source, printed, None, False, str(exc), column, approximate)
    ok, expected = matches(printed, value, approximate)
    return Check(line, source, printed, expected, ok, "", column, approximate, value)


def check_holds(line: int, files: Files, name: str, claim: str) -> Check:
    key, equals, wanted = claim.partition("=")
    try:
        value = lookup(files(name), key)
    except (OSError, ValueError, KeyError, IndexError) as exc:
        return Check(line, f"{name}:{claim}", None, None, False, str(exc))
    if equals:
        ok = str(value) == wanted
    else:
        ok = all(value.values()) if isinstance(value, dict) else bool(value)
    return Check(line, f"{name}:{claim}", None, json.dumps(value), ok, "" if ok else "does not hold")


def check_readme(path: Path = REPO / "README.md", root: Path = REPO, revision: str | None = None) -> list[Check]:
    files = Files(root, revision)
    lines = path.read_text().splitlines()
    checks: list[Check] = []
    for n, line in enumerate(lines):
        line = CODE_SPAN.sub(lambda m: " " * len(m.group()), line)  # a marker shown as code is an example
        previous = 0
        if len(ANY_MARKER.findall(line)) != len(MARKER.findall(line)):
            checks.append(Check(n + 1, line.strip()[:80], None, None, False, "a marker that cannot be read"))
        for marker in MARKER.finditer(line):
            kind, name, key = marker.groups()
            segment, previous_end = line[previous:marker.start()], previous
            previous = marker.end()
            if kind == "table":
                start = n + 1
                checks += check_table(lines, start, files, name, key) if start < len(lines) else [
                    Check(n + 1, f"{name}:{key}", None, None, False, "no table after the marker")]
            elif kind == "holds":
                checks.append(check_holds(n + 1, files, name, key))
            else:
                numbers = list(NUMBER.finditer(segment))
                if not numbers:
                    checks.append(Check(n + 1, f"{name}:{key}", None, None, False, "no number before the marker"))
                    continue
                last = numbers[-1]
                checks.append(check_one(n + 1, files, name, key, last.group(2), approximate=bool(last.group(1)),
                                        column=previous_end + last.start(2)))
    return checks


def update_readme(path: Path = REPO / "README.md", root: Path = REPO) -> tuple[list[tuple[Check, str]], list[Check]]:
    """Rewrites every figure that no longer matches its result to the result's value, printed as
    before. Returns the rewrites (check, new text) and the failures it cannot mend (claims, missing
    keys), which need a person."""
    lines = path.read_text().splitlines(keepends=True)
    rewrites, left = [], []
    for check in check_readme(path, root):
        if check.ok:
            continue
        if check.column is None or check.printed is None or check.value is None:
            left.append(check)
            continue
        rewrites.append((check, reprint(check.printed, check.value, check.approximate)))
    for check, new in sorted(rewrites, key=lambda r: (r[0].line, r[0].column), reverse=True):  # right to left keeps columns
        line = lines[check.line - 1]
        assert line[check.column:].startswith(check.printed), (check, line)
        lines[check.line - 1] = line[:check.column] + new + line[check.column + len(check.printed):]
    path.write_text("".join(lines))
    return sorted(rewrites, key=lambda r: (r[0].line, r[0].column)), left


def compare(revision: str, path: Path = REPO / "README.md", root: Path = REPO) -> list[dict]:
    """Each numeric README figure's value in the result files now and at `revision`."""
    rows, then = [], Files(root, revision)
    for check in check_readme(path, root):
        if check.column is None:  # a claim
            continue
        name, key = check.source.split(":", 1)
        row = {"line": check.line, "source": check.source, "printed": check.printed, "now": check.value}
        if check.value is None:
            row["problem"] = check.problem
        try:
            row["then"] = resolve(then(name), key)
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            row["then"], row["problem"] = None, str(exc)
        if row["then"] is not None and row["now"] is not None:
            row["moved"] = row["now"] - row["then"]
            row["moved_share"] = row["moved"] / abs(row["then"]) if row["then"] else None
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evals.figures", description=__doc__.split("\n\n")[0])
    parser.add_argument("readme", nargs="?", type=Path, default=REPO / "README.md")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--update", action="store_true", help="rewrite the figures that no longer match their results")
    action.add_argument("--against", metavar="REV", help="how far each figure moved from the results at git revision REV")
    parser.add_argument("--json", type=Path, help="with --against: write the comparison here")
    args = parser.parse_args(argv)
    if args.json and not args.against:
        parser.error("--json goes with --against")
    if args.update:
        rewrites, left = update_readme(args.readme)
        for check, new in rewrites:
            print(f"README line {check.line}: {check.printed} -> {new} <- {check.source}")
        for check in left:
            print(f"needs a person: {check}")
        print(f"{len(rewrites)} figures rewritten, {len(left)} failures left")
        return 1 if left else 0
    if args.against:
        rows = compare(args.against, args.readme)
        for row in sorted(rows, key=lambda r: -abs(r.get("moved_share") or 0)):
            share = row.get("moved_share")
            then, now = (f"{v:.6g}" if v is not None else "-" for v in (row["then"], row["now"]))
            print(f"line {row['line']:4}: {then:>12} -> {now:<12} "
                  f"{'' if share is None else f'{share:+.1%}':>8}  {row['source']}{'  (' + row['problem'] + ')' if 'problem' in row else ''}")
        if args.json:
            args.json.write_text(json.dumps({"against": args.against, "figures": rows}, indent=1) + "\n")
        return 0
    checks = check_readme(args.readme)
    for c in checks:
        print(c)
    failed = [c for c in checks if not c.ok]
    print(f"{len(checks) - len(failed)} of {len(checks)} README figures match their result files")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
